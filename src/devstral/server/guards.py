"""Pure-ASGI guards in front of the routes: who may talk to the server, and how bodies are read.

- `HostGuardMiddleware` (DNS rebinding): a web page can make a browser send requests to
  127.0.0.1 under a name the attacker controls (the page's own name, re-pointed at 127.0.0.1), and
  the server has no API key by default. Such requests carry the attacker's name in `Host`, and the
  page's in `Origin`. Both must name this machine: localhost names, loopback addresses, the bound
  address, or an `--allowed-host`; other requests get 403. When bound to every address (0.0.0.0
  or ::), any IP address and this machine's host name are allowed too: an IP address cannot be
  re-pointed. Origins of desktop apps and editor webviews (app://, file://, tauri://,
  vscode-webview://, vscode-file://) are allowed as Ollama allows them; "null" is not (any page
  can send it from a sandboxed frame).
- `JSONBodyMiddleware`: a body is JSON whatever its Content-Type says, as Ollama reads it
  (litellm's `ollama_chat/` sends none, `curl -d` sends a form type). Safe because cross-site
  requests, the only ones a browser sends with such types unasked, are refused by the Origin check.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from devstral.server.middleware import ASGIApp, Receive, Scope, Send, send_error

LOCAL_NAMES = {"localhost", "localhost.localdomain"}
APP_ORIGIN_SCHEMES = {"app", "file", "tauri", "vscode-webview", "vscode-file"}
_WITH_BODY = {"POST", "PUT", "PATCH"}


def split_host(value: str) -> str:
    """The host part of a Host header value: "name:port", "[::1]:8080", "1.2.3.4"."""
    value = value.strip()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


class HostPolicy:
    """Which host names (from Host or Origin) may reach a server bound to `bound_host`."""

    def __init__(self, bound_host: str, allowed: list[str] | None = None):
        self.bound = bound_host.strip("[]").lower()
        self.any = False
        self.exact: set[str] = set()
        self.suffixes: list[str] = []
        for entry in allowed or []:
            name = entry.strip().lower().rstrip(".")
            if name == "*":
                self.any = True
            elif name.startswith("*."):
                self.suffixes.append(name[1:])  # "*.example.com" -> ".example.com"
            elif name:
                self.exact.add(split_host(name) if not _is_ip(name) else name.strip("[]"))
        self.all_interfaces = self.bound in ("0.0.0.0", "::", "")
        if self.all_interfaces:
            machine = socket.gethostname().lower()
            self.exact |= {machine, machine + ".local"}

    def allows(self, host: str) -> bool:
        name = host.strip().strip("[]").lower().rstrip(".")
        if self.any or not name:
            return True
        if name in LOCAL_NAMES or name.endswith(".localhost") or name == self.bound or name in self.exact:
            return True
        if any(name.endswith(s) for s in self.suffixes):
            return True
        ip = _ip(name)
        if ip is not None:
            return ip.is_loopback or self.all_interfaces or (_ip(self.bound) == ip)
        return False


def _ip(text: str) -> Any:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_ip(text: str) -> bool:
    return _ip(text.strip("[]")) is not None


class HostGuardMiddleware:
    def __init__(self, app: ASGIApp, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.policy.any:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = split_host(headers.get(b"host", b"").decode("latin-1"))
        if host and not self.policy.allows(host):
            await send_error(scope, send, 403, f"host {host!r} is not allowed (DNS rebinding protection); "
                                               f"start the server with --allowed-host {host} to accept it")
            return
        origin = headers.get(b"origin")
        if origin is not None and not self._origin_allowed(origin.decode("latin-1")):
            await send_error(scope, send, 403, f"origin {origin.decode('latin-1')!r} is not allowed (requests from "
                                               "web pages of other sites are refused); --allowed-host NAME allows "
                                               "pages served from NAME")
            return
        await self.app(scope, receive, send)

    def _origin_allowed(self, origin: str) -> bool:
        try:
            parts = urlsplit(origin.strip())
        except ValueError:
            return False
        if parts.scheme in APP_ORIGIN_SCHEMES:
            return True
        return parts.scheme in ("http", "https") and bool(parts.hostname) and self.policy.allows(parts.hostname)


class JSONBodyMiddleware:
    """Marks every request body as JSON (application/json) before the routes parse it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _WITH_BODY:
            given = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
            if given != b"application/json" and not given.endswith(b"+json"):
                headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
