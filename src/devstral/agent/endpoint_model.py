"""`ChatModel` over any OpenAI-compatible HTTP endpoint: devstral serve, vLLM, llama.cpp, Mistral's API."""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

from devstral.agent.exceptions import DeadlineExceeded
from devstral.agent.model import ChatReply, Message
from devstral.errors import DevstralError

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
# A chat completion this large is a runaway generation or not a chat completion at all.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


@dataclass
class _Answer:
    status_code: int
    headers: httpx.Headers
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class EndpointChatModel:
    provides_system_prompt = False
    sees_images = False  # set by check() from the server's /props (llama.cpp's and devstral's `modalities`)

    def __init__(self, base_url: str, model_name: str | None = None, api_key: str | None = None, *,
                 temperature: float | None = None, max_tokens: int | None = None,
                 timeout: float = 600.0, max_retries: int = 5, backoff_s: float = 1.0,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = normalize_base_url(base_url)
        self.model_name = model_name
        self.temperature, self.max_tokens = temperature, max_tokens
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, transport=transport,
                                    timeout=httpx.Timeout(timeout, connect=10.0))

    def check(self) -> None:
        """GET /models once: a wrong URL or a dead server fails here, before any step runs."""
        try:
            r = self._client.get("/models", timeout=10.0)
        except httpx.HTTPError as e:
            raise DevstralError(f"cannot reach the model endpoint {self.base_url}: {_describe(e)}") from e
        if r.status_code in (401, 403):
            raise DevstralError(f"the model endpoint {self.base_url} refused the API key (HTTP {r.status_code})")
        self.sees_images = self._vision_props()
        if r.status_code >= 400:
            # Some endpoints have no /models route; they answered, so they are reachable.
            return
        if self.model_name is None:
            try:
                self.model_name = r.json()["data"][0]["id"]
            except (ValueError, LookupError, TypeError):
                raise DevstralError(f"{self.base_url}/models lists no model; pass --model-name") from None

    def _vision_props(self) -> bool:
        """Whether the server says it takes images: GET /props beside /v1, `modalities.vision` (what
        llama.cpp's server and devstral serve answer); False for servers without it."""
        root = self.base_url.rstrip("/").removesuffix("/v1")
        try:
            r = self._client.get(root + "/props", timeout=10.0)
            return r.status_code == 200 and r.json().get("modalities", {}).get("vision") is True
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    def chat(self, messages: list[Message], tools: list[dict[str, Any]], *,
             deadline: float | None = None) -> ChatReply:
        body: dict[str, Any] = {"model": self.model_name or "default", "messages": messages, "tools": tools,
                                "tool_choice": "auto", "stream": False}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        r = self._post_with_retries("/chat/completions", body, deadline)
        try:
            data = r.json()
            choice = data["choices"][0]
            msg = choice["message"]
        except (ValueError, LookupError, TypeError, RecursionError) as e:
            raise DevstralError(f"{self.base_url}/chat/completions answered something that is not a chat "
                                f"completion: {r.text[:200]!r}") from e
        if not isinstance(msg, dict):
            # Not the server's fault to report as ours: the agent tells the model and counts it.
            return ChatReply(message=msg, finish_reason=choice.get("finish_reason"))
        message = {"role": "assistant", "content": msg.get("content"), "tool_calls": msg.get("tool_calls") or None}
        usage = data.get("usage") if isinstance(data, dict) else None
        return ChatReply(message=message, finish_reason=choice.get("finish_reason") if isinstance(choice, dict) else None,
                         usage=dict(usage) if isinstance(usage, dict) else {})

    def _post_with_retries(self, path: str, body: dict[str, Any], deadline: float | None = None) -> _Answer:
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                r = self._post(path, body, deadline)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                _check_deadline(deadline)
                if last:
                    raise DevstralError(f"the model endpoint {self.base_url} failed {attempt + 1} times: "
                                        f"{_describe(e)}") from e
                self._sleep(attempt, None, deadline)
                continue
            if r.status_code in _RETRY_STATUS and not last:
                self._sleep(attempt, r.headers.get("retry-after"), deadline)
                continue
            if r.status_code >= 400:
                raise DevstralError(f"{self.base_url}{path} answered HTTP {r.status_code}: {_error_text(r)}")
            return r
        raise AssertionError("unreachable")

    def _post(self, path: str, body: dict[str, Any], deadline: float | None) -> _Answer:
        """POST and read the whole answer, giving up at `deadline` however slowly the bytes come."""
        timeout = self.timeout if deadline is None else min(self.timeout, _time_left(deadline))
        with self._client.stream("POST", path, json=body,
                                 timeout=httpx.Timeout(timeout, connect=min(10.0, timeout))) as r:
            chunks, size = [], 0
            for chunk in r.iter_bytes():
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise DevstralError(f"{self.base_url}{path} answered more than {MAX_RESPONSE_BYTES >> 20} MiB; "
                                        "set --max-tokens to bound the model's replies")
                chunks.append(chunk)
                _check_deadline(deadline)
            return _Answer(r.status_code, r.headers, b"".join(chunks))

    def _sleep(self, attempt: int, retry_after: str | None, deadline: float | None = None) -> None:
        delay = self.backoff_s * (2 ** attempt) * (0.5 + random.random() / 2)
        if retry_after:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), 60.0))
        if deadline is not None and time.monotonic() + delay >= deadline:
            raise DeadlineExceeded()
        time.sleep(delay)

    def close(self) -> None:
        self._client.close()


def normalize_base_url(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise DevstralError(f"--base-url must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded()
    return left


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None:
        _time_left(deadline)


def _error_text(r: _Answer) -> str:
    try:
        err = r.json().get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        if err:
            return str(err)[:300]
    except (ValueError, AttributeError):
        pass
    return r.text[:300]
