"""Ollama's API: /api/chat and /api/generate (NDJSON streaming on by default); model information is in
ollama_models.py and the model store's routes in ollama_store_routes.py.

Ollama differs from OpenAI in ways clients depend on: tool-call arguments are JSON objects, not
strings; durations are integers in nanoseconds; the last line of a stream carries `done: true`
with the counts and timings.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from devstral.engine.sampling import SamplingParams
from devstral.prompt.chat import continued_prefix
from devstral.prompt.fim import encode_fim
from devstral.prompt.images import continue_prompt
from devstral.server.chat_session import ChatOutput, chat_job
from devstral.server.completions import check_fits
from devstral.server.errors import APIError
from devstral.server.images import ollama_image_parts
from devstral.server.residency import keep_alive_seconds
from devstral.server.sampling_args import sampling_params
from devstral.server.schemas import OllamaChatRequest, OllamaGenerateRequest, OllamaOptions
from devstral.server.sse import ndjson, ndjson_error
from devstral.server.state import ServerState, collect, started, state_of
from devstral.server.structured import ollama_schema, output_constraint
from devstral.server.thinking import ThinkSplitter, ban_think_token
from devstral.server.validation import check_model, check_tools

router = APIRouter()
NDJSON = "application/x-ndjson"


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def ollama_params(state: ServerState, options: OllamaOptions | None, n_prompt: int) -> SamplingParams:
    o = options or OllamaOptions()
    ctx = min(o.num_ctx or state.llm.max_context, state.llm.max_context)
    max_tokens = o.num_predict if o.num_predict and o.num_predict > 0 else None
    if o.num_ctx:  # a smaller per-request context bounds the answer; a larger one cannot be granted
        room = ctx - n_prompt
        if room < 1:
            from devstral.errors import ContextOverflowError

            raise ContextOverflowError(n_prompt, ctx, max_tokens or 0)
        max_tokens = min(max_tokens or room, room)
    return sampling_params(state.llm.default_sampling, temperature=o.temperature, top_p=o.top_p, top_k=o.top_k,
                           min_p=o.min_p, repeat_penalty=o.repeat_penalty, repeat_last_n=o.repeat_last_n,
                           seed=o.seed, max_tokens=max_tokens, stop=o.stop)


class Timer:
    """Ollama's timing fields (integer nanoseconds) for one request."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter_ns()
        self.first: int | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter_ns()

    def fields(self, n_prompt: int, n_out: int, first_event_ns: int | None = None) -> dict[str, int]:
        """`first_event_ns`: when the engine made the first token (the worker stamps it)."""
        end = time.perf_counter_ns()
        first = first_event_ns or self.first or end
        return {"total_duration": end - self.t0, "load_duration": 0, "prompt_eval_count": n_prompt,
                "prompt_eval_duration": first - self.t0, "eval_count": n_out, "eval_duration": end - first}


# ---------------------------------------------------------------- load / unload
async def load_or_unload(state: ServerState, keep_alive: Any, reply: dict[str, Any]) -> dict[str, Any]:
    """A request with nothing to generate: keep_alive 0 unloads the model (`ollama stop`), anything
    else loads it and sets how long it stays."""
    base = {"model": state.name, "created_at": now_rfc3339(), **reply, "done": True}
    if keep_alive == 0:
        state.residency.unload_soon()
        return {**base, "done_reason": "unload"}
    async for _ in state.submit(lambda cache, should_stop: iter(()), keep_alive):
        pass
    return {**base, "done_reason": "load"}


