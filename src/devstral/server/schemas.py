"""Request bodies, as pydantic models: the OpenAPI schema, and the field-naming 400s, come from here.

Unknown fields are accepted and ignored (clients send vendor extras); known ones are checked
strictly, with bounds that keep every accepted value meaningful to the sampler.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
# Every stop string is checked against the text after every token: keep the list short.
StopList = str | Annotated[list[str], Field(max_length=16)] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class FunctionDef(_Body):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolCallFunction(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: dict[str, str]


class SamplingFields(_Body):
    """What OpenAI calls sampling, plus llama.cpp's extras (top_k, min_p, repeat_penalty)."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=100)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: StopList = None
    n: int = Field(default=1, ge=1, le=16, description="choices per prompt (each is its own engine job)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="a string, token ids, or a list of either (one completion each)")
    suffix: str | None = Field(default=None, description="text after the completion: fill-in-the-middle")
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


class ApplyTemplateRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None


# ---------------------------------------------------------------- Ollama
class OllamaOptions(_Body):
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    top_p: float | None = Field(default=None, gt=0, le=1)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    num_predict: int | None = Field(default=None, ge=-2)  # -1: until the context ends, -2: fill it
    num_ctx: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: StopList = None
    repeat_penalty: float | None = Field(default=None, gt=0, le=100)
    repeat_last_n: int | None = Field(default=None, ge=-1)


class OllamaToolCallFunction(_Body):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(_Body):
    function: OllamaToolCallFunction


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


class OllamaChatRequest(_Body):
    model: str
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Tool] | None = None
    options: OllamaOptions | None = None
    stream: bool = True
    format: str | dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    think: bool | str | None = None


class OllamaGenerateRequest(_Body):
    model: str
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    options: OllamaOptions | None = None
    stream: bool = True
    format: str | dict[str, Any] | None = None
    images: list[str] | None = None
    keep_alive: str | int | float | None = None
    context: list[int] | None = None
    think: bool | str | None = None


class OllamaShowRequest(_Body):
    model: str | None = None
    name: str | None = None  # older clients
    verbose: bool = False
