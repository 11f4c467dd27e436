"""The batched engine: what batching, chunking, preemption and the prefix cache must not change."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devstral
from devstral.engine.block_manager import BlockManager
from devstral.engine.engine import Engine, EngineConfig
from devstral.engine.sampling import SamplingParams
from devstral.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(1000, 3000, (int(torch.randint(3, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run_all(engine: Engine, batch: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    seqs = [engine.add(p, GREEDY, m, {2}) for p, m in zip(batch, max_tokens, strict=True)]
    while engine.has_work():
        engine.step()
    return [s.token_ids[s.num_prompt_tokens:] for s in seqs]


def solo(llm, ids: list[int], n: int) -> list[int]:
    """The reference: the model's plain forward over the whole sequence, one greedy token at a time."""
    out = list(ids)
    for _ in range(n):
        out.append(int(llm.logits(out)[-1].argmax()))
    return out[len(ids):]


def test_concurrent_sequences_get_exactly_their_solo_greedy_tokens(tiny_ministral3):
    llm = devstral.load(tiny_ministral3, kv_cache_dtype="fp32")
    engine = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=8, max_num_batched_tokens=40,
                                                        kv_cache_dtype="fp32"),
                    compute_dtype=torch.float32, plan=(512, 4096))
    batch = prompts(8)
    lengths = [5 + 3 * i for i in range(8)]
    outs = run_all(engine, batch, lengths)
    assert max(engine.stats.batch_sizes) >= 6  # they did share steps (prefill chunks and decodes mixed)
    for ids, n, out in zip(batch, lengths, outs, strict=True):
        assert out == solo(llm, ids, n)


def test_preemption_and_recompute_give_identical_tokens(tiny_hf):
    llm = devstral.load(tiny_hf, kv_cache_dtype="fp32")
    # 6 sequences of up to ~90 tokens each in a pool of 160 tokens: they must take turns
    engine = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=6, max_num_batched_tokens=64,
                                                        kv_cache_dtype="fp32", prefix_caching=False),
                    compute_dtype=torch.float32, plan=(128, 160))
    batch = prompts(6, seed=1)
    outs = run_all(engine, batch, [30] * 6)
    assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks
    for ids, out in zip(batch, outs, strict=True):
        assert out == solo(llm, ids, 30)


def test_an_aborted_sequence_frees_its_blocks_at_once(tiny_hf):
    llm = devstral.load(tiny_hf, kv_cache_dtype="fp32", prefix_caching=False)
    engine = llm.engine
    seq = engine.add(prompts(1)[0], GREEDY, 50, set())
    engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    engine.abort(seq)
    assert seq.finish_reason == "cancelled" and engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.has_work()


def test_cached_tokens_are_reported_for_a_repeated_prefix(tiny_hf):
    llm = devstral.load(tiny_hf)
    ids = prompts(1, seed=4)[0] + list(range(1000, 1050))
    first = llm.generate(ids, SamplingParams(temperature=0, max_tokens=4))
    second = llm.generate(ids, SamplingParams(temperature=0, max_tokens=4))
    assert first.usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert second.usage["prompt_tokens_details"]["cached_tokens"] == (len(ids) - 1) // 16 * 16
    assert second.token_ids == first.token_ids


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 5), st.integers(1, 40)),
                    max_size=40))
def test_block_manager_invariants(ops):
    """Random admissions, growth and frees over shared prefixes: reference counts always equal the number
    of sequences holding a block, free blocks are unreferenced, and hashes name one block each."""
    bm = BlockManager(24, 4)
    live: dict[int, Sequence] = {}
    for op, key, n in ops:
        if op == "add" and key not in live:
            seq = Sequence([7] * (key % 3) + list(range(n)), GREEDY, 10, set())  # prefixes overlap across keys
            if bm.allocate(seq):
                seq.num_computed = seq.num_tokens - 1
                bm.register_computed(seq)
                live[key] = seq
        elif op == "grow" and key in live:
            seq = live[key]
            seq.token_ids.append(n)
            if bm.ensure_capacity(seq, seq.num_tokens):
                seq.num_computed = seq.num_tokens - 1
                bm.register_computed(seq)
        elif op == "free" and key in live:
            bm.free(live.pop(key))
        holders = [0] * bm.num_blocks
        for seq in live.values():
            assert len(seq.block_table) * bm.block_size >= seq.num_computed
            for b in seq.block_table:
                holders[b] += 1
        assert holders == bm.ref_count
        free = set(bm.free_plain) | set(bm.free_cached)
        assert len(free) == bm.num_free
        assert all(bm.ref_count[b] == 0 for b in free)
        assert all(bm.hash_of[b] == h for h, b in bm.block_of.items())
        assert all(bm.hash_of[b] is None for b in bm.free_plain)