# ---------------------------------------------------------------- /api/generate
def context_ids(state: ServerState, context: list[int]) -> list[int]:
    vocab = state.llm.config.vocab_size
    bad = next((i for i in context if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(400, f"context: token id {bad} is out of range [0, {vocab})", param="context")
    return list(context)


def generate_ids(state: ServerState, body: OllamaGenerateRequest) -> list[int]:
    """The prompt's ids. `context` (the ids a previous answer returned) is continued: the new turn
    follows it without a second BOS or system prompt."""
    llm = state.llm
    tok = llm.tokenizer
    if body.suffix:  # fill-in-the-middle: the system prompt and chat template do not apply
        if body.context:
            raise APIError(400, "context: cannot be continued by a fill-in-the-middle (suffix) request",
                           param="context")
        return encode_fim(tok, body.prompt, body.suffix)
    before = context_ids(state, body.context) if body.context else []
    if body.raw:
        return before + (tok.encode(body.prompt) if before else llm.encode_prompt(body.prompt))
    messages = ([{"role": "system", "content": body.system}] if body.system else [])
    images = ollama_image_parts(body.images, llm, "images")
    messages.append({"role": "user", "content": [*images, {"type": "text", "text": body.prompt}] if images
                     else body.prompt})
    if not before:
        return tok.encode_chat(messages, None)
    turn = tok.encode_chat(messages, None, system_prompt=None)
    return continue_prompt(before, turn, 1 if turn[:1] == [tok.bos_id] else 0)


@router.post("/api/generate")
async def generate(body: OllamaGenerateRequest, request: Request):
    state = state_of(request)
    check_model(body.model, state.names)
    answer = ollama_schema(body.format)
    if body.images and (body.raw or body.suffix):
        raise APIError(400, "images: not with raw or suffix (fill-in-the-middle) prompts", param="images")
    keep_alive = keep_alive_seconds(body.keep_alive)
    llm, name = state.llm, state.name
    if not body.prompt and not body.suffix:  # Ollama's "load the model" / "unload it" request
        return await load_or_unload(state, keep_alive, {"response": ""})
    ids = await run_in_threadpool(generate_ids, state, body)
    params = ollama_params(state, body.options, len(ids))
    if answer is not None:
        params.constraint = await run_in_threadpool(
            output_constraint, llm.tokenizer, tools=None, tool_choice=None, parallel_tool_calls=None, answer=answer,
            strict_tools=False, answer_field="format")
    if body.think is False:
        params = ban_think_token(llm, params)
    split = bool(body.think)  # the engine then shows [THINK]/[/THINK] so that they can be split off
    check_fits(state, len(ids), params.max_tokens)
    timer = Timer()
    handle = state.submit(lambda cache, should_stop: llm.stream(ids, params, should_stop=should_stop, cache=cache,
                                                                yield_prefill=True, special=split), keep_alive)

    def final(n_out: int, finish: str, out_ids: list[int]) -> dict[str, Any]:
        fields = timer.fields(len(ids), n_out, handle.first_event_ns)
        state.metrics.tokens(len(ids), n_out, (fields["total_duration"]) / 1e9)
        return {"model": name, "created_at": now_rfc3339(), "response": "", "done": True, "done_reason": finish,
                "context": [*ids, *out_ids], **fields}

    if not body.stream:
        steps = await collect(handle, request)
        out_ids = [s.token_id for s in steps if s.token_id is not None]
        if out_ids:
            timer.token()
        finish = next((s.finish_reason for s in steps if s.finish_reason), "length")
        text = "".join(s.text for s in steps)
        reply = {**final(len(out_ids), finish, out_ids), "response": text}
        if split:
            splitter = ThinkSplitter()
            thinking, answer = splitter.feed(text)
            more_thinking, more_answer = splitter.flush()
            reply |= {"thinking": thinking + more_thinking, "response": answer + more_answer}
        return reply

    events = await started(handle)

    async def stream() -> AsyncIterator[str]:
        out_ids: list[int] = []
        finish = "length"
        splitter = ThinkSplitter() if split else None

        def piece(thinking: str, answer: str) -> str:
            line = {"model": name, "created_at": now_rfc3339(), "response": answer, "done": False}
            return ndjson({**line, "thinking": thinking} if thinking else line)

        try:
            async for step in events:
                timer.token()
                if step.token_id is not None:
                    out_ids.append(step.token_id)
                if step.finish_reason:
                    finish = step.finish_reason
                if step.text:
                    thinking, answer = splitter.feed(step.text) if splitter else ("", step.text)
                    if thinking or answer:
                        yield piece(thinking, answer)
        except Exception as e:
            yield ndjson_error(e)
            return
        if splitter is not None and any(rest := splitter.flush()):
            yield piece(*rest)
        yield ndjson(final(len(out_ids), finish, out_ids))

    return StreamingResponse(stream(), media_type=NDJSON)


# ---------------------------------------------------------------- /api/chat
def openai_messages(messages: list[Any], llm: Any = None) -> list[dict[str, Any]]:
    """Ollama messages -> OpenAI ones: arguments objects become strings, tool calls get the ids
    Mistral's template pairs with the tool results (Ollama has none; results answer calls in order),
    and a user message's base64 `images` become image_url parts ahead of its text."""
    out: list[dict[str, Any]] = []
    waiting: list[tuple[str, str]] = []  # (id, name) of calls not yet answered
    counter = 0
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.images:
            if m.role != "user":
                raise APIError(400, f"messages.{i}.images: images are only accepted in user messages",
                               param=f"messages.{i}.images")
            parts = ollama_image_parts(m.images, llm, f"messages.{i}.images")
            msg["content"] = [*parts, *([{"type": "text", "text": m.content}] if m.content else [])]
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for call in m.tool_calls:
                counter += 1
                call_id = f"{counter:09d}"
                args = call.function.arguments
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": call.function.name,
                                           "arguments": args if isinstance(args, str) else json.dumps(args)}})
                waiting.append((call_id, call.function.name))
            msg["tool_calls"] = calls
        elif m.role == "tool":
            match = next((w for w in waiting if m.tool_name in (None, w[1])), None)
            if match is None:
                raise APIError(400, f"messages.{i}: a tool result with no tool call before it", param="messages")
            waiting.remove(match)
            msg["tool_call_id"], msg["name"] = match
        out.append(msg)
    return out


