"""POST /v1/completions: raw prompts (strings or token ids, with a FIM `suffix`) in, text out, streamed or not.

`n` and a list of prompts make one engine job per choice (server/fanout.py).
"""

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
from devstral.prompt.fim import encode_fim
from devstral.server.errors import APIError
from devstral.server.fanout import MAX_CHOICES, collect_all, merge, start_all, submit_all
from devstral.server.sampling_args import sampling_params
from devstral.server.schemas import CompletionRequest
from devstral.server.sse import SSE_HEADERS, sse, sse_done, sse_error
from devstral.server.state import ServerState, state_of
from devstral.server.validation import check_model

router = APIRouter()


def prompt_list(prompt: str | list[int] | list[str] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's prompt forms as a list of single prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: empty list", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def prompt_ids(state: ServerState, prompt: str | list[int], suffix: str | None = None) -> list[int]:
    """One prompt's ids: raw text after one BOS, token ids as given, or a FIM prompt with `suffix`."""
    llm = state.llm
    if isinstance(prompt, str):
        if suffix is not None:
            return encode_fim(llm.tokenizer, prompt, suffix)
        return llm.encode_prompt(prompt)
    if suffix is not None:
        raise APIError(400, "suffix: fill-in-the-middle needs a text prompt, not token ids", param="suffix")
    ids = [int(i) for i in prompt]
    if not ids:
        raise APIError(400, "prompt: empty token list", param="prompt")
    vocab = llm.config.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(400, f"prompt: token id {bad} is out of range [0, {vocab})", param="prompt")
    return ids


def choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j of n gets seed + j: reproducible, and the n samples differ."""
    return None if seed is None else seed + j


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
    if body.suffix is not None and body.echo:
        raise APIError(400, "echo: not available with suffix (fill-in-the-middle)", param="echo")
    prompts = prompt_list(body.prompt)
    n = body.n
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"n x prompts: at most {MAX_CHOICES} completions per request, asked for "
                            f"{len(prompts) * n}", param="n")

    def params_for(j: int) -> Any:
        return sampling_params(state.llm.default_sampling, temperature=body.temperature, top_p=body.top_p,
                               top_k=body.top_k, min_p=body.min_p, repeat_penalty=body.repeat_penalty,
                               seed=choice_seed(body.seed, j), max_tokens=body.max_tokens, stop=body.stop,
                               logprobs=body.logprobs)

    # long prompts: keep the loop free while encoding
    all_ids = await run_in_threadpool(lambda: [prompt_ids(state, p, body.suffix) for p in prompts])
    first_params = params_for(0)
    for ids in all_ids:
        check_fits(state, len(ids), first_params.max_tokens)
    llm = state.llm
    # choice index i * n + j: prompt i, sample j
    jobs = [(ids, params_for(j)) for ids in all_ids for j in range(n)]
    handles = submit_all(state, [text_job(llm, ids, params) for ids, params in jobs])
    cid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.name
    echoes = [llm.tokenizer.decode(ids) if body.echo else "" for ids, _ in jobs]
    n_prompt = sum(len(ids) for ids in all_ids)
    t0 = time.perf_counter()

    def chunk(index: int, text: str, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]}

    def usage(n_out: int, cached: list[int]) -> dict[str, Any]:
        state.metrics.tokens(n_prompt, n_out, time.perf_counter() - t0)
        # choices of one prompt share it: count its cached tokens once (the best of its choices)
        per_prompt = [max(cached[i * n:(i + 1) * n], default=0) for i in range(len(all_ids))]
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
                "prompt_tokens_details": {"cached_tokens": sum(per_prompt)}}

    if not body.stream:
        choices, n_out, cached = [], 0, []
        for index, steps in enumerate(await collect_all(handles, request)):
            text = echoes[index] + "".join(s.text for s in steps)
            finish = next((s.finish_reason for s in steps if s.finish_reason), "length")
            sampled = [s for s in steps if s.token_id is not None]
            n_out += len(sampled)
            cached.append(next((s.cached_tokens or 0 for s in steps if s.finish_reason), 0))
            lp = (completion_logprobs(llm.tokenizer, sampled, len(echoes[index]))
                  if body.logprobs is not None else None)
            choices.append(chunk(index, text, finish, lp)["choices"][0])
        return {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices,
                "usage": usage(n_out, cached)}

    streams = await start_all(handles)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def stream() -> AsyncIterator[str]:
        n_out, offsets, cached = 0, [len(e) for e in echoes], [0] * len(echoes)
        extra = {"usage": None} if include_usage else {}
        for index, echo in enumerate(echoes):
            if echo:
                yield sse({**chunk(index, echo, None), **extra})
        try:
            async for index, step in merge(streams):
                if step.token_id is not None:
                    n_out += 1
                if step.finish_reason:
                    cached[index] = step.cached_tokens or 0
                if not step.text and not step.finish_reason and body.logprobs is None:
                    continue
                lp = None
                if body.logprobs is not None and step.token_id is not None:
                    lp = completion_logprobs(llm.tokenizer, [step], offsets[index])
                offsets[index] += len(step.text)
                yield sse({**chunk(index, step.text, step.finish_reason, lp), **extra})
        except Exception as e:
            yield sse_error(e)
            return
        final_usage = usage(n_out, cached)
        if include_usage:
            yield sse({"id": cid, "object": "text_completion", "created": created, "model": name, "choices": [],
                       "usage": final_usage})
        yield sse_done()

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


def text_job(llm: Any, ids: list[int], params: Any):
    """The engine job of one raw completion."""
    return lambda cache, should_stop: llm.stream(ids, params, should_stop=should_stop, cache=cache,
                                                 yield_prefill=True)
