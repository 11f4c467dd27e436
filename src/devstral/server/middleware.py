"""Pure-ASGI layers in front of the routes: API key, body-size limit, per-route request counts.

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses and client disconnects pass
through untouched.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from devstral.server.errors import error_body
from devstral.server.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# answered without an API key: liveness probes, and the web chat's page and files (they hold no data;
# the page sends the key the user types with every request)
OPEN_PATHS = {"/", "/health"}
OPEN_PREFIXES = ("/web/",)


async def send_error(scope: Scope, send: Send, status: int, message: str,
                     headers: dict[str, str] | None = None) -> None:
    if scope["path"].startswith("/api/"):
        payload: dict[str, Any] = {"error": message}
    else:
        payload = error_body(status, message)
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app, self.key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.key or scope["path"] in OPEN_PATHS \
                or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get(b"x-api-key", b"").decode("latin-1")
        if not token or not hmac.compare_digest(token.encode(), self.key.encode()):
            await send_error(scope, send, 401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                             {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the body up front (JSON requests are small) so an oversized one gets a clean 413, and
    one that does not arrive within `timeout_s` in all (a client that sends half a body and waits)
    a 408 that closes the connection, instead of holding it open forever."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_big = f"request body is larger than the limit of {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(scope, send, 413, too_big)
            return
        chunks, size = [], 0
        deadline = None if self.timeout_s is None else asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                message = await (receive() if deadline is None else
                                 asyncio.wait_for(receive(), max(deadline - asyncio.get_running_loop().time(), 0)))
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                await send_error(scope, send, 408, f"the request body did not arrive within {self.timeout_s:g} s",
                                 {"Connection": "close"})
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_error(scope, send, 413, too_big)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notifications

        await self.app(scope, replay, send)


class RequestCountMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: set[str]):
        self.app, self.metrics, self.known = app, metrics, known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.known else "other"
        counted = False

        async def counting_send(message: Message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True  # counted before the answer leaves, so a client's next request sees it
                self.metrics.request(route, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not counted:
                self.metrics.request(route, 500)
