"""A representative subset of the server tests, run on both backends over the same F32 GGUF: greedy
completions and chat, tool-call deltas, concurrent clients batched, a client leaving mid-stream, a
repeated conversation served from the prefix cache, /metrics, and the Ollama client. Oracles: the openai
and ollama clients, and an LLM of the same backend outside the server."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import ollama
import openai
import pytest

from devstral.engine.sampling import SamplingParams
from devstral.testing import patched_sampler
from test_llamacpp_harness import (
    ASK,
    CALL,
    TEXT,
    TOOLS,
    call_ids,
    f32_gguf,
    live,
    load,
    reference,
    start_server,
    stop_server,
)

llama_cpp = pytest.importorskip("llama_cpp")

BACKENDS = ["torch", "llama.cpp"]
pytestmark = pytest.mark.parametrize("backend", BACKENDS)


def client(backend: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live(backend).url + "/v1", api_key="unused", max_retries=0)


def metric(backend: str, name: str) -> float:
    text = httpx.get(live(backend).url + "/metrics").text
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def wait_idle(backend: str) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(live(backend).url + "/health").json()["slots_processing"] and time.monotonic() < deadline:
        time.sleep(0.02)


def test_completion_and_chat_greedy_equal_the_backends_llm(backend):
    ref = reference(backend)
    ids = ref.tokenizer.encode(TEXT, bos=True)
    expected = ref.generate(ids[:9], SamplingParams(temperature=0, max_tokens=16))
    r = client(backend).completions.create(model="tiny", prompt=ids[:9], max_tokens=16, temperature=0)
    assert r.choices[0].text == expected.text and r.usage.completion_tokens == len(expected.token_ids)
    chat = client(backend).chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=40,
                                                   temperature=0)
    call = chat.choices[0].message.tool_calls[0].function
    assert chat.choices[0].finish_reason == "tool_calls" and (call.name, json.loads(call.arguments)) == CALL


def scripted(backend: str, token_ids: list[int]):
    """Every sequence sampled inside the block emits `token_ids`, then EOS; the model still runs."""
    eos = reference(backend).tokenizer.eos_id
    scripts: dict[int, tuple] = {}

    def pick(logits, params, history):
        _, it = scripts.setdefault(id(history), (history, iter(token_ids)))
        return next(it, eos)

    return patched_sampler(pick)


def test_tool_call_deltas_reassemble_into_the_scripted_calls(backend):
    tok = reference(backend).tokenizer
    forced = tok.encode("Let me look.") + call_ids(tok, "list_files", {"path": "a"}) + call_ids(tok, "list_files",
                                                                                               {"path": "b"})
    with scripted(backend, forced):
        chunks = list(client(backend).chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=True))
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me look." and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("list_files", {"path": "a"}),
                                                                                 ("list_files", {"path": "b"})]


def test_concurrent_clients_are_batched_and_get_their_own_greedy_outputs(backend):
    ref = reference(backend)
    ids = ref.tokenizer.encode(TEXT * 2, bos=True)
    prompts = [ids[:6 + 5 * i] for i in range(8)]
    expected = [ref.generate(p, SamplingParams(temperature=0, max_tokens=10 + i)).text for i, p in enumerate(prompts)]

    async def one(ac: openai.AsyncOpenAI, i: int) -> str:
        stream = await ac.completions.create(model="tiny", prompt=prompts[i], max_tokens=10 + i, temperature=0,
                                             stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=live(backend).url + "/v1", api_key="x", max_retries=0) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(8)))

    assert asyncio.run(run()) == expected
    assert max(live(backend).llm.engine.stats.batch_sizes) > 1  # the slots shared forward passes


def test_a_client_leaving_mid_stream_is_cancelled_and_frees_its_sequence(backend):
    server = live(backend)
    cancelled = metric(backend, "devstral_requests_cancelled_total")
    filler = reference(backend).tokenizer.encode("x")[0]
    with patched_sampler(lambda logits, params, history: filler), httpx.Client(base_url=server.url, timeout=60) as c, \
            c.stream("POST", "/v1/chat/completions", json={"messages": ASK, "max_tokens": 200, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # leaving the block closes the connection mid-stream
    wait_idle(backend)
    assert metric(backend, "devstral_requests_cancelled_total") == cancelled + 1
    engine = server.llm.engine
    assert engine.num_running == 0 and not engine.has_work()
    if backend == "llama.cpp":  # no llama.cpp sequence id is left running
        assert not engine.kv.running and not engine.seq_ids


def test_a_repeated_conversation_is_served_from_the_prefix_cache(backend):
    history = [{"role": "user", "content": "Summarise: " + TEXT * 3}]
    first = client(backend).chat.completions.create(model="tiny", messages=history, max_tokens=6, temperature=0)
    second = client(backend).chat.completions.create(model="tiny", messages=history, max_tokens=6, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    n = first.usage.prompt_tokens
    # torch caches whole 16-token blocks; llama.cpp every token but the one whose logits are needed
    assert cached == ((n - 1) // 16 * 16 if backend == "torch" else n - 1)
    assert second.choices[0].message.content == first.choices[0].message.content
    assert metric(backend, "devstral_prefix_cache_hit_tokens_total") >= cached
    assert 0 < metric(backend, "devstral_kv_cache_blocks_free") <= metric(backend, "devstral_kv_cache_blocks_total")


def test_the_ollama_client_chats_and_gets_tool_calls_as_objects(backend):
    c = ollama.Client(host=live(backend).url)
    expected = reference(backend).generate(TEXT[:40], SamplingParams(temperature=0, max_tokens=8))
    r = c.generate(model="tiny", prompt=TEXT[:40], raw=True, options={"temperature": 0, "num_predict": 8})
    assert r.response == expected.text and r.eval_count == len(expected.token_ids) == 8
    with scripted(backend, call_ids(reference(backend).tokenizer, *CALL)):
        r = c.chat(model="tiny", messages=ASK, tools=TOOLS, stream=False)
    call = r.message.tool_calls[0].function
    assert (call.name, dict(call.arguments)) == CALL


def test_keep_alive_zero_frees_the_weights_and_the_next_request_loads_them_again(backend):
    server = start_server(load(f32_gguf(), backend), parallel=1, loader=lambda: load(f32_gguf(), backend))
    c = ollama.Client(host=server.url)
    options = {"temperature": 0, "num_predict": 6}
    weights, engine = server.llm.model, server.llm.engine
    try:
        first = c.generate(model="tiny", prompt=TEXT[:30], raw=True, options=options, keep_alive=0)
        deadline = time.monotonic() + 20
        while c.ps().models:
            assert time.monotonic() < deadline, "the model was not unloaded"
            time.sleep(0.05)
        if backend == "llama.cpp":  # llama.cpp's weights and context were freed, not just forgotten
            assert not weights.loaded and engine.ctx is None
        again = c.generate(model="tiny", prompt=TEXT[:30], raw=True, options=options, keep_alive="10m")
        assert again.response == first.response and [m.model for m in c.ps().models] == ["tiny"]
        assert server.llm.model is not weights
    finally:
        stop_server(server)
