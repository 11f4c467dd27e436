"""What every route shares: the model, the engine worker, the counters and the served names."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request

from devstral.server.errors import APIError
from devstral.server.metrics import Metrics
from devstral.server.remote import RemoteConfig
from devstral.server.residency import DEFAULT, Residency
from devstral.server.responses_store import ResponseStore
from devstral.server.worker import EngineWorker, JobFn, JobHandle, QueueFull
from devstral.store import ModelStore

RETRY_AFTER_S = 2


@dataclass
class ServerConfig:
    model_id: str  # what --model named (folder name, file stem or org/repo)
    alias: str | None = None
    api_key: str | None = None
    parallel: int = 1
    max_queue: int = 64
    max_body_bytes: int = 16 * 1024 * 1024
    created: int = 0  # unix time the model was loaded, for /v1/models
    keep_alive: float | None = None  # seconds an idle model stays in memory; None: forever (Ollama: 5m)
    loader: Callable[[], Any] | None = None  # reloads the model after keep_alive unloaded it
    max_embedding_inputs: int = 2048
    max_embedding_tokens: int = 65536
    store_dir: Path | None = None  # the local model store (default: devstral/store.py's store_dir())
    remote: RemoteConfig | None = None  # hybrid routing (serve --remote); None: nothing leaves the machine
    strict_tools: bool = False  # constrain tool calls to the declared tools under tool_choice "auto" too
    host: str = "127.0.0.1"  # the bound address: requests must name it (or localhost) in Host and Origin
    allowed_hosts: list[str] | None = None  # more names they may use (--allowed-host; "*" for any)
    body_timeout_s: float | None = 30.0  # a request body must arrive within this (None: no limit)
    allow_remote_images: bool = False  # fetch http(s) image URLs (--allow-remote-images); else data: URLs only


class ServerState:
    def __init__(self, llm: Any, config: ServerConfig):
        self.llm, self.config = llm, config
        self.worker = EngineWorker(llm, parallel=config.parallel, max_queue=config.max_queue)
        self.metrics = Metrics()
        self.residency = Residency(llm, loader=config.loader, default_keep_alive=config.keep_alive)
        self.responses = ResponseStore()  # /v1/responses kept for previous_response_id (memory only)
        self.store = ModelStore(config.store_dir)

    @property
    def name(self) -> str:
        return self.config.alias or self.config.model_id

    @property
    def names(self) -> list[str]:
        return [n for n in (self.config.alias, self.config.model_id) if n]

    def submit(self, fn: JobFn, keep_alive: Any = DEFAULT) -> JobHandle:
        """Queue an engine job (weights reloaded first if keep_alive had unloaded them)."""
        try:
            return self.worker.submit(self.residency.job(fn, keep_alive))
        except QueueFull as e:
            raise APIError(503, f"server busy: {e}; retry later", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None


def state_of(request: Request) -> ServerState:
    return request.app.state.devstral


async def started(handle: JobHandle) -> AsyncIterator[Any]:
    """Wait for the job's first event, so that an error before any output (a prompt that does not
    fit, a bad template) is still an ordinary HTTP error; then iterate every event from the start."""
    events = handle.__aiter__()
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        handle.cancel()
        raise

    async def chained() -> AsyncIterator[Any]:
        try:
            if first is not None:
                yield first
                async for event in events:
                    yield event
        finally:
            handle.cancel()
            await events.aclose()

    return chained()


async def collect(handle: JobHandle, request: Request) -> list[Any]:
    """All events of a non-streaming job; cancels it if the client goes away meanwhile."""

    async def watch() -> None:
        while True:
            await asyncio.sleep(0.25)
            if await request.is_disconnected():
                handle.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return [event async for event in handle]
    finally:
        watcher.cancel()
