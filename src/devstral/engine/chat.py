"""Chat on top of `LLM.stream`: encode the request, generate with control tokens visible, parse tool calls.

`stream_chat` yields dicts shaped like `choices[0]` of OpenAI's streaming chunks; `chat` drains the
same stream, so the two can never disagree. The stream object also carries, once exhausted, the
full `ChatResult` (message, finish_reason, usage, ids, timings) for servers that need usage last.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from devstral.engine.outputs import PENDING
from devstral.prompt.images import keep_images
from devstral.prompt.system_prompt import DEFAULT
from devstral.prompt.tool_calls import (
    ArgumentsDelta,
    ContentDelta,
    Delta,
    IdFactory,
    ToolCallStart,
    ToolCallStream,
    random_call_id,
)


@dataclass
class ChatResult:
    """One assistant turn. `message` is OpenAI-shaped: {"role", "content", "tool_calls"}.

    `finish_reason` is "tool_calls" when the model called tools and stopped by itself, else what
    generation said: "stop", "length" (a call cut off there is flagged "malformed") or "cancelled".
    """

    message: dict[str, Any]
    finish_reason: str
    usage: dict[str, int]
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the raw output, control tokens included
    timings: dict[str, float] = field(default_factory=dict)


class ChatStream:
    """Iterate for OpenAI-shaped deltas; afterwards `.result` (and `.usage`) hold the whole turn.

    The prompt is encoded when the stream is made, so a bad request raises right there; the first
    delta (the role) comes after the prefill and the first token, so a context overflow raises on the
    first `next()` and never mid-stream.
    """

    def __init__(self, llm, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 sampling=None, *, system_prompt: str | None | object = DEFAULT,
                 make_id: IdFactory = random_call_id, prompt_token_ids: list[int] | None = None,
                 parse_tool_calls: bool = True, **stream_kw: Any):
        self.llm = llm
        kw = {} if system_prompt is DEFAULT else {"system_prompt": system_prompt}
        # A caller that already encoded the request (a server checking the context) passes the ids.
        self.prompt_token_ids: list[int] = (keep_images(prompt_token_ids) if prompt_token_ids is not None
                                            else llm.tokenizer.encode_chat(messages, tools, **kw))
        # Without tools (or with tool_choice "none") whatever the model writes is content, even a
        # [TOOL_CALLS] marker: a client that offered no tools must never receive tool calls.
        self._parser = (ToolCallStream(_parser_version(llm.tokenizer), make_id=make_id) if parse_tool_calls
                        else _PlainText())
        self._sampling, self._stream_kw = sampling, stream_kw
        self.result: ChatResult | None = None
        self._iterator: Iterator[dict[str, Any]] | None = None

    @property
    def usage(self) -> dict[str, int] | None:
        return self.result.usage if self.result else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._iterator is None:
            steps = self.llm.stream(self.prompt_token_ids, self._sampling, special=True, **self._stream_kw)
            # The generator holds this object weakly: a consumer that drops the stream early (a server
            # whose client left, Ctrl-C in `devstral chat`) frees it at once, and with it the engine's
            # sequence; a reference cycle would leave the engine generating until garbage collection.
            self._iterator = _deltas(weakref.ref(self), steps, self._parser, self.prompt_token_ids)
        return self._iterator


def _deltas(owner: weakref.ref[ChatStream], steps: Iterator[Any], parser: ToolCallStream,
            prompt_token_ids: list[int]) -> Iterator[dict[str, Any]]:
    try:
        # Run the prefill and the first token before the first delta, so a context overflow or a
        # bad parameter raises before a server has sent anything.
        first = next(steps, None)
        while first is PENDING:  # only with yield_prefill=True: hand control back to the engine's driver
            yield first
            first = next(steps, None)
        yield {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        token_ids, text, finish, cached, timings = [], [], "stop", 0, {}
        for step in itertools.chain([first] if first is not None else [], steps):
            if step is PENDING:
                yield step
                continue
            if step.token_id is not None:
                token_ids.append(step.token_id)
            if step.text:
                text.append(step.text)
                yield from _choices(parser.feed(step.text))
            if step.finish_reason:
                finish, cached, timings = step.finish_reason, step.cached_tokens or 0, step.timings
        yield from _choices(parser.finish())
        content, calls = parser.result()
        if calls and finish == "stop":
            finish = "tool_calls"
        n_prompt = len(prompt_token_ids)
        result = ChatResult(
            message={"role": "assistant", "content": content if content or not calls else None,
                     "tool_calls": calls or None},
            finish_reason=finish,
            usage={"prompt_tokens": n_prompt, "completion_tokens": len(token_ids),
                   "total_tokens": n_prompt + len(token_ids), "prompt_tokens_details": {"cached_tokens": cached}},
            prompt_token_ids=list(prompt_token_ids), token_ids=token_ids, text="".join(text),
            timings=dict(timings))
        stream = owner()
        if stream is not None:
            stream.result = result
        yield {"index": 0, "delta": {}, "finish_reason": finish}
    finally:
        steps.close()  # closing these deltas ends the sequence now

class _PlainText:
    """The ToolCallStream interface for output that is all content."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def feed(self, piece: str) -> list[Delta]:
        self._parts.append(piece)
        return [ContentDelta(piece)]

    def finish(self) -> list[Delta]:
        return []

    def result(self) -> tuple[str, list[dict[str, Any]]]:
        return "".join(self._parts), []


def _choices(deltas: list[Delta]) -> Iterator[dict[str, Any]]:
    for d in deltas:
        if isinstance(d, ContentDelta):
            yield {"index": 0, "delta": {"content": d.text}, "finish_reason": None}
        elif isinstance(d, ToolCallStart):
            yield {"index": 0, "finish_reason": None, "delta": {"tool_calls": [
                {"index": d.index, "id": d.id, "type": "function", "function": {"name": d.name, "arguments": ""}}]}}
        elif isinstance(d, ArgumentsDelta):
            yield {"index": 0, "finish_reason": None, "delta": {"tool_calls": [
                {"index": d.index, "function": {"arguments": d.text}}]}}
        # ToolCallEnd has no OpenAI counterpart; a malformed call is flagged in the final result


def _parser_version(tokenizer) -> str:
    version = getattr(tokenizer, "version", "v13")
    return version if isinstance(version, str) and version.startswith("v") else "v13"


def stream_chat(llm, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, sampling=None,
                **kw: Any) -> ChatStream:
    """OpenAI-shaped streaming deltas. Keyword arguments: system_prompt, make_id, prompt_token_ids
    (the request already encoded), parse_tool_calls (False: everything is content), and what
    `LLM.stream` takes (should_stop, cache)."""
    return ChatStream(llm, messages, tools, sampling, **kw)


def chat(llm, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, sampling=None,
         **kw: Any) -> ChatResult:
    stream = ChatStream(llm, messages, tools, sampling, **kw)
    for _ in stream:
        pass
    assert stream.result is not None
    return stream.result
