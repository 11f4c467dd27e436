"""OpenAI's Responses API: `POST /v1/responses` (text, function tools, streaming events,
`previous_response_id`), `GET` and `DELETE /v1/responses/{id}`.

A request becomes chat messages (responses_items.py) and runs as an ordinary chat job; its deltas
become output items, or, streamed, the event sequence the openai client's `responses.stream`
accumulates: created, in_progress, output_item.added, content_part.added, output_text.delta ...
done, function_call_arguments.delta ... done, output_item.done, then completed (or incomplete when
max_output_tokens cut the answer). Stored responses live in memory (responses_store.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import Field

from devstral.server.chat_session import ChatOutput, chat_job
from devstral.server.completions import check_fits
from devstral.server.errors import APIError
from devstral.server.images import image_url_checker
from devstral.server.responses_items import (
    call_item,
    chat_tool_choice,
    chat_tools,
    input_messages,
    message_item,
    new_id,
    output_messages,
)
from devstral.server.responses_store import ResponseStore, StoredResponse
from devstral.server.sampling_args import sampling_params
from devstral.server.schemas import _Body
from devstral.server.sse import SSE_HEADERS, sse
from devstral.server.state import ServerState, collect, started, state_of
from devstral.server.structured import answer_schema, output_constraint
from devstral.server.validation import check_model, check_tools

router = APIRouter()


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[dict[str, Any]] = Field(description="a string, or message / function_call / "
                                                          "function_call_output items")
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=100)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None


def store_of(state: ServerState) -> ResponseStore:
    return state.responses


def _text_format(text: dict[str, Any] | None) -> dict[str, Any]:
    fmt = (text or {}).get("format") or {"type": "text"}
    if fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, f"text.format.type: {fmt.get('type')!r} is not supported (text, json_object and "
                            "json_schema are)", param="text.format.type")
    return {"format": fmt}


def _answer_schema(fmt: dict[str, Any]) -> dict[str, Any] | None:
    """`text.format` as chat's response_format (the Responses API puts the schema in the format itself)."""
    if fmt["type"] == "json_schema":
        return answer_schema({"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}})
    return answer_schema(fmt)


class Turn:
    """The response being built: its object, and the fold of the chat deltas into output items."""

    def __init__(self, body: ResponsesRequest, name: str, text: dict[str, Any]):
        self.id, self.created = new_id("resp"), int(time.time())
        self.body, self.name, self.text = body, name, text
        self.usage: dict[str, Any] | None = None

    def response(self, status: str, output: list[dict[str, Any]], finish: str | None = None) -> dict[str, Any]:
        b = self.body
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
                "incomplete_details": incomplete, "instructions": b.instructions,
                "max_output_tokens": b.max_output_tokens, "model": self.name, "output": output,
                "parallel_tool_calls": b.parallel_tool_calls is not False,
                "previous_response_id": b.previous_response_id, "reasoning": {"effort": None, "summary": None},
                "store": b.store, "temperature": b.temperature, "top_p": b.top_p, "text": self.text,
                "tool_choice": b.tool_choice or "auto", "tools": b.tools or [], "truncation": b.truncation or "disabled",
                "usage": self.usage, "user": b.user, "metadata": b.metadata or {}}


def _usage(out: ChatOutput, n_prompt: int) -> dict[str, Any]:
    prompt = out.prompt_tokens if out.prompt_tokens is not None else n_prompt
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + out.completion_tokens}


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    state = state_of(request)
    llm, store = state.llm, store_of(state)
    check_model(body.model, state.names)
    text = _text_format(body.text)
    tools, tool_choice = chat_tools(body.tools), chat_tool_choice(body.tool_choice)
    check_tools(tools, tool_choice)
    if tool_choice == "none":
        tools = None
    history = store.conversation(body.previous_response_id) if body.previous_response_id else []
    new_messages = await run_in_threadpool(  # images are decoded, and fetched with --allow-remote-images
        input_messages, body.input, image_url_checker(llm, allow_remote=state.config.allow_remote_images))
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) \
        + history + new_messages
    if not any(m["role"] != "system" for m in messages):
        raise APIError(400, "input: nothing to answer", param="input")
    params = sampling_params(llm.default_sampling, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                             min_p=body.min_p, repeat_penalty=body.repeat_penalty, seed=body.seed,
                             max_tokens=body.max_output_tokens)
    answer = _answer_schema(text["format"])

    def prepare() -> list[int]:  # encoding and grammar compilation: off the event loop
        params.constraint = output_constraint(
            llm.tokenizer, tools=tools, tool_choice=tool_choice, parallel_tool_calls=body.parallel_tool_calls,
            answer=answer, strict_tools=state.config.strict_tools, answer_field="text.format.schema")
        return llm.tokenizer.encode_chat(messages, tools)

    prompt_ids = await run_in_threadpool(prepare)
    check_fits(state, len(prompt_ids), params.max_tokens)
    handle = state.submit(chat_job(llm, messages, tools, params, prompt_ids=prompt_ids,
                                   parallel_tool_calls=body.parallel_tool_calls))
    turn = Turn(body, state.name, text)
    t0 = time.perf_counter()

    def finish(out: ChatOutput, output: list[dict[str, Any]]) -> dict[str, Any]:
        turn.usage = _usage(out, len(prompt_ids))
        state.metrics.tokens(turn.usage["input_tokens"], out.completion_tokens, time.perf_counter() - t0)
        status = "incomplete" if out.finish_reason == "length" else "completed"
        response = turn.response(status, output)
        if body.store:
            store.put(turn.id, StoredResponse(response, new_messages + output_messages(output),
                                              body.previous_response_id))
        return response

    if not body.stream:
        out = ChatOutput()
        for delta in await collect(handle, request):
            out.add(delta)
        status = "incomplete" if out.finish_reason == "length" else "completed"
        output = ([message_item(new_id("msg"), out.content, status)] if out.content or not out.tool_calls else [])
        output += [call_item(new_id("fc"), call, "completed") for call in out.tool_calls]
        return finish(out, output)

    events = await started(handle)
    return StreamingResponse(_stream(turn, events, finish), media_type="text/event-stream", headers=SSE_HEADERS)


