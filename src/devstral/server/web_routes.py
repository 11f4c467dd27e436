"""The web chat at `/`: one static page (server/web/: HTML, JS, CSS written by hand, no build step, no
CDN) that talks only to this server's own OpenAI routes and /metrics.

Browsers ask for HTML and get the page under a strict Content-Security-Policy (scripts, styles and
requests from this origin only, no inline code, no framing); anything else asking for `/` (probes,
curl) still gets the one-line liveness text. The page and its two files are open without the API key,
like /health: they hold no data, and every request the page makes carries the key the user types.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

from devstral.server.errors import APIError

router = APIRouter()
WEB = Path(__file__).with_name("web")
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return (WEB / name).read_bytes()


@router.get("/", include_in_schema=False)
async def root(request: Request):
    if "text/html" not in request.headers.get("accept", ""):
        return PlainTextResponse("devstral is running")
    return HTMLResponse(_read("index.html"), headers=SECURITY_HEADERS)


@router.get("/web/{name}", include_in_schema=False)
async def asset(name: str):
    if name not in ASSETS:
        raise APIError(404, f"no such file: /web/{name}")
    return Response(_read(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)
