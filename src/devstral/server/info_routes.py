"""Routes that do not generate: models, health, metrics, tokenize/detokenize, apply-template."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from devstral.engine.embed import embedding_info
from devstral.server.errors import APIError
from devstral.server.images import check_content_parts, fetch_remote_images, takes_images
from devstral.server.schemas import ApplyTemplateRequest, DetokenizeRequest, TokenizeRequest
from devstral.server.state import state_of
from devstral.server.validation import check_tools
from devstral.server.version import server_version

router = APIRouter()


def model_card(request: Request) -> dict[str, Any]:
    state = state_of(request)
    llm = state.llm
    d = llm.default_sampling
    return {"id": state.name, "object": "model", "created": state.config.created, "owned_by": "devstral",
            "context_length": llm.max_context, "max_model_len": llm.max_context,
            "default_sampling": {"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
                                 "min_p": d.min_p, "max_tokens": d.max_tokens},
            "meta": {"n_ctx_train": llm.config.max_position_embeddings, "n_vocab": llm.config.vocab_size,
                     "n_params": llm.config.n_params, "architecture": llm.config.arch,
                     "n_embd": llm.config.dim, "embedding": embedding_info(llm)}}


@router.get("/v1/models")
async def list_models(request: Request):
    remote = state_of(request).config.remote
    aliases = [{"id": name, "object": "model", "created": 0, "owned_by": "remote", "meta": {"upstream": upstream}}
               for name, upstream in (remote.policy.aliases.items() if remote else [])]
    return {"object": "list", "data": [model_card(request), *aliases]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    state = state_of(request)
    if model_id not in state.names:
        raise APIError(404, f"model {model_id!r} not found; this server serves {state.name!r}", param="model",
                       code="model_not_found")
    return model_card(request)


@router.get("/health")
async def health(request: Request):
    worker = state_of(request).worker
    return {"status": "ok", "slots_idle": worker.parallel - worker.active, "slots_processing": worker.active,
            "queue_depth": worker.queue_depth}


@router.get("/props")
async def props(request: Request):
    """llama.cpp server's /props, the fields its clients and our web page read: the context size, the
    sampling a request gets when it names none (the model's defaults), and the slot count."""
    state = state_of(request)
    llm, sampling = state.llm, state.llm.default_sampling
    params = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
              "min_p": sampling.min_p, "repeat_penalty": sampling.repeat_penalty,
              "repeat_last_n": sampling.repeat_last_n, "seed": sampling.seed, "max_tokens": sampling.max_tokens}
    return {"default_generation_settings": {"n_ctx": llm.max_context, "params": params},
            "total_slots": state.worker.parallel, "model_alias": state.name, "model_path": state.config.model_id,
            "modalities": {"vision": takes_images(llm), "audio": False}, "build_info": f"devstral {server_version()}"}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    state = state_of(request)
    return PlainTextResponse(state.metrics.render(state.worker), media_type="text/plain; version=0.0.4")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    tok = state_of(request).llm.tokenizer
    ids = await run_in_threadpool(tok.encode, body.content, bos=body.add_special)
    if not body.with_pieces:
        return {"tokens": ids}
    return {"tokens": [{"id": i, "piece": tok.decode([i], special=True)} for i in ids]}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    llm = state_of(request).llm
    bad = next((i for i in body.tokens if not 0 <= i < llm.tokenizer.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"tokens: id {bad} is out of range [0, {llm.tokenizer.vocab_size})", param="tokens")
    return {"content": llm.tokenizer.decode(body.tokens)}


def dump_messages(messages: list[Any]) -> list[dict[str, Any]]:
    return [m.model_dump(exclude_none=True) for m in messages]


def dump_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


@router.post("/apply-template")
async def apply_template(body: ApplyTemplateRequest, request: Request):
    """The prompt a chat request becomes (llama.cpp's route): text and ids, each image part as the
    [IMG]/[IMG_BREAK]/[IMG_END] tokens the model sees, checked (and fetched) as a chat request's are."""
    state = state_of(request)
    llm = state.llm
    tools = dump_tools(body.tools)
    check_tools(tools)
    messages = dump_messages(body.messages)
    if check_content_parts(messages, llm, allow_remote=state.config.allow_remote_images):
        messages = await run_in_threadpool(fetch_remote_images, messages)
    ids = await run_in_threadpool(llm.tokenizer.encode_chat, messages, tools)
    return {"prompt": llm.tokenizer.decode(ids, special=True), "tokens": list(ids)}
