"""Whether the weights are in memory, and until when: Ollama's `keep_alive` and `/api/ps`.

Every engine job goes through `Residency.job`: on the engine thread it first reloads the weights if
they were unloaded (with the engine and its KV pool), and when it ends it sets when the model expires (the request's `keep_alive`,
else the server's default, which is "never"). A watcher task on the event loop waits for that
moment and then queues an unload job; the unload happens on the engine thread, and only when that
job is the only one there, so it can never pull the weights from under a generation. A request
that arrives after the unload reloads them (tokenizer, config and the served names never leave).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from devstral.server.errors import APIError

log = logging.getLogger("devstral.server")

FOREVER = None  # a keep_alive that never expires


class _Default:
    """A request that did not say: the server's default applies."""


DEFAULT: Any = _Default()
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def keep_alive_seconds(value: str | int | float | None) -> float | None | _Default:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "0"); negative = forever."""
    if value is None:
        return DEFAULT
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return FOREVER if value < 0 else float(value)
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = _DURATION.findall(body)
        if not body or "".join(n + u for n, u in parts) != body:
            raise APIError(400, f"keep_alive: {value!r} is not a duration (e.g. 300, \"5m\", \"1h30m\", \"0\", \"-1\")",
                           param="keep_alive") from None
        seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    return FOREVER if seconds < 0 else seconds


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Residency:
    def __init__(self, llm: Any, *, loader: Callable[[], Any] | None = None, default_keep_alive: float | None = None):
        self.llm = llm
        self.loader = loader or default_loader(llm)
        self.default_keep_alive = default_keep_alive
        self.loaded = True
        self.running = 0  # jobs on the engine thread (only that thread changes it)
        self.expires_at: float | None = None  # unix time; None while a job runs or when it never expires
        self._lock = threading.Lock()
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- engine thread
    def job(self, fn: Callable[[Any, Callable[[], bool]], Iterator[Any]], keep_alive: Any = DEFAULT):
        def run(cache: Any, should_stop: Callable[[], bool]) -> Iterator[Any]:
            self.running += 1
            self.expires_at = None
            try:
                self.ensure_loaded()
                yield from fn(cache, should_stop)
            finally:
                self.running -= 1
                self.finished(keep_alive)

        return run

    def ensure_loaded(self) -> None:
        with self._lock:
            if self.loaded:
                return
            if self.loader is None:
                raise APIError(503, "the model was unloaded and this server cannot reload it")
            t0 = time.perf_counter()
            fresh = self.loader()
            self.llm.model = fresh.model
            if getattr(self.llm, "vision", None) is not None:
                self.llm.vision = getattr(fresh, "vision", None)
            self.loaded = True
            log.info("model reloaded in %.1f s", time.perf_counter() - t0)

    def finished(self, keep_alive: Any) -> None:
        """The clock starts when the last running job ends; that job's keep_alive sets it."""
        if self.running:
            return
        seconds = self.default_keep_alive if isinstance(keep_alive, _Default) else keep_alive
        self.expires_at = None if seconds is FOREVER else time.time() + seconds
        self._notify()

    def unload_job(self, worker: Any):
        """Unloads only if nothing else is queued or running and the expiry has not moved."""
        def run(cache: Any, should_stop: Callable[[], bool]) -> Iterator[Any]:
            due = self.expires_at is not None and time.time() >= self.expires_at
            if due and worker.active == 1 and worker.queue_depth == 0:
                self._unload(worker)
            return
            yield  # a generator: the worker runs it like any job

        return run

    def _unload(self, worker: Any) -> None:
        if self.loader is None:
            log.warning("keep_alive expired but the model cannot be reloaded: keeping it in memory")
            self.expires_at = None
            return
        with self._lock:
            import torch

            self.llm.model.to("meta")  # shapes stay (for /api/tags sizes); the memory goes
            if getattr(self.llm, "vision", None) is not None:
                self.llm.vision.to("meta")
            # The engine holds the model and the paged KV pool: drop it whole (it has no sequence, since
            # this job is the only one); `llm.engine` builds a new one, with the reloaded model, on first use.
            self.llm._engine = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.loaded, self.expires_at = False, None
        log.info("model unloaded (keep_alive expired)")

    # ---------------------------------------------------------------- event loop
    def unload_soon(self) -> None:
        """keep_alive 0 on a request with nothing to generate (Ollama's `ollama stop`)."""
        self.expires_at = time.time()
        self._notify()

    def _notify(self) -> None:
        if self._loop is not None and self._changed is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
                self._loop.call_soon_threadsafe(self._changed.set)

    async def watch(self, state: Any) -> None:
        """Runs for the server's lifetime: queue an unload job whenever the expiry passes."""
        self._loop, self._changed = asyncio.get_running_loop(), asyncio.Event()
        while True:
            expires = self.expires_at
            if not self.loaded or expires is None or self.running:
                await self._changed.wait()
                self._changed.clear()
                continue
            delay = expires - time.time()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), delay)
                self._changed.clear()
                continue
            try:
                handle = state.worker.submit(self.unload_job(state.worker))
            except Exception:  # the queue is full: the model is busy, so it is not idle anyway
                await asyncio.sleep(1.0)
                continue
            async for _ in handle:
                pass
            if self.loaded and self.expires_at == expires:  # a request slipped in first: wait for it to end
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)


def default_loader(llm: Any) -> Callable[[], Any] | None:
    """Load the same file again (a server started from the CLI passes its own, adapter included)."""
    path = getattr(llm, "path", None)
    if path is None:
        return None
    names = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}

    def load() -> Any:
        import devstral

        return devstral.load(str(path), device=str(llm.device), dtype=names.get(str(llm.dtype), "auto"),
                             max_context=llm.max_context)

    return load
