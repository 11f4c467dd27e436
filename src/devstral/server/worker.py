"""The engine worker: one thread owns the model and runs up to N requests as one batch.

Handlers `submit` a job (a function that, given a should_stop poll, returns an iterator of events;
its first argument, once a per-slot KV cache, is now always None) and get a `JobHandle`, an async
iterator over those events. The worker keeps a bounded FIFO of waiting jobs and N slots. Each round
it advances every active job until the job waits for the engine (it yields PENDING), then runs one
engine step: a single forward pass for every active request's next token or prompt chunk. Events
cross to the event loop with `call_soon_threadsafe`; nothing here ever blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from devstral.engine.outputs import PENDING

log = logging.getLogger("devstral.server")

JobFn = Callable[[Any, Callable[[], bool]], Iterator[Any]]  # (None, should_stop) -> events
_EVENT, _ERROR, _END = 0, 1, 2


class QueueFull(Exception):
    """Every slot is busy and the waiting line is at its limit."""


class JobHandle:
    """The handler's side of one job: iterate its events; `cancel()` frees its slot within a step."""

    def __init__(self, fn: JobFn, loop: asyncio.AbstractEventLoop):
        self.fn, self.loop = fn, loop
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.cancelled = False
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.gen: Iterator[Any] | None = None
        self.slot: int | None = None
        # When the engine produced the first event (prefill plus first token): the handler may read
        # its events long after, so timings must come from here.
        self.first_event_ns: int | None = None

    def cancel(self) -> None:
        self.cancelled = True  # read by the worker thread between steps and by should_stop()

    def _post(self, kind: int, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutting down): nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, item))

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._events()

    async def _events(self) -> AsyncIterator[Any]:
        try:
            while True:
                kind, item = await self.queue.get()
                if kind == _END:
                    return
                if kind == _ERROR:
                    raise item
                yield item
        finally:
            # the consumer stopped early (disconnect, error, break): stop generating for it
            self.cancel()


@dataclass
class WorkerStats:
    steps: int = 0
    busy_s: float = 0.0
    cancelled: int = 0
    failed: int = 0
    completed: int = 0
    queue_wait_s: list[float] = field(default_factory=list)


class EngineWorker:
    def __init__(self, llm: Any, *, parallel: int = 1, max_queue: int = 64):
        if parallel < 1:
            raise ValueError("parallel must be >= 1")
        self.llm, self.parallel, self.max_queue = llm, parallel, max_queue
        self._pending: deque[JobHandle] = deque()
        self._active: list[JobHandle] = []
        self._free_slots = list(range(parallel))
        if hasattr(llm, "set_parallel"):
            llm.set_parallel(parallel)  # the engine batches as many sequences as there are slots
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = WorkerStats()

    # ---------------------------------------------------------------- handler side
    def submit(self, fn: JobFn) -> JobHandle:
        handle = JobHandle(fn, asyncio.get_running_loop())
        with self._cond:
            if self._stopping:
                raise QueueFull("server is shutting down")
            if len(self._pending) + len(self._active) >= self.parallel + self.max_queue:
                raise QueueFull(f"all {self.parallel} slots are busy and {len(self._pending)} requests wait")
            self._pending.append(handle)
            self._cond.notify()
        return handle

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="devstral-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in [*self._pending, *self._active]:
                job.cancel()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---------------------------------------------------------------- worker thread
    def _admit(self) -> None:
        with self._cond:
            while not self._pending and not self._active and not self._stopping:
                self._cond.wait(1.0)
            while self._pending and self._free_slots:
                job = self._pending.popleft()
                if job.cancelled:
                    self.stats.cancelled += 1
                    job._post(_END, None)
                    continue
                job.slot = self._free_slots.pop(0)
                self._active.append(job)
                job.started_at = time.monotonic()
                self.stats.queue_wait_s = [*self.stats.queue_wait_s[-255:], job.started_at - job.submitted_at]

    def _finish(self, job: JobHandle, error: BaseException | None = None) -> None:
        if job.gen is not None:
            try:
                job.gen.close()
            except Exception:  # a generator failing to clean up must not take the worker down
                log.exception("closing a job failed")
        with self._cond:
            self._active.remove(job)
            self._free_slots.append(job.slot)
            self._free_slots.sort()
        if error is not None:
            self.stats.failed += 1
            job._post(_ERROR, error)
        else:
            if job.cancelled:
                self.stats.cancelled += 1
            else:
                self.stats.completed += 1
            job._post(_END, None)

    def _pump(self, job: JobHandle) -> None:
        """Advance a job until it waits for the engine, or ends."""
        if job.cancelled:
            self._finish(job)
            return
        try:
            if job.gen is None:
                job.gen = iter(job.fn(None, lambda: job.cancelled))
            while True:
                event = next(job.gen)
                self.stats.steps += 1
                if event is PENDING:  # waiting for the engine's next step: nothing to tell the handler
                    return
                if job.first_event_ns is None:
                    job.first_event_ns = time.perf_counter_ns()
                job._post(_EVENT, event)
                if job.cancelled:
                    self._finish(job)
                    return
        except StopIteration:
            self._finish(job)
        except Exception as e:
            self._finish(job, e)

    def _run(self) -> None:
        while True:
            self._admit()
            if self._stopping and not self._active:
                for job in list(self._pending):
                    job._post(_END, None)
                return
            t0 = time.perf_counter()
            for job in list(self._active):  # every request up to the point where it needs the engine
                self._pump(job)
            engine = getattr(self.llm, "_engine", None)  # built by the first request that needs it
            if engine is not None and engine.has_work():
                try:
                    engine.step()  # one batched forward pass for all of them
                except Exception as e:  # a bug in the engine: end every request rather than hang them
                    log.exception("engine step failed")
                    for job in list(self._active):
                        self._finish(job, e)
            self.stats.busy_s += time.perf_counter() - t0
