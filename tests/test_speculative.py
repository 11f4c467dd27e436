"""Prompt-lookup speculative decoding: the drafter against a brute-force search, greedy output token for
token equal to plain decoding, and sampling that keeps the target distribution (chi-squared)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devstral
from devstral.engine.engine import Engine, EngineConfig
from devstral.engine.sampling import SamplingParams
from devstral.engine.speculative import NgramIndex, verify


def brute_force(tokens: list[int], k: int) -> list[int]:
    """The longest suffix (4..1 tokens) at its most recent earlier occurrence, and what followed it."""
    for n in range(4, 0, -1):
        if len(tokens) <= n:
            continue
        for end in range(len(tokens) - 1, n - 1, -1):
            if tokens[end - n:end] == tokens[-n:]:
                return tokens[end:end + k]
    return []


@settings(max_examples=150, deadline=None)
@given(tokens=st.lists(st.integers(0, 4), max_size=700), cut=st.integers(0, 700), k=st.integers(1, 8))
def test_drafts_equal_a_brute_force_search(tokens, cut, k):
    index = NgramIndex()
    index.update(tokens[:cut])  # part of the history indexed earlier (in bulk when long), the rest now
    assert index.propose(tokens, k) == brute_force(tokens, k)


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-squared(dof): the regularized upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of counts to probs (categories expecting fewer than 5 are left out)."""
    keep = probs * counts.sum() >= 5
    expected = probs[keep] / probs[keep].sum() * counts[keep].sum()
    return chi2_sf(float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1)


def contingency_p(table: np.ndarray) -> float:
    """Two-sample chi-squared test of homogeneity on a 2 x C table of counts."""
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return chi2_sf(float(((table - expected) ** 2 / expected).sum()), table.shape[1] - 1)


def test_verification_keeps_the_target_distribution():
    """With drafts that are sometimes likely and sometimes not, the first emitted token follows p0 and,
    when the first draft was kept, the second follows p1: exactly what sampling without drafts gives."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=g) * 1.5
    params = SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    p = torch.softmax(logits / 0.9, -1).numpy()
    draft = [int(p[0].argmax()), int(p[1].argmin())]  # a likely first draft, an unlikely second
    gen = torch.Generator().manual_seed(1)
    first, second = np.zeros(7), np.zeros(7)
    for _ in range(6000):
        out = verify(logits, draft, params, gen)
        first[out[0]] += 1
        if out[0] == draft[0]:
            second[out[1]] += 1
    assert chi2_p(first, p[0]) > 1e-3
    assert chi2_p(second, p[1]) > 1e-3


def test_greedy_verification_is_argmax_decoding():
    logits = torch.randn(4, 50)
    target = logits.argmax(-1).tolist()
    assert verify(logits, target[:3], SamplingParams(temperature=0), None) == target
    assert verify(logits, [target[0], (target[1] + 1) % 50, target[2]], SamplingParams(temperature=0), None) \
        == target[:2]


def repetitive_prompt(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(1000, 3000, (12,), generator=g).tolist()
    return [1] + body * 4 + body[:5]  # the model is likely to continue the pattern, and drafts propose it


def test_greedy_with_speculation_is_plain_greedy(tiny_ministral3):
    llm = devstral.load(tiny_ministral3, kv_cache_dtype="fp32")
    outs = {}
    for mode in ("off", "lookup"):
        engine = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=4, kv_cache_dtype="fp32", speculative=mode,
                                                            prefix_caching=False),
                        compute_dtype=torch.float32, plan=(512, 4096))
        engine.scheduler.step_costs = None  # draft wherever a match is found, whatever this CPU's timings
        seqs = [engine.add(repetitive_prompt(i), SamplingParams(temperature=0), 40, set()) for i in range(4)]
        while engine.has_work():
            engine.step()
        outs[mode] = [s.token_ids for s in seqs]
        if mode == "lookup":
            assert engine.stats.drafted_tokens > 0 and engine.stats.accepted_tokens > 0
            steps = engine.stats.steps
    assert outs["lookup"] == outs["off"]
    assert steps < 4 * 40  # fewer forward passes than tokens


def pattern_following(llm, body: list[int]) -> None:
    """Rewire the tiny model into a bigram model that continues `body` (cyclically) about half the time
    at temperature 1 and top-k 6: blocks add nothing to the residual stream, and the head scores the
    pattern's successor of the current token. Drafts are then kept and rejected in good measure."""
    m = llm.model
    with torch.no_grad():
        for block in m.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        emb = m.model.embed_tokens.weight
        normed = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()
        for i, a in enumerate(body):
            m.lm_head.weight[body[(i + 1) % len(body)]] = 0.06 * normed[a]


