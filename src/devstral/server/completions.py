"""POST /v1/completions: a raw prompt (string or token ids) in, text out, streamed or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from devstral.engine.generate import StepOutput
from devstral.errors import ContextOverflowError
from devstral.server.errors import APIError
from devstral.server.sampling_args import sampling_params
from devstral.server.schemas import CompletionRequest
from devstral.server.sse import SSE_HEADERS, sse, sse_done, sse_error
from devstral.server.state import ServerState, collect, started, state_of
from devstral.server.validation import check_model

router = APIRouter()


def prompt_ids(state: ServerState, prompt: str | list[int] | list[str]) -> list[int]:
    llm = state.llm
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, "prompt: only one prompt per request is supported (n=1)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return llm.encode_prompt(prompt)
    ids = [int(i) for i in prompt]
    if not ids:
        raise APIError(400, "prompt: empty token list", param="prompt")
    vocab = llm.config.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(400, f"prompt: token id {bad} is out of range [0, {vocab})", param="prompt")
    return ids


def check_fits(state: ServerState, n_prompt: int, max_tokens: int | None) -> None:
    ctx = state.llm.max_context
    if n_prompt >= ctx or (max_tokens is not None and n_prompt + max_tokens > ctx):
        raise ContextOverflowError(n_prompt, ctx, max_tokens or 0)


def completion_logprobs(tokenizer: Any, steps: list[StepOutput], offset: int) -> dict[str, Any]:
    """The legacy completions logprobs object: parallel lists over the sampled tokens."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for step in steps:
        piece = tokenizer.decode([step.token_id], special=True)
        tokens.append(piece)
        token_lps.append(step.logprob)
        tops.append({tokenizer.decode([t], special=True): lp for t, lp in (step.top_logprobs or [])})
        offsets.append(offset)
        offset += len(step.text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = state_of(request)
    check_model(body.model, state.names)
    if (body.model_extra or {}).get("suffix"):
        raise APIError(400, "suffix: fill-in-the-middle is not supported by this server yet", param="suffix")
    params = sampling_params(state.llm.default_sampling, temperature=body.temperature, top_p=body.top_p,
                             top_k=body.top_k, min_p=body.min_p, repeat_penalty=body.repeat_penalty,
                             seed=body.seed, max_tokens=body.max_tokens, stop=body.stop, logprobs=body.logprobs)
    ids = await run_in_threadpool(prompt_ids, state, body.prompt)  # long prompts: keep the loop free
    check_fits(state, len(ids), params.max_tokens)
    llm = state.llm
    handle = state.submit(lambda cache, should_stop: llm.stream(ids, params, should_stop=should_stop, cache=cache,
                                                                yield_prefill=True))
    cid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.name
    echo = llm.tokenizer.decode(ids) if body.echo else ""
    t0 = time.perf_counter()

    def chunk(text: str, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}]}

    def usage(n_out: int, cached: int | None) -> dict[str, Any]:
        state.metrics.tokens(len(ids), n_out, time.perf_counter() - t0)
        return {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out,
                "prompt_tokens_details": {"cached_tokens": cached or 0}}

    if not body.stream:
        steps: list[StepOutput] = await collect(handle, request)
        text = echo + "".join(s.text for s in steps)
        finish = next((s.finish_reason for s in steps if s.finish_reason), "length")
        sampled = [s for s in steps if s.token_id is not None]
        lp = completion_logprobs(llm.tokenizer, sampled, len(echo)) if body.logprobs is not None else None
        cached = next((s.cached_tokens for s in steps if s.finish_reason), 0)
        return {**chunk(text, finish, lp), "usage": usage(len(sampled), cached)}

    events = await started(handle)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def stream() -> AsyncIterator[str]:
        n_out, offset, cached = 0, len(echo), 0
        extra = {"usage": None} if include_usage else {}
        if echo:
            yield sse({**chunk(echo, None), **extra})
        try:
            async for step in events:
                if step.token_id is not None:
                    n_out += 1
                if step.finish_reason:
                    cached = step.cached_tokens
                if not step.text and not step.finish_reason and body.logprobs is None:
                    continue
                lp = None
                if body.logprobs is not None and step.token_id is not None:
                    lp = completion_logprobs(llm.tokenizer, [step], offset)
                offset += len(step.text)
                yield sse({**chunk(step.text, step.finish_reason, lp), **extra})
        except Exception as e:
            yield sse_error(e)
            return
        final_usage = usage(n_out, cached)
        if include_usage:
            yield sse({"id": cid, "object": "text_completion", "created": created, "model": name, "choices": [],
                       "usage": final_usage})
        yield sse_done()

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
