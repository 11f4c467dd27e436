"""Fill-in-the-middle routes: Mistral's `POST /v1/fim/completions` and llama.cpp's `POST /infill`.

Both encode with prompt/fim.py (mistral-common's FIM request encoding) and generate the middle as a
plain continuation of the prefix. `/v1/fim/completions` answers in Mistral's shape (a chat
completion whose message is the middle; SSE chunks when streaming). `/infill` answers like
llama-server, for editor plugins (llama.vim, llama.vscode): extra files as context, a prompt cut to
fit the context nearest the cursor, `t_max_predict_ms` and `n_indent`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import Field

from devstral.engine.outputs import PENDING, StepOutput
from devstral.engine.token_masks import min_tokens
from devstral.prompt.fim import encode_fim, infill_ids
from devstral.server.completions import check_fits, text_job
from devstral.server.sampling_args import sampling_params
from devstral.server.schemas import SamplingFields, StopList, _Body
from devstral.server.sse import SSE_HEADERS, sse, sse_done, sse_error
from devstral.server.state import ServerState, collect, started, state_of
from devstral.server.validation import check_model

router = APIRouter()


class FIMCompletionRequest(SamplingFields):
    """Mistral's FIM request; `random_seed` is Mistral's name for `seed`."""

    prompt: str = Field(description="the code before the cursor")
    suffix: str | None = Field(default=None, description="the code after the cursor")
    min_tokens: int | None = Field(default=None, ge=0)
    random_seed: int | None = Field(default=None, ge=0, le=2**64 - 1)


def with_min_tokens(state: ServerState, params: Any, n: int | None) -> Any:
    if n:
        if params.max_tokens is not None and n > params.max_tokens:
            from devstral.server.errors import APIError

            raise APIError(400, f"min_tokens ({n}) is larger than max_tokens ({params.max_tokens})",
                           param="min_tokens")
        tok = state.llm.tokenizer
        params.constraint = min_tokens(state.llm.config.vocab_size, {tok.eos_id, *params.stop_token_ids}, n)
    return params


@router.post("/v1/fim/completions")
async def fim_completions(body: FIMCompletionRequest, request: Request):
    state = state_of(request)
    llm = state.llm
    check_model(body.model, state.names)
    params = sampling_params(llm.default_sampling, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                             min_p=body.min_p, repeat_penalty=body.repeat_penalty,
                             seed=body.random_seed if body.random_seed is not None else body.seed,
                             max_tokens=body.max_tokens, stop=body.stop)
    params = with_min_tokens(state, params, body.min_tokens)
    ids = await run_in_threadpool(encode_fim, llm.tokenizer, body.prompt, body.suffix)
    check_fits(state, len(ids), params.max_tokens)
    handle = state.submit(text_job(llm, ids, params))
    cid, created, name = f"fim-{uuid.uuid4().hex}", int(time.time()), state.name
    t0 = time.perf_counter()

    def usage(n_out: int) -> dict[str, int]:
        state.metrics.tokens(len(ids), n_out, time.perf_counter() - t0)
        return {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}

    if not body.stream:
        steps: list[StepOutput] = await collect(handle, request)
        finish = next((s.finish_reason for s in steps if s.finish_reason), "length")
        n_out = sum(s.token_id is not None for s in steps)
        message = {"role": "assistant", "content": "".join(s.text for s in steps), "tool_calls": None,
                   "prefix": False}
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage(n_out)}

    events = await started(handle)
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name}

    async def stream() -> AsyncIterator[str]:
        n_out = 0
        yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})
        try:
            async for step in events:
                n_out += step.token_id is not None
                if step.text or step.finish_reason:
                    yield sse({**head, "choices": [{"index": 0, "delta": {"content": step.text},
                                                    "finish_reason": step.finish_reason}],
                               **({"usage": usage(n_out)} if step.finish_reason else {})})
        except Exception as e:
            yield sse_error(e)
            return
        yield sse_done()

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


# ---------------------------------------------------------------- llama.cpp's /infill
class ExtraFile(_Body):
    filename: str = ""
    text: str = ""


class InfillRequest(_Body):
    model: str | None = None
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraFile] = Field(default_factory=list, max_length=256)
    prompt: str = Field(default="", description="text the middle already starts with (after the prefix)")
    n_predict: int = Field(default=-1, ge=-1)
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    top_p: float | None = Field(default=None, gt=0, le=1)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=100)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=-1, le=2**64 - 1)
    stop: StopList = None
    stream: bool = False
    t_max_predict_ms: int = Field(default=0, ge=0, description="stop after this long once a line is complete")
    n_indent: int = Field(default=0, ge=0, description="stop at a new line indented less than this")


# Without n_predict the prompt keeps this much room for the answer when it must be cut to fit.
INFILL_RESERVE = 256


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def infill_job(llm: Any, ids: list[int], params: Any, *, t_max_ms: int, n_indent: int):
    """The engine stream with llama.cpp's editor limits applied on the engine thread.

    `n_indent`: text after a newline is held until its first non-blank character shows the line's
    indentation; a line indented less than `n_indent` ends the answer before its newline.
    `t_max_ms`: once a newline has been generated, the answer ends when this much time has passed
    since the first token.
    """

    def run(cache: Any, should_stop: Any) -> Iterator[StepOutput]:
        first_at: float | None = None
        seen_newline, held, stop = False, "", None
        steps = llm.stream(ids, params, should_stop=should_stop, cache=cache, yield_prefill=True)
        try:
            for step in steps:
                if step is PENDING:  # waiting for the engine: the worker steps it
                    yield step
                    continue
                if first_at is None:
                    first_at = time.perf_counter()
                text, finish = held + step.text, step.finish_reason
                held = ""
                if n_indent and "\n" in text:
                    cut, text, held = _split_indent(text, n_indent)
                    if cut:
                        stop = "indent"
                        yield replace(step, text=text, finish_reason=None)
                        break
                seen_newline = seen_newline or "\n" in text
                if finish:
                    text, held = text + held, ""
                yield replace(step, text=text)  # the final event keeps its timings and cached tokens
                if finish:
                    return
                if t_max_ms and seen_newline and (time.perf_counter() - first_at) * 1000 > t_max_ms:
                    stop = "time"
                    break
        finally:
            steps.close()
        if stop is not None:
            yield StepOutput(None, held if stop == "time" else "", "stop")

    return run


def _split_indent(text: str, n_indent: int) -> tuple[bool, str, str]:
    """(cut, text to emit, text to hold): cut at the first new line indented less than n_indent."""
    start = 0
    while True:
        nl = text.find("\n", start)
        if nl < 0:
            return False, text, ""
        line = text[nl + 1:]
        end = line.find("\n")
        head = line if end < 0 else line[:end]
        if not head.strip(" \t"):  # indentation not known yet (blank so far, or an empty line)
            if end < 0:
                return False, text[:nl], text[nl:]
            start = nl + 1
            continue
        if _indent_of(head) < n_indent:
            return True, text[:nl], ""
        start = nl + 1


@router.post("/infill")
async def infill(body: InfillRequest, request: Request):
    state = state_of(request)
    llm = state.llm
    check_model(body.model, state.names)
    max_tokens = body.n_predict if body.n_predict > 0 else None
    params = sampling_params(llm.default_sampling, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                             min_p=body.min_p, repeat_penalty=body.repeat_penalty, repeat_last_n=body.repeat_last_n,
                             seed=None if body.seed in (None, -1) else body.seed, max_tokens=max_tokens,
                             stop=body.stop)
    reserve = max_tokens or min(INFILL_RESERVE, llm.max_context // 4)
    extra = [(f.filename, f.text) for f in body.input_extra]
    prompt = await run_in_threadpool(infill_ids, llm.tokenizer, body.input_prefix + body.prompt, body.input_suffix,
                                     extra=extra, budget=llm.max_context - reserve)
    ids = prompt.ids
    check_fits(state, len(ids), params.max_tokens)
    t0 = time.perf_counter_ns()
    handle = state.submit(infill_job(llm, ids, params, t_max_ms=body.t_max_predict_ms, n_indent=body.n_indent))
    name = state.name

    def final(text: str, n_out: int, finish: str, cached: int) -> dict[str, Any]:
        end = time.perf_counter_ns()
        first = handle.first_event_ns or end
        prompt_ms, predicted_ms = (first - t0) / 1e6, (end - first) / 1e6
        state.metrics.tokens(len(ids), n_out, (end - t0) / 1e9)
        stop_type = {"stop": "eos", "length": "limit"}.get(finish, "limit")
        return {"index": 0, "content": text, "tokens": [], "id_slot": -1, "stop": True, "model": name,
                "tokens_predicted": n_out, "tokens_evaluated": len(ids), "truncated": prompt.truncated,
                "stop_type": stop_type, "stopping_word": "", "tokens_cached": cached, "has_new_line": "\n" in text,
                "timings": {"prompt_n": len(ids), "prompt_ms": prompt_ms,
                            "prompt_per_token_ms": prompt_ms / max(len(ids), 1),
                            "prompt_per_second": len(ids) / max(prompt_ms / 1e3, 1e-9),
                            "predicted_n": n_out, "predicted_ms": predicted_ms,
                            "predicted_per_token_ms": predicted_ms / max(n_out, 1),
                            "predicted_per_second": n_out / max(predicted_ms / 1e3, 1e-9)}}

    if not body.stream:
        steps: list[StepOutput] = await collect(handle, request)
        finish = next((s.finish_reason for s in steps if s.finish_reason), "length")
        cached = next((s.cached_tokens or 0 for s in steps if s.finish_reason), 0)
        return final("".join(s.text for s in steps), sum(s.token_id is not None for s in steps), finish, cached)

    events = await started(handle)

    async def stream() -> AsyncIterator[str]:
        parts: list[str] = []
        n_out, finish, cached = 0, "length", 0
        try:
            async for step in events:
                n_out += step.token_id is not None
                finish = step.finish_reason or finish
                cached = step.cached_tokens or cached
                if step.text:
                    parts.append(step.text)
                    yield sse({"index": 0, "content": step.text, "tokens": [] if step.token_id is None
                               else [step.token_id], "stop": False, "id_slot": -1, "tokens_predicted": n_out,
                               "tokens_evaluated": len(ids)})
        except Exception as e:
            yield sse_error(e)
            return
        yield sse({**final("".join(parts), n_out, finish, cached), "content": ""})

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
