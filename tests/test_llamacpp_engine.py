"""The llama.cpp engine's own mechanics, checked against llama.cpp's view of its KV cache: prefix reuse
across turns and requests, cancellation, cell accounting, one llama_decode per step, errors."""

from __future__ import annotations

import random

import pytest

from devstral.engine.sampling import SamplingParams
from devstral.errors import DevstralError
from test_llamacpp_harness import ASK, TEXT, TOOLS, f32_gguf, load, trained

llama_cpp = pytest.importorskip("llama_cpp")

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def run(engine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list:
    seqs = [engine.add(p, params, params.max_tokens, set()) for p in prompts]
    while engine.has_work():
        engine.step()
    return seqs


def assert_ledger_matches_llama_cpp(engine) -> None:
    """Every id holds, in llama.cpp, exactly the positions our bookkeeping says; and exactly `num_free`
    cells are free: that many tokens decode into a scratch id, one more does not."""
    for seq_id in range(engine.kv.n_ids):
        held = engine.kv.held.get(seq_id)
        assert engine.seq_pos_max(seq_id) == (len(held.tokens) - 1 if held else -1), seq_id
    free = engine.kv.num_free
    scratch = engine.kv.scratch()
    try:
        for start, n, expected in ((0, free, 0), (free, 1, 1)):
            engine.batch.clear()
            for at in range(start, start + n, engine.batch_tokens):
                engine.batch.clear()
                k = min(engine.batch_tokens, start + n - at)
                engine.batch.add([5] * k, at, scratch, logits="none")
                rc = engine.lib.llama_decode(engine.ctx, engine.batch.struct)
                if rc:
                    break
            assert rc == expected, (free, start, n)
    finally:
        engine.kv.drop(scratch)


def test_an_agent_turn_reuses_the_previous_turn_and_answers_as_a_fresh_engine():
    llm = load(f32_gguf(), "llama.cpp")
    fresh = load(f32_gguf(), "llama.cpp", prefix_caching=False)
    first = llm.chat(ASK, tools=TOOLS, sampling=GREEDY)
    turn = [*ASK, first.message, {"role": "tool", "tool_call_id": first.message["tool_calls"][0]["id"],
                                  "name": "list_files", "content": "a.txt b.txt"}]
    second = llm.chat(turn, tools=TOOLS, sampling=GREEDY)
    history = first.prompt_token_ids + first.token_ids
    shared = next((i for i, (a, b) in enumerate(zip(history, second.prompt_token_ids, strict=False)) if a != b),
                  len(history))
    # The cache holds every token of the first turn but its last (sampled, never fed back).
    assert second.usage["prompt_tokens_details"]["cached_tokens"] == min(shared, len(history) - 1)
    assert shared > len(first.prompt_token_ids)
    assert second.token_ids == fresh.chat(turn, tools=TOOLS, sampling=GREEDY).token_ids
    assert fresh.engine.kv.stats.hit_tokens == 0
    assert_ledger_matches_llama_cpp(llm.engine)


def test_concurrent_requests_share_a_computed_prefix_and_keep_their_own_outputs():
    llm = load(f32_gguf(), "llama.cpp", parallel=3)
    engine = llm.engine
    ids = llm.tokenizer.encode(TEXT * 3, bos=True)
    a = engine.add(ids[:60], GREEDY, 12, set())
    while a.num_computed < 60 - 1:  # prefill a first
        engine.step()
    b = engine.add(ids[:40] + ids[70:80], GREEDY, 12, set())
    c = engine.add(ids[:61], GREEDY, 12, set())
    while engine.has_work():
        engine.step()
    assert b.num_cached_prompt_tokens == 40 and c.num_cached_prompt_tokens >= 60
    alone = load(f32_gguf(), "llama.cpp", prefix_caching=False).engine
    assert [s.token_ids for s in (a, b, c)] == [s.token_ids for s in run(alone, [a.token_ids[:60], b.token_ids[:50],
                                                                                 c.token_ids[:61]])]
    assert_ledger_matches_llama_cpp(engine)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_cancellation_frees_the_llama_cpp_sequence(prefix_caching):
    llm = load(f32_gguf(), "llama.cpp", max_context=64, prefix_caching=prefix_caching)
    engine = llm.engine
    ids = llm.tokenizer.encode(TEXT * 3, bos=True)
    seq = engine.add(ids[:30], SamplingParams(temperature=0, max_tokens=30), 30, set())
    for _ in range(4):
        engine.step()
    seq_id = engine.seq_ids[seq]
    assert engine.seq_pos_max(seq_id) >= 30 and engine.num_running == 1
    engine.abort(seq, "cancelled")
    assert seq.finish_reason == "cancelled" and engine.num_running == 0 and not engine.has_work()
    if not prefix_caching:
        assert engine.seq_pos_max(seq_id) == -1 and engine.kv.num_free == engine.kv.num_blocks
    # Whatever the cancelled request left is given up, oldest first, when later requests need the cells.
    cells = engine.kv.num_blocks
    for i in range(cells // 64 + 1):
        prompt = llm.tokenizer.encode(f"{i} " * 40, bos=True)[:50]
        done = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=14))
        assert done[0].finish_reason == "length" and done[0].error is None
    assert not any(h.tokens[:30] == ids[:30] for h in engine.kv.held.values())
    assert_ledger_matches_llama_cpp(engine)


