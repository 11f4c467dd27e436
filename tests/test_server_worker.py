"""The engine worker alone (no HTTP, no model): admission, round-robin order, cancel, errors."""

from __future__ import annotations

import asyncio

import pytest

from devstral.engine.outputs import PENDING
from devstral.server.worker import EngineWorker, QueueFull


class FakeLLM:
    """No engine: the jobs below stand for requests, yielding PENDING where a real one awaits a step."""


async def run_all(worker: EngineWorker, handles) -> list[list]:
    """Start the worker, drain every handle in order, stop the worker."""
    worker.start()
    try:
        outputs = []
        for h in handles:
            outputs.append([e async for e in h])
        return outputs
    finally:
        worker.stop()


def counting_job(name: str, n: int, log: list[str]):
    def run(cache, should_stop):
        for i in range(n):
            log.append(f"{name}{i}")
            yield f"{name}{i}"
            yield PENDING  # a real request now waits for the engine's next batched step

    return run


def test_active_jobs_advance_together_one_engine_step_at_a_time():
    log: list[str] = []

    async def main():
        worker = EngineWorker(FakeLLM(), parallel=2, max_queue=4)
        handles = [worker.submit(counting_job(n, 3, log)) for n in "abc"]  # before start: admitted together
        return await run_all(worker, handles)

    outputs = asyncio.run(main())
    assert outputs == [["a0", "a1", "a2"], ["b0", "b1", "b2"], ["c0", "c1", "c2"]]
    assert log[:6] == ["a0", "b0", "a1", "b1", "a2", "b2"]  # two slots, fair turns; c waits for a slot


def test_queue_bound_counts_waiting_and_active_jobs():
    async def main():
        worker = EngineWorker(FakeLLM(), parallel=1, max_queue=1)  # not started: nothing is admitted
        worker.submit(counting_job("a", 1, []))
        worker.submit(counting_job("b", 1, []))
        with pytest.raises(QueueFull):
            worker.submit(counting_job("c", 1, []))

    asyncio.run(main())


def test_cancel_stops_within_a_step_and_errors_reach_only_their_job():
    log: list[str] = []

    def failing(cache, should_stop):
        yield "x"
        raise ValueError("boom")

    async def main():
        worker = EngineWorker(FakeLLM(), parallel=2, max_queue=4)
        worker.start()
        try:
            long = worker.submit(counting_job("L", 10_000, log))
            bad = worker.submit(failing)
            events = long.__aiter__()
            await events.__anext__()
            long.cancel()
            with pytest.raises(ValueError, match="boom"):
                [e async for e in bad]
            while worker.active:
                await asyncio.sleep(0.01)
            ok = worker.submit(counting_job("ok", 2, []))
            return [e async for e in ok], worker.stats
        finally:
            worker.stop()

    out, stats = asyncio.run(main())
    assert out == ["ok0", "ok1"]
    assert len(log) < 10_000 and stats.cancelled == 1 and stats.failed == 1


def test_a_long_prefill_does_not_stall_other_requests(tiny_hf):
    """A long prompt is prefilled in chunks that share steps with other requests: a short request
    admitted with it gets its first token before the long one, and PENDING never reaches the handler."""
    import devstral
    from devstral.engine.sampling import SamplingParams

    llm = devstral.load(tiny_hf, prefix_caching=False)
    llm.engine_config.max_num_batched_tokens = 8
    params = SamplingParams(temperature=0, max_tokens=3)
    long_ids, short_ids = [1] + list(range(1000, 1063)), [1, 1500, 1501, 1502]  # 8 chunks vs 1
    order: list[str] = []

    def job(name, ids):
        def run(cache, should_stop):
            for step in llm.stream(ids, params, cache=cache, should_stop=should_stop, yield_prefill=True):
                if step.token_id is not None:
                    order.append(name)
                yield step
        return run

    async def main():
        worker = EngineWorker(llm, parallel=2, max_queue=2)
        handles = [worker.submit(job("long", long_ids)), worker.submit(job("short", short_ids))]
        return await run_all(worker, handles)

    long_events, short_events = asyncio.run(main())
    assert order.index("short") < order.index("long")
    assert all(e is not PENDING for e in long_events + short_events)
    # and the interleaved result is the one a lone, unchunked generation gives
    alone = devstral.load(tiny_hf).generate(long_ids, params).token_ids
    assert [e.token_id for e in long_events if e.token_id is not None] == alone
