"""The chat engine as a worker job, and the accumulator that turns its deltas into one message.

`devstral.engine.chat.stream_chat` yields OpenAI-chunk-shaped `choices[0]` items (content and
tool-call deltas, then a finish_reason). The OpenAI route forwards them; the non-streaming and
Ollama paths fold them with `ChatOutput`, so both paths share one source of truth.

Between the chat engine and the model sits `_ServingLLM`, which sees every sampled token. It adds
what serving needs and the chat engine does not know about: per-token logprobs, and
`parallel_tool_calls: false` (generation ends where a second call would begin). `tool_choice` and
structured output are grammar constraints (server/structured.py) carried by the sampling parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from devstral.engine.generate import PREFILL_PROGRESS, StepOutput
from devstral.engine.sampling import SamplingParams
from devstral.server.worker import JobFn

TOOL_CALLS = "[TOOL_CALLS]"


class _ServingLLM:
    """Looks like the LLM to the chat engine; records the sampled steps and stops at a second call."""

    def __init__(self, llm: Any, single_call: bool):
        self._llm, self.single_call = llm, single_call
        self.steps: list[StepOutput] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None, **kw: Any) -> Iterator[StepOutput]:
        calls_seen = 0
        call_id = self._llm.tokenizer.special_id(TOOL_CALLS)
        for step in self._llm.stream(prompt_ids, params, **kw):
            if step.token_id is not None and step.token_id == call_id:
                calls_seen += 1
                if self.single_call and calls_seen > 1:  # parallel_tool_calls=false: one call only
                    yield StepOutput(None, "", "stop")
                    return
            if step.token_id is not None:
                self.steps.append(step)
            yield step


def chat_logprobs(tokenizer: Any, steps: list[StepOutput]) -> list[dict[str, Any]]:
    """OpenAI's chat logprobs entries: token text, its logprob and bytes, and the top alternatives."""
    def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
        text = tokenizer.decode([token_id], special=True)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(s.token_id, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in (s.top_logprobs or [])]}
            for s in steps if s.token_id is not None]


def chat_job(llm: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
             params: SamplingParams, *, parallel_tool_calls: bool | None = None,
             prompt_ids: list[int] | None = None) -> JobFn:
    """`prompt_ids`: the handler's encoding of the same request, so the engine thread never re-encodes.
    Without `tools` the output is all content: nothing is parsed as a tool call."""
    want_logprobs = params.logprobs is not None

    def run(cache: Any, should_stop: Any) -> Iterator[dict[str, Any]]:
        from devstral.engine.chat import stream_chat

        serving = _ServingLLM(llm, single_call=bool(tools) and parallel_tool_calls is False)
        stream = stream_chat(serving, messages, tools=tools, sampling=params, should_stop=should_stop, cache=cache,
                             prompt_token_ids=prompt_ids, yield_prefill=True, parse_tool_calls=bool(tools))
        sent = 0
        for item in stream:
            if item is PREFILL_PROGRESS:  # the worker runs other requests between prefill chunks
                yield item
                continue
            item = dict(item)
            if want_logprobs:
                item["logprobs"] = {"content": chat_logprobs(llm.tokenizer, serving.steps[sent:])}
                sent = len(serving.steps)
            if item.get("finish_reason") and stream.usage:
                item["usage"] = stream.usage
            yield item

    return run


def normalize_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exactly OpenAI's tool-call fields (the parser may add markers such as `malformed`)."""
    out = []
    for call in calls:
        clean: dict[str, Any] = {k: call[k] for k in ("index", "id", "type") if call.get(k) is not None}
        fn = call.get("function") or {}
        clean["function"] = {k: fn[k] for k in ("name", "arguments") if fn.get(k) is not None}
        out.append(clean)
    return out


class ChatOutput:
    """Folds streamed choice deltas into the final message, finish reason, usage and logprobs."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason = "length"
        self.prompt_tokens: int | None = None
        self.cached_tokens = 0  # prompt tokens the engine's prefix cache served
        self.completion_tokens = 0
        self.logprobs: list[dict[str, Any]] = []

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        if delta.get("content"):
            self.parts.append(delta["content"])
        for call in delta.get("tool_calls") or []:
            slot = self.calls.setdefault(call.get("index", len(self.calls)),
                                         {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            if call.get("id"):
                slot["id"] = call["id"]
            fn = call.get("function") or {}
            slot["function"]["name"] += fn.get("name") or ""
            slot["function"]["arguments"] += fn.get("arguments") or ""
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        usage = choice.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
            self.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", self.cached_tokens)
        logprobs = choice.get("logprobs")
        if logprobs:
            self.logprobs.extend(logprobs.get("content") or [])

    @property
    def content(self) -> str:
        return "".join(self.parts)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [self.calls[i] for i in sorted(self.calls)]
