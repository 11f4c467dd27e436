"""The browser chat at `/`: static files shipped in the package (server/web/), served by the same app.

The page talks only to this server's own OpenAI routes, with the same API key and Host/Origin rules
as any client. What protects the page from the model's output (untrusted text) is its Content-Security-
Policy: scripts only from this origin, no inline script, no connections elsewhere, and Trusted Types
enforced so that no string can become HTML through `innerHTML` and its kin even by mistake; the page
builds every element with DOM calls and puts model text in text nodes.

`GET /` answers the page to browsers (they ask for text/html) and the one-line liveness text to
everything else (curl, probes and the Ollama tools that check the root), as before.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from devstral.server.errors import APIError

router = APIRouter()

WEB_DIR = Path(__file__).parent / "web"
ASSET_PREFIX = "/web/"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
CSP = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:", "connect-src 'self'",
    "manifest-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
    "require-trusted-types-for 'script'", "trusted-types 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidated by ETag: an upgraded package's files are used at once
}


@functools.cache
def _asset(name: str) -> tuple[bytes, str, str] | None:
    """(content, media type, ETag) of a shipped file; None for anything else (no path is ever joined
    from the request: only names listed in the folder are served)."""
    files = {p.name: p for p in WEB_DIR.iterdir() if p.is_file() and p.suffix in TYPES}
    path = files.get(name)
    if path is None:
        return None
    data = path.read_bytes()
    return data, TYPES[path.suffix], '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _serve(name: str, request: Request) -> Response:
    asset = _asset(name)
    if asset is None:
        raise APIError(404, f"no such file: {ASSET_PREFIX}{name}", code="not_found")
    data, media_type, etag = asset
    headers = {**SECURITY_HEADERS, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "").lower()


@router.get("/", include_in_schema=False)
async def root(request: Request):
    if wants_html(request):
        return _serve("index.html", request)
    return PlainTextResponse("devstral is running")


@router.get(ASSET_PREFIX + "{name}", include_in_schema=False)
async def ui_file(name: str, request: Request):
    return _serve(name, request)