def test_sampling_with_speculation_matches_plain_sampling(tiny_hf):
    """Two-sample chi-squared on the second and third generated tokens of 1200 sequences each, drafts on
    and off, with a model that makes drafts worth checking."""
    llm = devstral.load(tiny_hf, kv_cache_dtype="fp32")
    prompt = repetitive_prompt(0)
    pattern_following(llm, prompt[1:13])
    params = SamplingParams(temperature=1.0, top_k=6, top_p=1.0, min_p=0.0)
    counts = {}
    for mode in ("off", "lookup"):
        engine = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=1200, max_num_batched_tokens=1 << 16,
                                                            kv_cache_dtype="fp32", speculative=mode,
                                                            spec_max_batch=10_000),
                        compute_dtype=torch.float32, plan=(256, 1200 * 80))
        engine.scheduler.step_costs = None  # draft wherever a match is found, whatever this CPU's timings
        seqs = [engine.add(prompt, params, 4, set()) for _ in range(1200)]
        while engine.has_work():
            engine.step()
        counts[mode] = [np.bincount([s.token_ids[s.num_prompt_tokens + k] for s in seqs], minlength=4096)
                        for k in (1, 2)]
        if mode == "lookup":
            st_ = engine.stats
            assert st_.drafted_tokens > 500 and 0.2 < st_.accepted_tokens / st_.drafted_tokens < 0.8
    for k in range(2):
        table = np.stack([counts["off"][k], counts["lookup"][k]])
        table = table[:, table.sum(0) >= 10]
        assert contingency_p(table) > 1e-3


def test_step_costs_ratio_is_the_marginal_cost_in_plain_steps():
    from devstral.engine.speculative import PRIOR_ROW_COST, StepCosts

    costs = StepCosts()
    assert costs.ratio(1, 1, 16) is None  # nothing measured: the drafter uses its prior
    costs.record(1, 0.5)  # a row count's first step is not kept (a graph's first replay)
    costs.record(16, 0.012)
    assert costs.ratio(1, 1, 16) is None
    costs.record(16, 0.012)
    assert costs.ratio(1, 1, 16) == float("inf")  # the plain step is measured first
    costs.record(1, 0.010)
    assert abs(costs.ratio(1, 1, 16) - 1.2) < 1e-9
    assert abs(costs.ratio(1, 1, 1) - 1.0) < 1e-9
    # an unmeasured row count: the nearest measured one below it, plus the prior per extra row
    assert abs(costs.ratio(1, 1, 20) - (1.2 + PRIOR_ROW_COST * 4)) < 1e-9
    # a sequence adding rows to a step that already has 4 (unmeasured: as 1) in a batch of 2
    costs.record(2, 0.011)
    costs.record(2, 0.011)
    assert abs(costs.ratio(2, 4, 16) - (1 + (0.012 - 0.011) / 0.011)) < 1e-9
    costs.record(1, 0.020)  # a moving average: moves a fifth of the way
    assert abs(costs.seconds[1] - 0.012) < 1e-12
    costs.record(1, 10.0)  # a stray pause counts as twice the average at most
    assert abs(costs.seconds[1] - (0.012 + 0.2 * 0.012)) < 1e-12


