"""Several engine jobs for one request (`n > 1`, a list of prompts): submit all or none, then read
them together.

Each choice is its own job, so the worker interleaves them token by token today and a batching
engine can run them in one forward pass later without any change here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request

from devstral.server.state import ServerState, collect, started
from devstral.server.worker import JobFn, JobHandle

MAX_CHOICES = 16  # n x prompts: each is a job holding a slot or a place in the queue


def submit_all(state: ServerState, fns: Sequence[JobFn]) -> list[JobHandle]:
    """Every job queued, or none: a full queue halfway through cancels what was already submitted."""
    handles: list[JobHandle] = []
    try:
        for fn in fns:
            handles.append(state.submit(fn))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


async def collect_all(handles: Sequence[JobHandle], request: Request) -> list[list[Any]]:
    """The events of every job, in submission order; one failure cancels the others."""
    try:
        return list(await asyncio.gather(*(collect(h, request) for h in handles)))
    except BaseException:
        for h in handles:
            h.cancel()
        raise


async def start_all(handles: Sequence[JobHandle]) -> list[AsyncIterator[Any]]:
    """`started()` for every job: an error before any output is still an ordinary HTTP error."""
    try:
        return list(await asyncio.gather(*(started(h) for h in handles)))
    except BaseException:
        for h in handles:
            h.cancel()
        raise


async def merge(streams: Sequence[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(job index, event) pairs in the order the engine produced them."""
    if len(streams) == 1:  # the common case needs no tasks
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for event in stream:
                await queue.put((i, event, None, False))
        except Exception as e:
            await queue.put((i, None, e, True))
            return
        await queue.put((i, None, None, True))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, event, error, done = await queue.get()
            if error is not None:
                raise error
            if done:
                running -= 1
                continue
            yield i, event
    finally:
        for t in tasks:
            t.cancel()
        # A cancelled pump closes the stream it was reading, and with it the job.
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                await aclose()
