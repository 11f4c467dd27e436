"""Many clients at once, and clients that leave mid-stream."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai

from devstral.engine.sampling import SamplingParams
from test_server_harness import forced_output, live, reference_llm, wait_idle

N_CLIENTS = 16


def _metric(name: str) -> float:
    text = httpx.get(live().url + "/metrics").text
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_sixteen_concurrent_streaming_clients_get_their_own_greedy_outputs():
    prompts = [f"Request number {i}: {'abc' * (i % 5)}" for i in range(N_CLIENTS)]
    ask = [[{"role": "user", "content": p}] for p in prompts]
    n_tokens = [8 + (i % 4) * 4 for i in range(N_CLIENTS)]  # different lengths: slots free at different times
    ref = reference_llm()
    expected = [ref.generate(p, SamplingParams(temperature=0, max_tokens=n)).text
                for p, n in zip(prompts[:8], n_tokens[:8], strict=True)]
    expected += [ref.chat(m, sampling=SamplingParams(temperature=0, max_tokens=n)).message["content"]
                 for m, n in zip(ask[8:], n_tokens[8:], strict=True)]

    async def one(ac: openai.AsyncOpenAI, i: int) -> str:
        if i < 8:  # half completions, half chat: both paths share the worker
            stream = await ac.completions.create(model="tiny", prompt=prompts[i], max_tokens=n_tokens[i],
                                                 temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream])
        stream = await ac.chat.completions.create(model="tiny", messages=ask[i], max_tokens=n_tokens[i],
                                                  temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=live().url + "/v1", api_key="x", max_retries=0) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(N_CLIENTS)))

    before = _metric("devstral_completion_tokens_total")
    assert asyncio.run(run()) == expected
    health = wait_idle(live())
    assert health["slots_processing"] == 0 and health["queue_depth"] == 0
    assert _metric("devstral_completion_tokens_total") > before


def test_requests_are_interleaved_not_serialized():
    """With 4 slots, a short request sent after three long ones finishes while they still run."""
    async def run() -> list[str]:
        order: list[str] = []
        async with httpx.AsyncClient(base_url=live().url, timeout=60) as c:
            async def ask(name: str, n: int) -> None:
                r = await c.post("/v1/completions", json={"prompt": name, "max_tokens": n, "temperature": 0,
                                                          "stop": []})
                assert r.status_code == 200
                order.append(name)

            longs = [asyncio.create_task(ask(f"long{i}", 200)) for i in range(3)]
            await asyncio.sleep(0.2)
            await ask("short", 2)
            await asyncio.gather(*longs)
        return order

    order = asyncio.run(run())
    assert order[0] == "short"


def test_client_dropping_mid_stream_frees_its_slot():
    server = live()
    cancelled = _metric("devstral_requests_cancelled_total")
    steps = _metric("devstral_engine_steps_total")
    with forced_output([1100] * 300), httpx.Client(base_url=server.url, timeout=60) as c, c.stream(
            "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "go on"}],
                                                  "max_tokens": 200, "stream": True, "temperature": 0}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # leaving the block closes the connection mid-stream
    health = wait_idle(server)
    assert health["slots_processing"] == 0 and health["queue_depth"] == 0
    assert _metric("devstral_requests_cancelled_total") == cancelled + 1
    assert _metric("devstral_engine_steps_total") - steps < 200  # it stopped well before max_tokens
    # the next request is served normally
    ref = reference_llm().generate("after", SamplingParams(temperature=0, max_tokens=6))
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "after", "max_tokens": 6, "temperature": 0})
    assert r.json()["choices"][0]["text"] == ref.text


def test_non_streaming_client_leaving_is_cancelled_too():
    server = live()
    cancelled = _metric("devstral_requests_cancelled_total")
    body = json.dumps({"model": "tiny", "prompt": "x", "raw": True, "stream": False,
                       "options": {"num_predict": 250}}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    # no early EOS, and 250 tokens take >= 1.25 s: the server polls for the disconnect every 0.25 s, and the
    # tiny model alone can finish 250 tokens within one poll
    with forced_output([1100] * 300, delay_s=0.005), socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health").json()["slots_processing"] == 0:  # until it is generating
            assert time.monotonic() < deadline
            time.sleep(0.01)
    health = wait_idle(server)
    assert health["slots_processing"] == 0
    assert _metric("devstral_requests_cancelled_total") == cancelled + 1


def test_an_engine_failure_mid_stream_ends_only_that_stream():
    """A crash inside generation reaches the client as an error event; the slot is freed."""
    from devstral.testing import patched_sampler

    calls: dict[int, tuple[list[int], list[int]]] = {}

    def failing(logits, params, history):
        _, n = calls.setdefault(id(history), (history, [0]))
        n[0] += 1
        if n[0] > 2:
            raise RuntimeError("simulated device failure")
        return int(logits.argmax())

    with patched_sampler(failing), httpx.Client(base_url=live().url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 20, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200
        r2 = c.post("/api/generate", json={"model": "tiny", "prompt": "x", "raw": True, "stream": False})
    assert '"error"' in lines[-1] and "[DONE]" not in lines[-1]
    assert r2.status_code == 500 and "RuntimeError" in r2.json()["error"]
    assert wait_idle(live())["slots_processing"] == 0
    r = httpx.post(live().url + "/v1/completions", json={"prompt": "fine", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
