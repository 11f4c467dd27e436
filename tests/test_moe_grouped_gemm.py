"""The grouped expert GEMM (kernels/moe_grouped_gemm.py) on CPU: its logic through Triton's interpreter,
and its sm_90 build offline.

Interpreter: one subprocess (this file as a script, TRITON_INTERPRET=1) runs every case and saves inputs
and outputs. Per type, E = 4 random experts of 64 x 256 (Q8_0 at K 160: the last K iteration masked)
and uneven counts: empty experts (first, middle, last), counts below, at and above a row tile, and
one pair each (every tile partial: the grid's bound is then reached exactly). Each against the
experts dequantized by the exact codecs and multiplied in fp32, and against gguf_gemm's dense kernel on
each expert's slice alone with the same tiles, bit for bit (the K loop is one function; the interpreter's
dot is fp32, so this checks that the grouped kernel feeds it the same tiles, not the GPU's rounding).

Offline: the default launch of each type compiled for sm_90 (Triton's ptxas, no GPU): wgmma, no
register spills, and a K loop within a few percent of the dense kernel's at the same tiles.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import interpreter_runs

pytest.importorskip("triton")

from devstral.quant import QType, dequantize  # noqa: E402

E, N = 4, 64
K = {QType.Q4_K: 256, QType.Q5_K: 256, QType.Q6_K: 256, QType.Q8_0: 160}
COUNTS = {QType.Q4_K: [(0, 37, 5, 32), (1, 1, 1, 1)], QType.Q5_K: [(5, 0, 37, 20)],
          QType.Q6_K: [(16, 33, 0, 1)], QType.Q8_0: [(37, 5, 20, 0)]}
# row tiles of 16: several per expert, GROUP_M 2 groups crossing experts, N in two tiles
SMALL = dict(bm=16, bn=32, nsub=2, group_m=2, num_warps=4, num_stages=1)


def _run_cases(out_path: str) -> None:
    from devstral.kernels import gguf_gemm
    from devstral.kernels.gguf_pack import pack
    from devstral.kernels.moe_experts import stack_packed
    from devstral.kernels.moe_grouped_gemm import grouped_gemm
    from test_kernels_gguf_interpret import random_blocks

    g = torch.Generator().manual_seed(0)
    res = {}
    for qt, k in K.items():
        raws = [random_blocks(qt, N, k, g) for _ in range(E)]
        stack = stack_packed([pack(r, qt, N, k) for r in raws])
        for counts in COUNTS[qt]:
            p = sum(counts)
            xs = torch.randn(p, k, generator=g).to(torch.bfloat16)
            cnt = torch.tensor(counts)
            # fp32 output: the interpreter's dot is fp32, so only the summation order separates it from the
            # reference; NaN-filled, so a row no program wrote shows
            small = grouped_gemm(xs, cnt, stack, N, out=torch.full((p, N), float("nan")), config=SMALL)
            dense, start = [], 0
            for e, c in enumerate(counts):
                if c:
                    dense.append(gguf_gemm.gemm(xs[start:start + c], stack.row_slice(e * N, (e + 1) * N), None,
                                                torch.empty(c, N), bn=SMALL["bn"], bm=SMALL["bm"], nsub=SMALL["nsub"],
                                                group_m=SMALL["group_m"]))
                start += c
            # the default launch constants, bf16 in and out as the MoE layer runs it
            default = grouped_gemm(xs, cnt.to(torch.int32), stack, N)
            res[(qt.name, counts)] = {"raws": raws, "xs": xs, "small": small, "dense": torch.cat(dense),
                                      "default": default}
    torch.save(res, out_path)


@pytest.fixture(scope="module")
def results():
    return interpreter_runs.results(__file__, timeout=600)


def _reference(r: dict, qt: QType, counts: tuple) -> torch.Tensor:
    k = K[qt]
    bounds = torch.tensor((0, *counts)).cumsum(0).tolist()
    return torch.cat([r["xs"][bounds[e]:bounds[e + 1]].float() @ dequantize(r["raws"][e], qt, (N, k)).T
                      for e in range(E)])


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


CASES = [(qt, counts) for qt, sets in COUNTS.items() for counts in sets]
IDS = [f"{qt.name}_{'-'.join(map(str, c))}" for qt, c in CASES]


@pytest.mark.parametrize(("qt", "counts"), CASES, ids=IDS)
def test_grouped_gemm_matches_each_expert_dequantized_then_multiplied(results, qt, counts):
    r = results[(qt.name, counts)]
    assert not r["small"].isnan().any()  # every pair's row written
    assert _rel(r["small"], _reference(r, qt, counts)) < 1e-5  # fp32 dot: summation order only


@pytest.mark.parametrize(("qt", "counts"), CASES, ids=IDS)
def test_each_experts_rows_are_the_dense_kernels_on_its_slice_bit_for_bit(results, qt, counts):
    r = results[(qt.name, counts)]
    assert torch.equal(r["small"], r["dense"])


@pytest.mark.parametrize(("qt", "counts"), CASES, ids=IDS)
def test_the_default_launch_in_bf16(results, qt, counts):
    """BM 64 (every expert one partial tile here), BN 128 (the 64 rows masked), bf16 output: the
    interpreter rounds fp32 -> bf16 by truncation, ~2^-8 a value."""
    r = results[(qt.name, counts)]
    assert r["default"].dtype == torch.bfloat16
    assert _rel(r["default"], _reference(r, qt, counts)) < 1e-2


def test_plan_and_candidates(monkeypatch):
    """The default for each type steps 64 values of K; a benchmark's TUNED entry wins for its shape;
    every candidate is a whole number of sub-blocks per step, and the default is among them."""
    from devstral.kernels import moe_grouped_gemm as mg

    for qtype, sb in (("Q4_K", 32), ("Q5_K", 32), ("Q6_K", 16), ("Q8_0", 32)):
        cfg = mg.plan(qtype, 14336, 4096)
        assert cfg["nsub"] * sb == 64 and cfg["bm"] == 64 and cfg["bn"] == 128
        cands = mg.candidates(qtype)
        assert cfg in cands and len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)
        assert all(c["nsub"] * sb in (64, 128) for c in cands)
    monkeypatch.setitem(mg.TUNED, "Q4_K|14336|4096", {**mg.default_config("Q4_K"), "bm": 128, "num_warps": 8})
    assert mg.plan("Q4_K", 14336, 4096)["bm"] == 128
    assert mg.plan("Q4_K", 4096, 14336)["bm"] == 64


def test_a_stack_that_does_not_match_the_counts_is_refused():
    from devstral.kernels.gguf_pack import PackedGGUF
    from devstral.kernels.moe_grouped_gemm import grouped_gemm

    w = PackedGGUF.empty(QType.Q4_K, 3 * 64, 256, torch.device("cpu"))
    with pytest.raises(ValueError, match="for 4 experts"):
        grouped_gemm(torch.zeros(2, 256, dtype=torch.bfloat16), torch.tensor([1, 1, 0, 0]), w, 64)


# sm_90 build: (QT code, SB, WPS, sc dtype, qh dtype) per type, as the planar layout stores them
SASS_TYPES = {"Q4_K": (0, 32, 4, "*u8", "*u8"), "Q5_K": (1, 32, 4, "*u8", "*u8"), "Q6_K": (2, 16, 2, "*i8", "*i16"),
              "Q8_0": (3, 32, 8, "*u8", "*u8")}


def _sass_counts() -> dict:
    from devstral.kernels import sass_stats
    from devstral.kernels.gguf_gemm import _gemm_kernel
    from devstral.kernels.moe_grouped_gemm import _grouped_kernel, default_config

    out = {}
    for qtype, (qt, sb, wps, sc_t, qh_t) in SASS_TYPES.items():
        cfg = default_config(qtype)
        fields = {"q_ptr": "*i32", "qh_ptr": qh_t, "sc_ptr": sc_t, "mn_ptr": "*u8", "d_ptr": "*fp16", "dm_ptr": "*fp16"}
        tiles = dict(QT=qt, SB=sb, WPS=wps, BN=cfg["bn"], BM=cfg["bm"], NSUB=cfg["nsub"], GROUP_M=cfg["group_m"])
        grouped = {"x_ptr": "*bf16", "out_ptr": "*bf16", "cnt_ptr": "*i64", **fields,
                   **dict.fromkeys(("E", "N", "K", "s_xm", "s_om", "s_q", "s_qh", "s_sc", "s_d", "one"), "i32")}
        dense = {"x_ptr": "*bf16", "out_ptr": "*bf16", "bias_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
                 **fields, **dict.fromkeys(("M", "N", "K", "s_xm", "s_om", "s_q", "s_qh", "s_sc", "s_d", "one",
                                            "SPLIT_K"), "i32")}
        row = {}
        for name, fn, sig, const in (("grouped", _grouped_kernel, grouped, {**tiles, "EP": 8, "DOT": 0}),
                                     ("dense", _gemm_kernel, dense, {**tiles, "SPLIT": False, "DOT": 0,
                                                                     "HAS_BIAS": False})):
            # what the launcher specializes at Mixtral's shapes: aligned pointers, sizes and strides
            div16 = [n for n, t in sig.items() if t.startswith("*")] + ["N", "K", "s_xm", "s_om", "s_q"]
            sass = sass_stats.compile_sass(fn, sig, const, div16=div16, num_warps=cfg["num_warps"],
                                           num_stages=cfg["num_stages"])
            st = sass_stats.loop_stats(sass)
            row[name] = {"loop": st.instructions, "spilled": st.registers_spilled, "wgmma": "HGMMA" in sass}
        out[qtype] = row
    return out


@pytest.fixture(scope="module")
def sass_counts():
    from devstral.kernels import sass_stats

    if not sass_stats.tools_available():
        pytest.skip("Triton's ptxas / nvdisasm not shipped on this platform")
    return sass_stats.offline_json(__file__, "sass")


@pytest.mark.parametrize("qtype", list(SASS_TYPES))
def test_the_default_launch_builds_for_sm90_like_the_dense_kernel(sass_counts, qtype):
    """Counted when written (loop SASS instructions, grouped / dense): Q4_K 642 / 636, Q5_K 1310 / 1299, Q6_K
    1556 / 1543, Q8_0 663 / 644: the grouped kernel adds 64-bit activation addresses, nothing per weight."""
    st = sass_counts[qtype]
    assert st["grouped"]["wgmma"] and not st["grouped"]["spilled"]
    assert st["grouped"]["loop"] <= 1.06 * st["dense"]["loop"], st


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    if sys.argv[1] == "sass":
        print(json.dumps(_sass_counts()))
    else:
        _run_cases(sys.argv[1])
