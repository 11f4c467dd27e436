"""What a request asks of the output's shape -> a grammar constraint for the engine (or None).

- OpenAI `response_format`: `json_object` (any JSON object) or `json_schema` (the schema, strictly);
  Ollama `format`: "json" or a schema.
- Tools: `tool_choice` "required" or a named function always constrain the output to calls of the
  declared tools (names and argument schemas) in the model's own format; "auto" does so only when
  the server runs with `--strict-tools` (the model may still answer in text, but any call it starts
  is valid). With a JSON answer requested and tools on "auto", the output is either calls or the JSON.

Compiling runs in the request handler (off the event loop), so a schema that cannot be compiled or
that admits no output is a 400 before anything is queued.
"""

from __future__ import annotations

from typing import Any

from devstral.engine.constraints import ConstraintFactory
from devstral.grammar.compile import compile_grammar
from devstral.grammar.constraint import GrammarError
from devstral.grammar.json_output import ANY_OBJECT, json_grammar
from devstral.grammar.tool_calls import tool_call_grammar
from devstral.server.errors import APIError


def answer_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON Schema an OpenAI `response_format` asks for, or None for text."""
    if not response_format or response_format.get("type", "text") == "text":
        return None
    if response_format["type"] == "json_object":
        return ANY_OBJECT
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise APIError(400, "response_format.json_schema.schema: a JSON Schema object is required",
                       param="response_format.json_schema.schema")
    return spec["schema"]


def ollama_schema(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """Ollama's `format`: "" or None for text, "json" for any JSON object, or a JSON Schema."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return ANY_OBJECT
    if isinstance(fmt, dict):
        return fmt
    raise APIError(400, f"format: expected 'json' or a JSON schema, got {fmt!r}", param="format")


def output_constraint(tokenizer: Any, *, tools: list[dict[str, Any]] | None, tool_choice: Any,
                      parallel_tool_calls: bool | None, answer: dict[str, Any] | None, strict_tools: bool,
                      answer_field: str = "response_format", prefix_ids: list[int] | None = None
                      ) -> ConstraintFactory | None:
    """The `SamplingParams.constraint` factory for a request, or None when the output is free.

    `tools` are the tools the model is told about (None when tool_choice is "none"); `prefix_ids`
    are the tokens of an assistant message being continued, which the grammar must accept first."""
    named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    forced = tool_choice == "required" or named is not None
    if tools and (forced or strict_tools or answer is not None):
        chosen = [t for t in tools if t["function"]["name"] == named] if named else tools
        field = "tools"
        try:
            grammar = tool_call_grammar(tokenizer, chosen, required=forced, parallel=parallel_tool_calls is not False,
                                        json_schema=None if forced else answer)
        except GrammarError as e:
            raise APIError(400, str(e), param=field) from None
    elif answer is not None:
        field = answer_field
        try:
            grammar = json_grammar(answer, field=field)
        except GrammarError as e:
            raise APIError(400, str(e), param=field) from None
    else:
        return None
    try:
        compiled = compile_grammar(tokenizer, grammar, field=field, prefix_ids=prefix_ids)
    except GrammarError as e:
        raise APIError(400, str(e), param=field) from None
    return compiled.constraint
