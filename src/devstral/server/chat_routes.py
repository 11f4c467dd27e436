"""POST /v1/chat/completions: messages and tools in; a message, or SSE chunks in OpenAI's shape, out."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from devstral.prompt.chat import continued_prefix
from devstral.server.chat_session import ChatOutput, chat_job, normalize_tool_calls
from devstral.server.completions import check_fits, choice_seed
from devstral.server.errors import APIError
from devstral.server.fanout import collect_all, merge, start_all, submit_all
from devstral.server.images import check_content_parts, fetch_remote_images
from devstral.server.info_routes import dump_messages, dump_tools
from devstral.server.sampling_args import sampling_params
from devstral.server.schemas import ChatCompletionRequest
from devstral.server.sse import SSE_HEADERS, sse, sse_done, sse_error
from devstral.server.state import state_of
from devstral.server.structured import answer_schema, output_constraint
from devstral.server.validation import check_model, check_tools

router = APIRouter()


def _tool_choice(body: ChatCompletionRequest) -> str | dict[str, Any] | None:
    choice = body.tool_choice
    return choice.model_dump() if hasattr(choice, "model_dump") else choice


def _clean_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """A delta from the chat engine as OpenAI's chunk `choices[0]`: only OpenAI's keys."""
    delta = dict(choice.get("delta") or {})
    if delta.get("tool_calls"):
        delta["tool_calls"] = normalize_tool_calls(delta["tool_calls"])
    return {"index": 0, "delta": delta, "logprobs": choice.get("logprobs"),
            "finish_reason": choice.get("finish_reason")}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = state_of(request)
    llm = state.llm
    check_model(body.model, state.names)
    tools = dump_tools(body.tools)
    tool_choice = _tool_choice(body)
    check_tools(tools, tool_choice)
    if tool_choice == "none":
        tools = None  # the model is not told about tools it may not call
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree; send one", param="max_tokens")
    answer = answer_schema(body.response_format.model_dump() if body.response_format else None)
    top = body.top_logprobs if body.top_logprobs is not None else 0

    def params_for(j: int) -> Any:  # choice j of n
        return sampling_params(llm.default_sampling, temperature=body.temperature, top_p=body.top_p,
                               top_k=body.top_k, min_p=body.min_p, repeat_penalty=body.repeat_penalty,
                               seed=choice_seed(body.seed, j), max_tokens=body.max_completion_tokens or body.max_tokens,
                               stop=body.stop, logprobs=top if body.logprobs else None)

    params = params_for(0)
    messages = dump_messages(body.messages)
    if check_content_parts(messages, llm, allow_remote=state.config.allow_remote_images):
        messages = await run_in_threadpool(fetch_remote_images, messages)

    constraint = None

    def prepare() -> list[int]:  # encoding and grammar compilation: off the event loop
        nonlocal constraint
        ids = llm.tokenizer.encode_chat(messages, tools)
        prefill = continued_prefix(messages)
        constraint = output_constraint(
            llm.tokenizer, tools=tools, tool_choice=tool_choice, parallel_tool_calls=body.parallel_tool_calls,
            answer=answer, strict_tools=state.config.strict_tools,
            answer_field="response_format.json_schema.schema" if body.response_format
            and body.response_format.type == "json_schema" else "response_format",
            prefix_ids=llm.tokenizer.encode(prefill) if prefill else None)
        return ids

    prompt_ids = await run_in_threadpool(prepare)

    def constrained(j: int) -> Any:  # one grammar state per choice: the factory makes it per sequence
        p = params_for(j)
        p.constraint = constraint
        return p

    n_prompt = len(prompt_ids)
    check_fits(state, n_prompt, params.max_tokens)
    handles = submit_all(state, [chat_job(llm, messages, tools, constrained(j), prompt_ids=prompt_ids,
                                          parallel_tool_calls=body.parallel_tool_calls) for j in range(body.n)])
    cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.name
    t0 = time.perf_counter()

    def usage(outs: list[ChatOutput]) -> dict[str, Any]:
        prompt = next((o.prompt_tokens for o in outs if o.prompt_tokens is not None), n_prompt)
        completion = sum(o.completion_tokens for o in outs)
        state.metrics.tokens(prompt, completion, time.perf_counter() - t0)
        # the choices share one prompt: the prefix cache serves it to all but the first
        cached = max((o.cached_tokens for o in outs), default=0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    if not body.stream:
        outs, choices = [], []
        for index, events in enumerate(await collect_all(handles, request)):
            out = ChatOutput()
            for choice in events:
                out.add(choice)
            message: dict[str, Any] = {"role": "assistant", "content": out.content or None}
            if out.tool_calls:
                message["tool_calls"] = normalize_tool_calls(out.tool_calls)
            elif message["content"] is None:
                message["content"] = ""
            logprobs = {"content": out.logprobs} if body.logprobs else None
            outs.append(out)
            choices.append({"index": index, "message": message, "logprobs": logprobs,
                            "finish_reason": out.finish_reason})
        return {"id": cid, "object": "chat.completion", "created": created, "model": name, "choices": choices,
                "usage": usage(outs)}

    streams = await start_all(handles)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name}
    extra = {"usage": None} if include_usage else {}

    async def stream() -> AsyncIterator[str]:
        outs = [ChatOutput() for _ in streams]
        sent_role = [False] * len(streams)
        try:
            async for index, choice in merge(streams):
                outs[index].add(choice)
                clean = {**_clean_choice(choice), "index": index}
                if not sent_role[index]:
                    clean["delta"] = {"role": "assistant", **clean["delta"]}
                    sent_role[index] = True
                if not clean["delta"] and clean["finish_reason"] is None and clean["logprobs"] is None:
                    continue
                yield sse({**head, "choices": [clean], **extra})
        except Exception as e:
            yield sse_error(e)
            return
        final_usage = usage(outs)
        if include_usage:
            yield sse({**head, "choices": [], "usage": final_usage})
        yield sse_done()

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