def test_the_drafter_picks_the_k_with_the_most_tokens_per_unit_of_cost():
    """Against a brute-force search over the offered k, for acceptances and cost tables fed in."""
    from devstral.engine.speculative import MIN_GAIN, Drafter, expected_tokens

    assert expected_tokens(0.0, 7) == 1.0 and expected_tokens(1.0, 7) == 8.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12  # 1 + 0.5 + 0.25
    ks = [1, 3, 7, 15]
    for a in (0.05, 0.3, 0.6, 0.9, 0.99):
        for per_row in (0.0, 0.01, 0.05, 0.3):
            d = Drafter()
            d.kept_w, d.tried_w = a, 1.0
            ratio = lambda k, per_row=per_row: 1.02 + per_row * k  # noqa: E731
            gains = {k: expected_tokens(a, k) / ratio(k) for k in ks}
            best = max(gains, key=gains.get)
            want = best if gains[best] > MIN_GAIN else 0
            assert d.choose(ks, ratio) == want, (a, per_row)


def test_the_acceptance_estimate_is_the_chance_a_draft_is_kept_after_kept_ones():
    from devstral.engine.speculative import Drafter

    g = np.random.default_rng(0)
    for a in (0.1, 0.5, 0.9):
        d = Drafter()
        d.DECAY = 1.0  # plain counts: the maximum-likelihood estimate
        for _ in range(4000):
            k = int(g.integers(1, 16))
            kept = 0
            while kept < k and g.random() < a:
                kept += 1
            d.record(k, kept)
        assert abs(d.acceptance - a) < 0.02


def simulate(q: float, verify_cost, steps: int = 3000, seed: int = 0) -> tuple[float, float]:
    """A sequence decoding text whose drafts are each kept with probability q (given the earlier ones
    were), on a machine where a step of r rows takes verify_cost(r) plain steps, with the engine's
    measured costs and the drafter's choice in the loop. -> (tokens per unit of time against plain
    decode, share of steps that drafted)."""
    from devstral.engine.speculative import Drafter, StepCosts

    g = np.random.default_rng(seed)
    tokens = [5, 6, 7, 8, 9] * 40  # always a continuation to propose: every k is available
    buckets = [1, 2, 3, 4, 6, 8, 12, 16]
    costs, d = StepCosts(), Drafter()
    made, spent, drafting = 0, 0.0, 0
    for _ in range(steps):
        ks = [b - 1 for b in buckets[1:]]
        draft = d.propose(tokens, ks, lambda k: costs.ratio(1, 1, k + 1))
        rows = next(b for b in buckets if b >= 1 + len(draft))
        t = verify_cost(rows) * (1 + 0.05 * g.standard_normal())  # jitter, as measured step times have
        costs.record(rows, t)
        kept = 0
        while kept < len(draft) and g.random() < q:
            kept += 1
        d.record(len(draft), kept)
        made += kept + 1
        spent += verify_cost(rows)
        drafting += bool(draft)
    return made / spent, drafting / steps


def test_drafting_turns_itself_off_when_drafts_do_not_pay_for_their_verify_step():
    """Prose (drafts seldom kept) never loses more than the probes cost, with verify steps as cheap as a
    CUDA graph makes them or as dear as eager ones were; copied text gains what the costs allow."""
    graph = lambda rows: 1.0 + 0.012 * (rows - 1)  # noqa: E731  (H200 graph replay: a few % per row)
    eager = lambda rows: 1.0 if rows == 1 else 2.1 + 0.02 * rows  # noqa: E731  (launch-bound eager verify)
    for q in (0.05, 0.15, 0.3):
        for cost in (graph, eager):
            speed, share = simulate(q, cost)
            assert speed >= 0.95, (q, speed)
        assert share < 0.05  # eager verify never pays at this acceptance: only the probes draft
    assert simulate(0.9, graph)[0] > 4.0  # a file rewrite: long drafts, few extra rows' cost
    assert simulate(0.6, graph)[0] > 1.8
    speed, share = simulate(0.9, eager)
    assert speed > 2.0 and share > 0.9


def _prefilled(engine, prompts: list[list[int]]):
    seqs = [engine.add(p, SamplingParams(temperature=0), 50, set()) for p in prompts]
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    return seqs


