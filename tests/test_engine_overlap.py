"""The overlapped decode (EngineConfig.overlap): launching step k+1 before reading step k's tokens must
not change what the engine returns. The reference is the engine without it; each call of step() is
compared (which sequences got which token), not only the final outputs."""

from __future__ import annotations

import pytest
import torch

import devstral
from devstral.engine.engine import Engine, EngineConfig
from devstral.engine.sampling import SamplingParams
from devstral.engine.token_masks import banned_tokens

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def llm(tiny_hf):
    return devstral.load(tiny_hf, kv_cache_dtype="fp32")


def make_engine(llm, overlap: bool, **kw) -> Engine:
    ec = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, kv_cache_dtype="fp32", overlap=overlap,
                      **{"speculative": "off", **kw})
    engine = Engine(llm.model, llm.config, ec, compute_dtype=torch.float32, plan=(256, 2048))
    real = engine.runner.launch
    engine.launches = 0

    def launch(*args):
        engine.launches += 1
        return real(*args)

    engine.runner.launch = launch
    return engine


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(1000, 3000, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run(engine: Engine, requests, events=None) -> tuple[list, list]:
    """requests: (prompt, params, max_tokens, stop ids). events: {call number: fn(engine, seqs)} run
    before that call of step(). Returns (the calls' returns as (request, token) pairs, the outputs)."""
    seqs = [engine.add(p, params, m, stops) for p, params, m, stops in requests]
    trace, call = [], 0
    while engine.has_work():
        if events and call in events:
            events[call](engine, seqs)
        trace.append([(seqs.index(s), s.token_ids[-1]) for s in engine.step()])
        call += 1
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return trace, [s.token_ids[s.num_prompt_tokens:] for s in seqs]


def compare(llm, requests, events=None, same_steps=True, **kw):
    """Both engines' outputs and token counts are equal, and so are their steps' returns where the
    steps are the same (`same_steps`); returns the overlapped engine and the outputs."""
    ref_trace, ref_out = run(make_engine(llm, False, **kw), requests, events)
    engine = make_engine(llm, True, **kw)
    trace, out = run(engine, requests, events)
    assert out == ref_out
    if same_steps:
        assert trace == ref_trace
    assert all(len({i for i, _ in t}) == len(t) for t in trace)  # one token per sequence and call
    assert engine.stats.generated_tokens == sum(map(len, out))
    return engine, out


@pytest.mark.parametrize("n", [1, 4])
def test_greedy_tokens_are_the_same(llm, n):
    requests = [(p, GREEDY, 6 + 5 * i, set()) for i, p in enumerate(prompts(n))]
    engine, out = compare(llm, requests)
    assert [len(o) for o in out] == [6 + 5 * i for i in range(n)]
    assert engine.launches >= sum(6 + 5 * i for i in range(n)) // n - 2  # nearly every decode step overlapped


def test_with_speculation_on_greedy_tokens_are_the_same(llm):
    # Drafts need the host's tokens (the pipeline drains), and which are tried depends on measured times:
    # only the outputs are compared.
    repeat = list(range(1000, 1012)) * 3
    requests = [(repeat, GREEDY, 20, set()), (prompts(1)[0], GREEDY, 15, set())]
    ref = run(make_engine(llm, False, speculative="lookup"), requests)[1]
    assert run(make_engine(llm, True, speculative="lookup"), requests)[1] == ref


def test_a_stop_token_mid_stream_adds_nothing_after_it(llm):
    ids = prompts(2, seed=3)
    free = run(make_engine(llm, False), [(p, GREEDY, 12, set()) for p in ids])[1]
    stop = free[0][4]  # hit at the fifth token at the latest, while the step after it is in flight
    first = free[0].index(stop)
    requests = [(ids[0], GREEDY, 12, {stop}), (ids[1], GREEDY, 12, set())]
    engine, out = compare(llm, requests)
    assert out[0] == free[0][:first + 1]
    assert engine.launches > first + 1  # the stop was seen while a step after it was on its way


def test_a_sequence_added_while_others_decode(llm):
    ids = prompts(3, seed=5)
    late = lambda engine, seqs: seqs.append(engine.add(ids[2], GREEDY, 7, set()))  # noqa: E731
    requests = [(p, GREEDY, 14, set()) for p in ids[:2]]
    # The step in flight when it arrives was launched without it: its prefill comes one step later than
    # without overlap, so the calls' returns differ from there on (not the outputs).
    engine, out = compare(llm, requests, events={4: late}, same_steps=False)
    assert len(out[2]) == 7
    assert engine.launches > 0


def test_aborting_a_sequence_in_flight_discards_its_row(llm):
    ids = prompts(3, seed=7)
    requests = [(p, GREEDY, 16, set()) for p in ids]
    seen = {}

    def abort(engine, seqs):
        if engine.ec.overlap:
            assert engine._in_flight is not None  # the abort lands on a sequence with a row in flight
        seen[engine.ec.overlap] = seqs[1].num_output_tokens
        engine.abort(seqs[1])
        assert seqs[1].finished and seqs[1].num_output_tokens == seen[engine.ec.overlap]

    compare(llm, requests, events={5: abort})


def test_has_work_while_a_step_is_in_flight(llm):
    engine = make_engine(llm, True)
    seq = engine.add(prompts(1)[0], GREEDY, 30, set())
    engine.step()  # the prefill
    engine.step()  # a decode step, and the one after it launched
    assert engine._in_flight is not None
    n = seq.num_output_tokens
    engine.abort(seq)
    assert engine.has_work() and engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.step() == []  # the step in flight ends; its token is dropped
    assert not engine.has_work() and seq.num_output_tokens == n


def test_seeded_sampling_gives_the_same_tokens(llm):
    requests = [(p, SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=10 + i), 10 + 3 * i, set())
                for i, p in enumerate(prompts(3, seed=9))]
    engine, _ = compare(llm, requests)
    assert engine.launches > 0


def test_logprobs_and_constraints_take_the_normal_path(llm):
    ids = prompts(2, seed=11)
    ref = run(make_engine(llm, False), [(p, GREEDY, 8, set()) for p in ids])[1]
    banned = SamplingParams(temperature=0, constraint=banned_tokens(llm.config.vocab_size, [ref[0][2]]))
    for params in (SamplingParams(temperature=0, logprobs=2), banned,
                   SamplingParams(temperature=0, repeat_penalty=1.3)):
        requests = [(ids[0], params, 8, set()), (ids[1], GREEDY, 8, set())]
        engine, out = compare(llm, requests)
        assert engine.launches == 0  # one sequence that needs the host's tokens keeps the batch synchronous
        if params is banned:
            assert ref[0][2] not in out[0]


def test_the_default_is_off_on_cpu(llm):
    """EngineConfig(overlap=None) resolves by device: a CPU step has no device work to hide host time behind."""
    engine = Engine(llm.model, llm.config, EngineConfig(kv_cache_dtype="fp32"), compute_dtype=torch.float32,
                    plan=(256, 2048))
    assert engine.overlap is False


def test_an_explicit_setting_wins_over_the_default(llm, monkeypatch):
    """overlap=True is honoured on any device (the CPU tests above run it so); DEVSTRAL_OVERLAP only
    changes the default."""
    monkeypatch.setenv("DEVSTRAL_OVERLAP", "0")
    engine = Engine(llm.model, llm.config, EngineConfig(kv_cache_dtype="fp32", overlap=True),
                    compute_dtype=torch.float32, plan=(256, 2048))
    assert engine.overlap is True
