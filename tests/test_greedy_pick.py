"""The greedy token and NaN flag of every logits row in one launch (kernels/greedy_pick*.py), against the
sampler it stands in for (engine/sampling.sample with greedy rows, and torch.isnan(...).any) -- on CPU in
Triton's interpreter (kernels_for runs an interpreted copy for CPU tensors) -- and the overlapped engine
taking it (DEVSTRAL_GREEDY_PICK=1) against the engine without overlap. GPU (`-m gpu`): the CUDA kernel at
Devstral's vocabulary."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import devstral
from devstral.engine.sampling import SamplingParams, sample
from devstral.kernels import greedy_pick
from devstral.kernels.greedy_pick import greedy_pick_ref

pytest.importorskip("triton")

GREEDY = SamplingParams(temperature=0)


def hard_rows(v: int, seed: int = 0) -> torch.Tensor:
    """Rows that exercise every rule: NaNs, +-inf, ties at the top in different blocks, an all-NaN row, an
    all -inf row with one NaN, a row whose maximum is in the last, partial block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, v, generator=g) * 4
    x[0, 17] = float("nan")
    x[1, :] = float("nan")
    x[2, [3, v - 5]] = float("inf")
    x[3, :] = float("-inf")
    x[3, v // 2] = float("nan")
    x[4, [10, v // 2, v - 1]] = 50.0  # a tie across blocks: the first index
    x[5, v - 1] = 99.0
    x[6, :] = float("-inf")
    x[6, [7, 9]] = torch.finfo(torch.float32).max  # -inf lowest finite, the largest finite tied
    x[7, ::3] = float("nan")
    return x


def sampler(logits: torch.Tensor) -> torch.Tensor:
    """What the loop computes without the kernel: sample()'s tokens and the NaN flags."""
    s = logits.shape[0]
    return torch.stack([sample(logits, [GREEDY] * s, [[]] * s, [None] * s), torch.isnan(logits).any(-1).long()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_reference_is_the_greedy_sampler(dtype):
    x = hard_rows(1000).to(dtype)
    assert torch.equal(greedy_pick_ref(x), sampler(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("v,block", [(1000, 256), (1024, 256), (777, 1024)])
def test_kernel_matches_the_sampler(dtype, v, block):
    """Several programs a row (the last one partial), one program a row; a second call gives the same
    (the slots and counters were re-armed); a strided view of wider rows."""
    from devstral.kernels.greedy_pick_triton import greedy_pick_triton

    x = hard_rows(v).to(dtype)
    want = sampler(x)
    assert torch.equal(greedy_pick_triton(x, block=block), want)
    assert torch.equal(greedy_pick_triton(x, block=block), want)
    wide = torch.zeros(8, v + 64, dtype=dtype)
    wide[:, :v] = x
    wide[:, v:] = 1e4  # outside the view: never picked
    assert torch.equal(greedy_pick_triton(wide[:, :v], block=block), want)


def test_the_overlapped_engine_takes_it_and_gives_the_same_tokens(tiny_hf, monkeypatch):
    """DEVSTRAL_GREEDY_PICK=1 and every row greedy: the overlapped loop's steps go through the kernel
    (interpreted here) and return what the engine without overlap returns, call for call; a row with a
    sampled request keeps sample()."""
    from devstral.engine.engine import Engine, EngineConfig
    from devstral.kernels.greedy_pick_triton import greedy_pick_triton

    llm = devstral.load(tiny_hf, kv_cache_dtype="fp32")
    calls = []

    def counted(logits):
        calls.append(logits.shape[0])
        return greedy_pick_triton(logits)

    monkeypatch.setattr(greedy_pick, "greedy_pick", counted)
    monkeypatch.setenv("DEVSTRAL_GREEDY_PICK", "1")
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(1000, 3000, (5 + 7 * i,), generator=g).tolist() for i in range(3)]

    def run(overlap: bool, params) -> list:
        ec = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, kv_cache_dtype="fp32", overlap=overlap,
                          speculative="off")
        engine = Engine(llm.model, llm.config, ec, compute_dtype=torch.float32, plan=(256, 2048))
        seqs = [engine.add(p, q, 8, set()) for p, q in zip(prompts, params, strict=True)]
        trace = []
        while engine.has_work():
            trace.append(sorted((seqs.index(s), s.token_ids[-1]) for s in engine.step()))
        return trace

    greedy = [GREEDY] * 3
    assert run(True, greedy) == run(False, greedy)
    assert calls and set(calls) <= {1, 2, 3}
    calls.clear()
    mixed = [GREEDY, SamplingParams(temperature=0.8, seed=3), GREEDY]
    assert run(True, mixed) == run(False, mixed)
    assert not calls


def _atoms() -> dict:
    """Executed in a subprocess (no interpreter state from the tests above): the kernel's PTX atomics, sm_90."""
    from devstral.kernels import sass_stats
    from devstral.kernels.greedy_pick_triton import _greedy_pick_kernel

    out = {}
    for dtype in ("*bf16", "*fp32"):
        sig = {"x_ptr": dtype, "s_xm": "i32", "V": "i32", "out_ptr": "*i64", "S": "i32", "key_ptr": "*i64",
               "flag_ptr": "*i32", "cnt_ptr": "*i32"}
        ptx = sass_stats.compile_kernel(_greedy_pick_kernel, sig, {"BLOCK": 4096}, num_warps=4).asm["ptx"]
        out[dtype] = [line.split()[1] for line in ptx.splitlines() if "atom.global" in line]
    return out


def test_the_kernel_compiles_for_sm90_with_64_bit_atomics():
    """Offline, for the H100/H200: the row slot takes a 64-bit atomic max (value and index in one word, so no
    two programs can leave a value from one and an index from another), and the counter's add is acq_rel, so
    the last program sees every slot update counted before it."""
    from devstral.kernels import sass_stats

    if not sass_stats.tools_available():
        pytest.skip("Triton's ptxas not shipped on this platform")
    for atoms in sass_stats.offline_json(__file__, "--ptx").values():
        assert any(a.endswith(".max.s64") for a in atoms), atoms
        assert any(".acq_rel" in a and a.endswith(".add.u32") for a in atoms), atoms


@pytest.mark.gpu
def test_cuda_kernel_at_devstrals_vocabulary():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from devstral.kernels.greedy_pick_triton import greedy_pick_triton

    for rows in (1, 8):
        x = torch.cat([hard_rows(131072, seed=rows)] * (rows // 8 + 1))[:rows].cuda().to(torch.bfloat16)
        want = greedy_pick_ref(x)
        for _ in range(3):  # re-armed between launches
            assert torch.equal(greedy_pick_triton(x), want)
    graph, x = torch.cuda.CUDAGraph(), hard_rows(131072).cuda().to(torch.bfloat16)
    with torch.cuda.graph(graph):
        out = greedy_pick_triton(x)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, greedy_pick_ref(x))


if __name__ == "__main__" and sys.argv[1:] == ["--ptx"]:
    print(json.dumps(_atoms()))
