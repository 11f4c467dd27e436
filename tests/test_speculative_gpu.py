"""Speculative verification inside CUDA graphs, on the GPU: verify steps replay the captured row
buckets, greedy output with drafts is plain greedy output token for token (fp32), and a replayed verify
step gives the eager pass's logits (bf16). Run on the GPU machine:
`python -m pytest -m gpu tests/test_speculative_gpu.py`."""

from __future__ import annotations

import pytest
import torch

import devstral
from devstral.engine.sampling import SamplingParams
from devstral.engine.scheduler import ScheduledSeq
from devstral.testing import make_tiny_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GREEDY = SamplingParams(temperature=0)
DIMS = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=768)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("spec_gpu"), arch="ministral3", seed=2, **DIMS)


def body(seed: int) -> list[int]:
    return torch.randint(1000, 3000, (12,), generator=torch.Generator().manual_seed(seed)).tolist()


def follow_pattern(llm, pattern: list[int]) -> None:
    """Make the model continue `pattern` cyclically (blocks add nothing; the head scores each token's
    successor), so that drafts copied from the prompt are kept, except where the prompt's latest copy
    of the pattern was altered: there they are rejected."""
    m = llm.model
    with torch.no_grad():
        for block in m.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        emb = m.model.embed_tokens.weight
        normed = emb / emb.float().pow(2).mean(-1, keepdim=True).sqrt().to(emb.dtype)
        for i, a in enumerate(pattern):
            m.lm_head.weight[pattern[(i + 1) % len(pattern)]] = 0.06 * normed[a]


def prompt(pattern: list[int], i: int) -> list[int]:
    altered = list(pattern)
    altered[7 + i % 4] = 2999 - i  # the most recent copy differs after the prompt's tail: drafts from it
    return [1] + pattern * 3 + altered + pattern[:5 + i]  # are rejected there


def generate(llm, prompts, n: int = 48):
    seqs = [llm.engine.add(p, GREEDY, n, set()) for p in prompts]
    while llm.engine.has_work():
        llm.engine.step()
    return [s.token_ids for s in seqs]


@pytest.mark.parametrize("parallel", [1, 3])
def test_greedy_with_graph_verification_is_plain_greedy(ckpt, parallel):
    pattern = body(0)
    prompts = [prompt(pattern, i) for i in range(parallel)]
    outs, replays = {}, []
    for mode, graphs in (("off", True), ("lookup", True), ("lookup", False)):
        llm = devstral.load(ckpt, device="cuda", dtype="fp32", kv_cache_dtype="fp32", parallel=parallel,
                            speculative=mode, cuda_graphs=graphs, prefix_caching=False)
        follow_pattern(llm, pattern)
        if mode == "lookup" and graphs:
            runner = llm.engine.runner
            assert runner.graphs is not None and 16 in runner.row_buckets and 2 in runner.row_buckets
            run = runner.graphs.run
            runner.graphs.run = lambda n, *a, run=run: (replays.append(n), run(n, *a))[1]
        llm.engine.scheduler.step_costs = None  # draft wherever a match is found, whatever the timings
        outs[(mode, graphs)] = generate(llm, prompts)
        if mode == "lookup":
            st = llm.engine.stats
            assert st.accepted_tokens > 0 and st.accepted_tokens < st.drafted_tokens  # kept and rejected drafts
    assert outs[("lookup", True)] == outs[("off", True)] == outs[("lookup", False)]
    assert any(n > parallel for n in replays)  # verify steps replayed graphs


def test_replayed_verify_step_gives_the_eager_logits(ckpt):
    llm = devstral.load(ckpt, device="cuda", kv_cache_dtype="bf16", speculative="lookup", prefix_caching=False,
                        max_context=1024)  # a 241-token prompt and 64 new tokens
    engine, runner = llm.engine, llm.engine.runner
    seq = engine.add([1] + body(1) * 20, GREEDY, 64, set())
    while seq.num_output_tokens == 0:
        engine.step()
    with torch.inference_mode():  # the runner's static graph inputs are inference tensors (engine.step's mode)
        for k in (1, 3, 7, 11, 15):
            draft = (body(2 + k) * 2)[:k]  # k drafts (body() has 12 tokens: k = 15 took 12 and made no sampling row)
            assert engine.blocks.ensure_capacity(seq, seq.num_tokens + k)
            inputs, _ = runner.step_inputs([ScheduledSeq(seq, 1 + k, draft)])
            assert inputs.graph and runner.graphs.bucket(1 + k) == 1 + k
            replayed = runner.run(inputs).float().clone()
            inputs.graph = False
            eager = runner.run(inputs).float()
            err = float((replayed - eager).norm() / eager.norm())
            assert err < 1e-2, (k, err)
            assert (replayed.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.9
    ref = llm.logits(seq.token_ids + draft)[seq.num_tokens - 1:].float()
    assert float((replayed - ref).norm() / ref.norm()) < 3e-2
