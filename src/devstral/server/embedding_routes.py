"""Embeddings: OpenAI's `POST /v1/embeddings`, Ollama's `POST /api/embed` and its legacy `/api/embeddings`.

The vectors are engine/embed.py's (mean-pooled, L2-normalized final hidden states). The model call
runs on the engine thread as an ordinary job, between other requests' tokens, never beside them.
A batch past the server's limits (inputs or tokens) is a 413; an input longer than the context is
a 400 on OpenAI's route and truncated on Ollama's unless `truncate: false`.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any, Literal

import torch
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from devstral.engine.embed import embed_batches
from devstral.engine.outputs import PENDING
from devstral.server.errors import APIError
from devstral.server.residency import DEFAULT, keep_alive_seconds
from devstral.server.schemas import OllamaOptions, _Body
from devstral.server.state import ServerState, collect, state_of
from devstral.server.validation import check_model

router = APIRouter()


class EmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, token ids, or a list of either")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class OllamaEmbedRequest(_Body):
    model: str
    input: str | list[str] = Field(default_factory=list)
    truncate: bool = True
    options: OllamaOptions | None = None
    keep_alive: str | int | float | None = None
    dimensions: int | None = Field(default=None, ge=1)


class OllamaEmbeddingsRequest(_Body):
    model: str
    prompt: str = ""
    options: OllamaOptions | None = None
    keep_alive: str | int | float | None = None


def _check_dimensions(llm: Any, dimensions: int | None) -> None:
    if dimensions is not None and dimensions != llm.config.dim:
        raise APIError(400, f"dimensions: this model's embeddings have {llm.config.dim} dimensions and cannot be "
                            "shortened (mean-pooled hidden states are not trained to be truncated)",
                       param="dimensions")


def _inputs(raw: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(raw, str):
        return [raw]
    if raw and all(isinstance(x, int) for x in raw):
        return [list(raw)]  # type: ignore[arg-type]
    return list(raw)  # type: ignore[arg-type]


def encode_inputs(state: ServerState, inputs: list[str | list[int]], *, truncate: bool) -> list[list[int]]:
    """Ids per input, within the server's limits: 413 for too many inputs or tokens, 400 for a bad one."""
    cfg, llm = state.config, state.llm
    if not inputs:
        raise APIError(400, "input: empty list", param="input")
    if len(inputs) > cfg.max_embedding_inputs:
        raise APIError(413, f"input: {len(inputs)} inputs is more than this server's limit of "
                            f"{cfg.max_embedding_inputs} per request", param="input")
    ctx, vocab = llm.max_context, llm.config.vocab_size
    out, total = [], 0
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"input.{i}: empty string", param="input")
            ids = llm.encode_prompt(item)
        else:
            ids = [int(t) for t in item]
            if not ids:
                raise APIError(400, f"input.{i}: empty token list", param="input")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"input.{i}: token id {bad} is out of range [0, {vocab})", param="input")
        if len(ids) > ctx:
            if not truncate:
                raise APIError(400, f"input.{i}: {len(ids)} tokens is longer than the context of {ctx} tokens",
                               param="input", code="context_length_exceeded")
            ids = ids[:ctx]
        total += len(ids)
        if total > cfg.max_embedding_tokens:
            raise APIError(413, f"input: more than this server's limit of {cfg.max_embedding_tokens} tokens per "
                                "embedding request; send fewer or shorter inputs", param="input")
        out.append(ids)
    return out


def embed_job(llm: Any, seqs: list[list[int]]):
    """One job for the whole batch; other requests run between its forward passes."""
    def run(cache: Any, should_stop: Any) -> Iterator[Any]:
        out = torch.empty(len(seqs), llm.config.dim)
        for group, vectors in embed_batches(llm, seqs):
            out[group] = vectors
            if should_stop():
                return
            yield PENDING  # the engine steps the other requests between two of our forwards
        yield out

    return run


async def run_embeddings(state: ServerState, request: Request, seqs: list[list[int]],
                         keep_alive: Any = DEFAULT) -> torch.Tensor:
    if getattr(state.llm, "tp", None) is not None:
        raise APIError(400, "embeddings are not available on a server started with --tensor-parallel")
    t0 = time.perf_counter()
    events = await collect(state.submit(embed_job(state.llm, seqs), keep_alive), request)
    vectors = next((e for e in events if isinstance(e, torch.Tensor)), None)
    if vectors is None:
        raise APIError(503, "the embedding job was cancelled (server stopping)")
    state.metrics.tokens(sum(len(s) for s in seqs), 0, time.perf_counter() - t0)
    return vectors


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    state = state_of(request)
    check_model(body.model, state.names)
    _check_dimensions(state.llm, body.dimensions)
    seqs = await run_in_threadpool(encode_inputs, state, _inputs(body.input), truncate=False)
    vectors = await run_embeddings(state, request, seqs)

    def encoded(v: torch.Tensor) -> list[float] | str:
        if body.encoding_format == "base64":  # little-endian float32, what the openai client decodes
            return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
        return v.tolist()

    n = sum(len(s) for s in seqs)
    return {"object": "list", "model": state.name,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": n, "total_tokens": n}}


@router.post("/api/embed")
async def ollama_embed(body: OllamaEmbedRequest, request: Request):
    state = state_of(request)
    check_model(body.model, state.names)
    _check_dimensions(state.llm, body.dimensions)
    keep_alive = keep_alive_seconds(body.keep_alive)
    t0 = time.perf_counter_ns()
    seqs = await run_in_threadpool(encode_inputs, state, _inputs(body.input), truncate=body.truncate)
    vectors = await run_embeddings(state, request, seqs, keep_alive)
    return {"model": state.name, "embeddings": vectors.tolist(), "total_duration": time.perf_counter_ns() - t0,
            "load_duration": 0, "prompt_eval_count": sum(len(s) for s in seqs)}


@router.post("/api/embeddings")
async def ollama_embeddings(body: OllamaEmbeddingsRequest, request: Request):
    state = state_of(request)
    check_model(body.model, state.names)
    keep_alive = keep_alive_seconds(body.keep_alive)
    if not body.prompt:
        return {"embedding": []}
    seqs = await run_in_threadpool(encode_inputs, state, [body.prompt], truncate=True)
    vectors = await run_embeddings(state, request, seqs, keep_alive)
    return {"embedding": vectors[0].tolist()}