def ollama_tool_calls(tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"function": {"name": c["function"]["name"], "arguments": _as_object(c["function"]["arguments"])}}
            for c in tool_calls]


def _as_object(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return arguments  # the model wrote invalid JSON: hand it over as text rather than drop it


@router.post("/api/chat")
async def chat(body: OllamaChatRequest, request: Request):
    state = state_of(request)
    check_model(body.model, state.names)
    answer = ollama_schema(body.format)
    keep_alive = keep_alive_seconds(body.keep_alive)
    name = state.name
    if not body.messages:  # Ollama's "load the model" / "unload it" request
        return await load_or_unload(state, keep_alive, {"message": {"role": "assistant", "content": ""}})
    messages = openai_messages(body.messages, state.llm)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    check_tools(tools)
    tokenizer = state.llm.tokenizer

    def prepare() -> tuple[list[int], Any]:  # encoding and grammar compilation: off the event loop
        prefill = continued_prefix(messages)
        constraint = output_constraint(tokenizer, tools=tools, tool_choice="auto", parallel_tool_calls=None,
                                       answer=answer, strict_tools=state.config.strict_tools, answer_field="format",
                                       prefix_ids=tokenizer.encode(prefill) if prefill else None)
        return tokenizer.encode_chat(messages, tools), constraint

    prompt_ids, constraint = await run_in_threadpool(prepare)
    n_prompt = len(prompt_ids)
    params = ollama_params(state, body.options, n_prompt)
    params.constraint = constraint
    if body.think is False:
        params = ban_think_token(state.llm, params)
    check_fits(state, n_prompt, params.max_tokens)
    timer = Timer()
    handle = state.submit(chat_job(state.llm, messages, tools, params, prompt_ids=prompt_ids), keep_alive)

    def final(out: ChatOutput) -> dict[str, Any]:
        fields = timer.fields(out.prompt_tokens or n_prompt, out.completion_tokens, handle.first_event_ns)
        state.metrics.tokens(n_prompt, out.completion_tokens, fields["total_duration"] / 1e9)
        return {"model": name, "created_at": now_rfc3339(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "stop" if out.finish_reason == "tool_calls" else out.finish_reason,
                **fields}

    if not body.stream:
        out = ChatOutput()
        for delta in await collect(handle, request):
            timer.token()
            out.add(delta)
        splitter = ThinkSplitter()
        thinking, answer = splitter.feed(out.content)
        more_thinking, more_answer = splitter.flush()
        message: dict[str, Any] = {"role": "assistant", "content": answer + more_answer}
        if thinking or more_thinking:
            message["thinking"] = thinking + more_thinking
        if out.tool_calls:
            message["tool_calls"] = ollama_tool_calls(out.tool_calls)
        return {**final(out), "message": message}

    events = await started(handle)

    async def stream() -> AsyncIterator[str]:
        out = ChatOutput()
        splitter = ThinkSplitter()

        def piece(thinking: str, answer: str) -> str:
            message = {"role": "assistant", "content": answer, **({"thinking": thinking} if thinking else {})}
            return ndjson({"model": name, "created_at": now_rfc3339(), "message": message, "done": False})

        try:
            async for delta in events:
                timer.token()
                out.add(delta)
                text = (delta.get("delta") or {}).get("content")
                if text:
                    thinking, answer = splitter.feed(text)
                    if thinking or answer:
                        yield piece(thinking, answer)
        except Exception as e:
            yield ndjson_error(e)
            return
        if any(rest := splitter.flush()):
            yield piece(*rest)
        if out.tool_calls:  # Ollama sends calls whole, once parsed
            yield ndjson({"model": name, "created_at": now_rfc3339(),
                          "message": {"role": "assistant", "content": "",
                                      "tool_calls": ollama_tool_calls(out.tool_calls)}, "done": False})
        yield ndjson(final(out))

    return StreamingResponse(stream(), media_type=NDJSON)
