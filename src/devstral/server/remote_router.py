"""The pure-ASGI layer that forwards the requests the route policy sends out (server/remote.py).

It sits inside the API-key and body-size layers, so a request is authenticated and bounded before
anything is decided; it reads the JSON body, and either replays it to the local routes untouched
or sends a masked copy to the remote and streams the answer back byte for byte (SSE included).
It exists only when `--remote` is given.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from devstral.server.middleware import ASGIApp, Message, Receive, Scope, Send, send_error
from devstral.server.remote import ROUTED_PATHS, SIZED_PATHS, Masker, RemoteConfig

log = logging.getLogger("devstral.server")
PASSED_HEADERS = (b"content-type", b"cache-control", b"x-request-id")


class RemoteRouter:
    def __init__(self, app: ASGIApp, remote: RemoteConfig, state: Any):
        self.app, self.remote, self.state = app, remote, state
        self.masker = Masker(extra=[remote.api_key] if remote.api_key else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ROUTED_PATHS:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        upstream = await self._decide(scope["path"], raw)
        if upstream is None:
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": raw, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self._forward(scope, send, json.loads(raw), upstream)

    async def _decide(self, path: str, raw: bytes) -> str | None:
        """The upstream model name when the request goes out, else None."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None  # the local route answers the 400
        if not isinstance(body, dict):
            return None
        policy = self.remote.policy
        model = body.get("model")
        if isinstance(model, str) and model in policy.aliases:
            return policy.aliases[model]
        if policy.max_local_prompt is not None and path in SIZED_PATHS:
            from fastapi.concurrency import run_in_threadpool

            n = await run_in_threadpool(self._prompt_tokens, path, body)
            if n is not None and n > policy.max_local_prompt:
                return policy.default_upstream
        return None

    def _prompt_tokens(self, path: str, body: dict[str, Any]) -> int | None:
        """The prompt's size by this model's tokenizer; None when it cannot be encoded (the local route
        will say why)."""
        tok = self.state.llm.tokenizer
        try:
            if path == "/v1/chat/completions":
                return len(tok.encode_chat(body.get("messages") or [], body.get("tools")))
            prompt = body.get("prompt")
            texts = [prompt] if isinstance(prompt, str) else [p for p in prompt or [] if isinstance(p, str)]
            total = sum(len(tok.encode(t)) for t in texts) + len(tok.encode(str(body.get("suffix") or "")))
            if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
                total += len(prompt)
            return total
        except Exception:
            return None

    async def _forward(self, scope: Scope, send: Send, body: dict[str, Any], upstream: str) -> None:
        import httpx

        masked = self.masker.mask_json({**body, "model": upstream})
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        if self.remote.api_key:
            headers["authorization"] = f"Bearer {self.remote.api_key}"
        url = self.remote.target(scope["path"])
        log.info("forwarding %s to the remote endpoint as model %r", scope["path"], upstream)
        timeout = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=10.0)
        started = False
        try:
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
                request = client.build_request("POST", url, content=json.dumps(masked).encode(), headers=headers)
                response = await client.send(request, stream=True)
                try:
                    out = [(k.encode(), v.encode()) for k, v in response.headers.items()
                           if k.lower().encode() in PASSED_HEADERS]
                    out.append((b"x-devstral-route", b"remote"))
                    await send({"type": "http.response.start", "status": response.status_code, "headers": out})
                    started = True
                    async for chunk in response.aiter_bytes():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                finally:
                    await response.aclose()
        except httpx.HTTPError as e:
            if started:  # the status line is gone: end the body; the client sees a cut stream
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send_error(scope, send, 502, f"remote endpoint {self.remote.url} failed: {type(e).__name__}: "
                                               f"{str(e)[:200]}")
