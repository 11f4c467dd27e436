"""The FastAPI application: routes, error handlers, middleware, and the engine worker's lifetime."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from devstral.server.errors import install_error_handlers
from devstral.server.guards import HostGuardMiddleware, HostPolicy, JSONBodyMiddleware
from devstral.server.middleware import APIKeyMiddleware, BodyLimitMiddleware, RequestCountMiddleware
from devstral.server.state import ServerConfig, ServerState
from devstral.server.version import server_version


def create_app(llm: Any, config: ServerConfig) -> FastAPI:
    from devstral.server import (
        chat_routes,
        completions,
        embedding_routes,
        fim_routes,
        info_routes,
        ollama_models,
        ollama_routes,
        ollama_store_routes,
        responses_routes,
        web_routes,
    )

    state = ServerState(llm, config)
    if not config.created:
        config.created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        watcher = asyncio.create_task(state.residency.watch(state))
        try:
            yield
        finally:
            watcher.cancel()
            state.worker.stop()

    app = FastAPI(title="devstral", summary="OpenAI- and Ollama-compatible server for Devstral models",
                  version=server_version(), lifespan=lifespan)
    app.state.devstral = state
    install_error_handlers(app)
    known: set[str] = set()  # route paths, the only label values /metrics uses (fuzzers send any path)
    for module in (chat_routes, completions, embedding_routes, fim_routes, info_routes, ollama_models, ollama_routes,
                   ollama_store_routes, responses_routes, web_routes):
        app.include_router(module.router)
        known |= {getattr(r, "path", "") for r in module.router.routes}
    # Outermost first on the way in: count every answer, Host/Origin, the key, size and time limits,
    # then the remote routing (only with --remote), then every body read as JSON.
    app.add_middleware(JSONBodyMiddleware)
    if config.remote is not None:
        from devstral.server.remote_router import RemoteRouter

        app.add_middleware(RemoteRouter, remote=config.remote, state=state)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(HostGuardMiddleware, policy=HostPolicy(config.host, config.allowed_hosts))
    app.add_middleware(RequestCountMiddleware, metrics=state.metrics, known_paths=known)
    return app