def test_verify_rows_give_the_full_forward_logits(tmp_path, tiny_ministral3):
    """A step mixing a sequence verifying drafts, a plain decode and a prompt chunk: the verify rows are
    decode rows (one table, contexts n+1, n+2, ...: the layout a CUDA graph replays), and every row's
    logits equal the model's own forward over the whole sequence, without any cache. With a sliding
    window shorter than the drafts' span too."""
    from devstral.engine.scheduler import ScheduledSeq
    from devstral.testing import make_tiny_checkpoint

    window = make_tiny_checkpoint(tmp_path / "sw", arch="mistral", seed=4, sliding_window=6)
    for ckpt in (tiny_ministral3, window):
        llm = devstral.load(ckpt, kv_cache_dtype="fp32", speculative="off")
        engine = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=4, kv_cache_dtype="fp32", speculative="off",
                                                            prefix_caching=False),
                        compute_dtype=torch.float32, plan=(256, 2048))
        a, b = _prefilled(engine, [repetitive_prompt(0), repetitive_prompt(1)[:30]])
        c = engine.add(repetitive_prompt(2), SamplingParams(temperature=0), 5, set())
        engine.scheduler.schedule()  # admits c: its blocks are allocated
        draft = [7, 1500, 1501, 9, 2000]
        assert engine.blocks.ensure_capacity(a, a.num_tokens + len(draft))
        batch = [ScheduledSeq(a, 1 + len(draft), draft), ScheduledSeq(b, 1), ScheduledSeq(c, 20)]
        inputs, sampling = engine.runner.step_inputs(batch)
        n = a.num_computed
        assert inputs.context.tolist() == [n + 1 + j for j in range(6)] + [b.num_computed + 1]
        assert (inputs.tables[:6] == inputs.tables[0]).all() and [ch[:3] for ch in inputs.chunks] == [(7, 20, 0)]
        logits = engine.runner.run(inputs)  # rows: a's 6, b's 1 (c's chunk does not sample yet)
        assert [s.seq for s in sampling] == [a, b] and logits.shape[0] == 7
        ref_a = llm.logits(a.token_ids + draft)[n:]
        ref_b = llm.logits(b.token_ids)[-1:]
        torch.testing.assert_close(logits[:6], ref_a, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[6:], ref_b, rtol=1e-4, atol=1e-4)
        # c's chunk stored its keys and values: its next rows see them (checked through its logits)
        c.num_computed = 20
        rest = engine.runner.run(engine.runner.step_inputs([ScheduledSeq(c, c.num_tokens - 20)])[0])
        torch.testing.assert_close(rest, llm.logits(c.token_ids)[-1:], rtol=1e-4, atol=1e-4)


def test_speculation_shares_steps_with_prefills_and_plain_decodes(tiny_hf):
    """Sequences arriving while others verify drafts (their prompt chunks in the same steps), greedy: the
    tokens are those of plain decoding. The model continues a pattern the prompts partly follow."""
    llm = devstral.load(tiny_hf, kv_cache_dtype="fp32")
    pattern_following(llm, repetitive_prompt(0)[1:13])
    outs = {}
    for mode in ("off", "lookup"):
        engine = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=4, max_num_batched_tokens=40,
                                                            kv_cache_dtype="fp32", speculative=mode,
                                                            prefix_caching=False),
                        compute_dtype=torch.float32, plan=(512, 4096))
        engine.scheduler.step_costs = None  # draft wherever a match is found, whatever this CPU's timings
        mixed, run = [], engine.runner.step

        def watched(batch, run=run, mixed=mixed):
            mixed.append(any(it.draft for it in batch) and any(it.n_tokens > 1 and not it.draft for it in batch))
            return run(batch)

        engine.runner.step = watched
        seqs = []
        for i in range(4):  # a new sequence every few steps: its prompt chunks meet the others' drafts
            seqs.append(engine.add(repetitive_prompt(0)[:30 + 7 * i], SamplingParams(temperature=0), 60, set()))
            for _ in range(2):
                engine.step()
        while engine.has_work():
            engine.step()
        outs[mode] = [s.token_ids for s in seqs]
        if mode == "lookup":
            assert any(mixed) and engine.stats.accepted_tokens > 0
    assert outs["lookup"] == outs["off"]