def test_cell_accounting_matches_llama_cpp_under_random_traffic():
    llm = load(f32_gguf(), "llama.cpp", parallel=3, max_context=96)
    engine = llm.engine
    rng = random.Random(0)
    base = llm.tokenizer.encode(TEXT * 4, bos=True)
    live: list = []
    for _ in range(40):
        if len(live) < 3 and rng.random() < 0.5:  # a new request sharing some prefix with earlier ones
            n = rng.randrange(2, 60)
            prompt = base[:n] + [rng.randrange(5, 1000) for _ in range(rng.randrange(0, 8))]
            live.append(engine.add(prompt, GREEDY, rng.randrange(1, 30), set()))
        elif live and rng.random() < 0.2:
            engine.abort(live.pop(rng.randrange(len(live))), "cancelled")
        engine.step()
        live = [s for s in live if not s.finished]
    assert engine.kv.stats.hit_tokens > 0 and engine.kv.idle
    assert_ledger_matches_llama_cpp(engine)


def test_one_llama_decode_per_step_for_every_running_sequence(monkeypatch):
    llm = load(f32_gguf(), "llama.cpp", parallel=4)
    engine = llm.engine
    calls = []
    real = engine.lib.llama_decode

    def counting(ctx, batch):
        calls.append(batch.n_tokens)
        return real(ctx, batch)

    monkeypatch.setattr(engine, "lib", type("Lib", (), {"__getattr__": lambda self, name: getattr(llama_cpp, name),
                                                        "llama_decode": staticmethod(counting)})())
    ids = llm.tokenizer.encode(TEXT * 2, bos=True)
    run(engine, [ids[:5 + i] for i in range(4)])
    assert len(calls) == engine.stats.steps
    assert calls[0] == sum(5 + i for i in range(4))  # every prompt in the first pass
    assert calls.count(4) == 11  # then each pass carries one token of each of the four sequences


def test_a_batch_budget_below_the_sequence_ids_still_decodes():
    """--max-batched-tokens 16 with 8 parallel sequences (24 ids: running, prefix cache, logits()):
    llama.cpp's output buffer has a row per id, so the context takes larger batches than the budget
    (it used to abort the process); each step still submits at most the budget, and the greedy tokens
    are those of an engine with the default budget."""
    llm = load(f32_gguf(), "llama.cpp", parallel=8, max_batched_tokens=16)
    ids = llm.tokenizer.encode(TEXT * 2, bos=True)
    prompts = [ids[:9 + i] for i in range(8)]
    calls = []
    engine = llm.engine
    real = engine.lib.llama_decode

    def counting(ctx, batch):
        calls.append(batch.n_tokens)
        return real(ctx, batch)

    engine.lib = type("Lib", (), {"__getattr__": lambda self, name: getattr(llama_cpp, name),
                                  "llama_decode": staticmethod(counting)})()
    small = [s.token_ids for s in run(engine, prompts)]
    wide = [s.token_ids for s in run(load(f32_gguf(), "llama.cpp", parallel=8).engine, prompts)]
    assert max(calls) <= 16
    assert small == wide


def test_errors_are_one_line_and_name_the_knob(tmp_path):
    with pytest.raises(DevstralError, match="--kv-cache-dtype fp8"):
        load(f32_gguf(), "llama.cpp", kv_cache_dtype="fp8")
    with pytest.raises(DevstralError, match=r"runs \.gguf files"):
        load(trained(), "llama.cpp")
    with pytest.raises(DevstralError, match="--adapter needs --backend torch"):
        load(f32_gguf(), "llama.cpp", adapter=tmp_path)
    with pytest.raises(DevstralError, match="--ctx-size 100000000 x --parallel 2 needs .* lower --ctx-size"):
        load(f32_gguf(), "llama.cpp", max_context=100_000_000, parallel=2)
    llm = load(f32_gguf(), "llama.cpp", max_context=32)
    with pytest.raises(DevstralError, match="37 exceeds the context size of 32"):
        llm.generate(list(range(1, 30)), SamplingParams(temperature=0, max_tokens=8))
    assert not llm.engine.has_work()