async def _stream(turn: Turn, events: AsyncIterator[dict[str, Any]], finish) -> AsyncIterator[str]:
    seq = 0
    out = ChatOutput()
    output: list[dict[str, Any]] = []
    open_text: dict[str, Any] | None = None  # the message item receiving text
    open_calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its function_call item

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        return sse({"type": kind, "sequence_number": seq - 1, **fields})

    def close_text(status: str = "completed") -> list[str]:
        nonlocal open_text
        if open_text is None:
            return []
        item, index = open_text, output.index(open_text)
        text = item["content"][0]["text"]
        item["status"] = status
        open_text = None
        return [event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                      text=text, logprobs=[]),
                event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                      part=item["content"][0]),
                event("response.output_item.done", output_index=index, item=item)]

    def close_call(item: dict[str, Any]) -> list[str]:
        index = output.index(item)
        item["status"] = "completed"
        return [event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                      arguments=item["arguments"], name=item["name"]),
                event("response.output_item.done", output_index=index, item=item)]

    yield event("response.created", response=turn.response("in_progress", []))
    yield event("response.in_progress", response=turn.response("in_progress", []))
    try:
        async for delta in events:
            out.add(delta)
            change = delta.get("delta") or {}
            if change.get("content"):
                if open_text is None:
                    open_text = message_item(new_id("msg"), "", "in_progress")
                    open_text["content"] = []
                    output.append(open_text)
                    index = len(output) - 1
                    yield event("response.output_item.added", output_index=index,
                                item={**open_text, "content": []})
                    open_text["content"] = [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]
                    yield event("response.content_part.added", item_id=open_text["id"], output_index=index,
                                content_index=0, part=dict(open_text["content"][0]))
                open_text["content"][0]["text"] += change["content"]
                yield event("response.output_text.delta", item_id=open_text["id"], output_index=output.index(open_text),
                            content_index=0, delta=change["content"], logprobs=[])
            for call in change.get("tool_calls") or []:
                fn = call.get("function") or {}
                item = open_calls.get(call.get("index", 0))
                if item is None:
                    for line in close_text():
                        yield line
                    for other in list(open_calls.values()):
                        if other["status"] == "in_progress":
                            for line in close_call(other):
                                yield line
                    item = call_item(new_id("fc"), {"id": call.get("id") or new_id("call"),
                                                    "function": {"name": fn.get("name") or "", "arguments": ""}},
                                     "in_progress")
                    open_calls[call.get("index", 0)] = item
                    output.append(item)
                    yield event("response.output_item.added", output_index=len(output) - 1, item=dict(item))
                if fn.get("arguments"):
                    item["arguments"] += fn["arguments"]
                    yield event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=output.index(item), delta=fn["arguments"])
    except Exception as e:
        from devstral.server.errors import from_exception

        err = from_exception(e)
        yield event("error", code=err.code, message=err.message, param=err.param)
        return
    for line in close_text("incomplete" if out.finish_reason == "length" else "completed"):
        yield line
    for item in open_calls.values():
        if item["status"] == "in_progress":
            for line in close_call(item):
                yield line
    response = finish(out, output)
    kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    yield event(kind, response=response)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    return store_of(state_of(request)).get(response_id).response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    store_of(state_of(request)).delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}
