"""The TMA decode GEMV (kernels/gguf_gemv_tma.py) on CPU: in Triton's interpreter (TMA boxes become masked loads
there) against the streaming GEMV's xq path it shares its arithmetic with, bit for bit, and against the weights
dequantized by quant.dequantize; offline for sm_90, that its tiles do come by TMA, without spills, and that nothing
is loaded or stored before a dependent launch's wait.

Shapes keep the kernel's cases small: a row tile cut by N (TMA's zero rows), a K-tile cut by K (Q4_K at K = 3072 in
tiles of 2048; Q4_K's K a multiple of 1024, for its mins plane's 16-byte rows), Q4_K's mins box holding the next tile's
bytes (16 sub-blocks a tile: 8 bytes of mins in a 16-byte box), the super-block scales read as words of two (Q4_K; Q6_K at 32 sub-blocks a tile) or one by one
(Q6_K at 16, or an odd count a row), splits uneven and empty,
stream-K programs spanning two row tiles, 2-4 pipeline stages, a register cap, a bias, the SwiGLU folded into the activation
quantization, and the dispatcher running a tuned "wide_tma" entry (and the streaming GEMV where it cannot).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import interpreter_runs

pytest.importorskip("triton")

from devstral.kernels.gguf_pack import pack  # noqa: E402
from devstral.quant import QType, dequantize  # noqa: E402
from test_kernels_gguf_wide import random_blocks  # noqa: E402

N = 40
# (type, K, BN, NS, split, stages, bias)
CASES = [("Q4_K", 2048, 16, 16, 1, 2, False), ("Q4_K", 2048, 16, 16, 2, 3, True), ("Q4_K", 3072, 32, 64, 2, 2, False),
         ("Q6_K", 768, 16, 16, 1, 3, False), ("Q6_K", 768, 32, 16, 4, 2, True), ("Q6_K", 1024, 16, 32, 2, 3, False),
         ("Q8_0", 768, 32, 8, 2, 4, False), ("Q8_0", 768, 16, 16, 1, 2, True)]
# stream-K: (type, K, BN, NS, programs per "SM", stages, bias), on a grid of 2 "SMs" so that programs span two row
# tiles and row tiles are shared by two or three programs
STREAM_CASES = [("Q4_K", 2048, 16, 16, 2, 2, True), ("Q6_K", 768, 16, 16, 1, 3, False), ("Q8_0", 768, 32, 8, 2, 2, False)]


def _run_cases(out_path: str) -> None:
    """Executed in the subprocess, under the interpreter."""
    from devstral.kernels import gguf_config, gguf_gemv_tma, gguf_gemv_wide, gguf_linear

    g = torch.Generator().manual_seed(0)

    def both(case, tma: dict, wide: dict) -> dict:
        """One random weight and row through the TMA GEMV and the streaming xq GEMV (each output starts as NaN)."""
        qtype, k, bn, ns, _, _, with_bias = case
        raw = random_blocks(QType[qtype], N, k, g)
        p = pack(raw, QType[qtype], N, k)
        x = torch.randn(1, k, generator=g)
        bias = torch.randn(N, generator=g) if with_bias else None
        out, ref = torch.full((1, N), float("nan")), torch.full((1, N), float("nan"))
        gguf_gemv_tma.gemv(x, p, bias, out, bn=bn, ns=ns, **tma)
        gguf_gemv_wide.gemv(x, p, bias, ref, bn=bn, ns=ns, bm=1, int8=True, xq=True, **wide)
        return dict(case=case, raw=raw, x=x, bias=bias, out=out, wide=ref)

    res = {"cases": [both(c, dict(split_k=c[4], num_stages=c[5], pairs=True), dict(split_k=c[4])) for c in CASES]}
    # stream-K against the streaming GEMV's, both on a grid as if the GPU had two SMs (scales one by one)
    two_sms = lambda per_sm, units, device: max(1, min(units, 2 * per_sm))  # noqa: E731
    gguf_gemv_wide.stream_programs = gguf_gemv_tma.stream_programs = two_sms
    # (the last under a register cap: a compile option, the same arithmetic)
    res["stream"] = [both(c, dict(stream=c[4], num_stages=c[5], maxnreg=80 if i == len(STREAM_CASES) - 1 else None),
                          dict(stream=c[4])) for i, c in enumerate(STREAM_CASES)]
    # the SwiGLU folded into the activation quantization: x is a gate/up projection's [gate | up] rows
    raw = random_blocks(QType.Q4_K, N, 1024, g)
    p = pack(raw, QType.Q4_K, N, 1024)
    pre = torch.randn(1, 2048, generator=g)
    outs = [torch.full((1, N), float("nan")) for _ in range(2)]
    gguf_gemv_tma.gemv(pre, p, None, outs[0], bn=16, ns=16, split_k=2, num_stages=2, glu=True)
    gguf_gemv_wide.gemv(pre, p, None, outs[1], bn=16, ns=16, bm=1, split_k=2, int8=True, xq=True, glu=True)
    res["glu"] = outs
    # the dispatcher on a tuned "wide_tma" entry: one row runs it; three rows, which it does not serve, run the
    # streaming GEMV with the same tile
    plan = gguf_config.gguf_plan
    cfg = dict(bn=16, ns=16, bm=1, split_k=2, num_warps=4, num_stages=2, pairs=True, maxnreg=96)  # the register
    # loop takes none of the last three
    gguf_config.gguf_plan = lambda *a, **kw: ("wide_tma", dict(cfg))
    x3 = torch.randn(3, 1024, generator=g)
    res["dispatch"] = {"one": gguf_linear.linear(x3[:1], p), "three": gguf_linear.linear(x3, p)}
    gguf_config.gguf_plan = plan
    one = torch.full((1, N), float("nan"))
    gguf_gemv_tma.gemv(x3[:1], p, None, one, bn=16, ns=16, split_k=2, num_stages=2)
    three = torch.full((3, N), float("nan"))
    gguf_gemv_wide.gemv(x3, p, None, three, bn=16, ns=16, bm=gguf_gemv_wide.bm_for(3), split_k=2, int8=True, xq=True)
    res["dispatch"].update(one_ref=one, three_ref=three)
    torch.save(res, out_path)


@pytest.fixture(scope="module")
def results():
    return interpreter_runs.results(__file__, timeout=900)


def _ids():
    return ["{}_K{}_bn{}_ns{}_split{}_stages{}{}".format(*c[:6], "_bias" if c[6] else "") for c in CASES]


def _is_the_streaming_gemv_and_near_the_weights(r: dict) -> None:
    qtype, k = r["case"][0], r["case"][1]
    assert not r["out"].isnan().any()
    torch.testing.assert_close(r["out"], r["wide"], rtol=0, atol=0)
    w = dequantize(r["raw"], QType[qtype], (N, k))
    ref = r["x"] @ w.t() + (r["bias"] if r["bias"] is not None else 0)
    assert ((r["out"] - ref).norm() / (r["x"] @ w.t()).norm()).item() < 2e-2  # int8 activations per block of 32


@pytest.mark.parametrize("i", range(len(CASES)), ids=_ids())
def test_tma_gemv_is_the_streaming_xq_gemv_and_the_dequantized_weights(results, i):
    _is_the_streaming_gemv_and_near_the_weights(results["cases"][i])


@pytest.mark.parametrize("i", range(len(STREAM_CASES)),
                         ids=["{}_K{}_bn{}_ns{}_stream{}_stages{}{}".format(*c[:6], "_bias" if c[6] else "")
                              for c in STREAM_CASES])
def test_tma_stream_k_is_the_streaming_gemvs_stream_k(results, i):
    """Programs spanning two row tiles, row tiles summed from two or three programs' shares, in program order."""
    _is_the_streaming_gemv_and_near_the_weights(results["stream"][i])


def test_super_block_scales_go_as_words_of_two_where_rows_tiles_and_alignment_allow():
    """Four-byte words are what cp.async copies, so only they are prefetched by the pipeline (kernels/gguf_gemv_tma.py,
    _sub_block_scales); the words hold the same fp16 scales, two a word, low half first."""
    from devstral.kernels.gguf_gemv_tma import _super_block_scales

    g = torch.Generator().manual_seed(1)
    for qtype, k, nsb, pairs in [("Q4_K", 1536, 2, True), ("Q6_K", 1024, 2, True), ("Q6_K", 768, 2, False),
                                 ("Q6_K", 1024, 1, False), ("Q8_0", 1024, 8, False)]:
        p = pack(random_blocks(QType[qtype], 8, k, g), QType[qtype], 8, k)
        assert _super_block_scales(p, nsb, pairs=False)[2] is False  # only where asked
        d, dm, got = _super_block_scales(p, nsb)
        assert got == pairs, (qtype, k, nsb)
        if pairs:
            assert torch.equal(d.view(torch.float16), p["d"])
            assert torch.equal(dm.view(torch.float16), p.get("dmin") if p.get("dmin") is not None else p["d"])


def test_tma_gemv_folds_the_swiglu_as_the_streaming_gemv_does(results):
    out, wide = results["glu"]
    assert not out.isnan().any()
    torch.testing.assert_close(out, wide, rtol=0, atol=0)


def test_dispatcher_runs_a_tuned_tma_entry_at_one_row_and_the_streaming_gemv_above(results):
    r = results["dispatch"]
    torch.testing.assert_close(r["one"], r["one_ref"], rtol=0, atol=0)
    torch.testing.assert_close(r["three"], r["three_ref"], rtol=0, atol=0)


def test_which_weights_fit_tma_boxes():
    """Devstral-Small's matrices fit in the tiles the sweep times; rows whose scale arrays are not 16-byte multiples
    (Q4_K at K = 1280: 40 bytes of sub-block scales; at K = 1536: 24 bytes of their top bits), boxes under 16 bytes a
    row (Q4_K at 8 sub-blocks: 8 bytes of scales) and types without the xq row dot here (Q5_K) do not."""
    from devstral.kernels.gguf_gemv_tma import fits

    for qtype, k, bn, ns in [("Q4_K", 5120, 128, 16), ("Q4_K", 32768, 64, 32), ("Q6_K", 32768, 128, 16),
                             ("Q6_K", 5120, 64, 16), ("Q8_0", 5120, 64, 8), ("Q8_0", 4096, 128, 16)]:
        assert fits(qtype, k, bn, ns), (qtype, k, bn, ns)
    for qtype, k, bn, ns in [("Q4_K", 1280, 128, 16), ("Q4_K", 1536, 128, 16), ("Q4_K", 5120, 128, 8),
                             ("Q5_K", 5120, 128, 16),
                             ("Q4_K", 5120, 512, 16), ("Q8_0", 5120, 64, 4)]:
        assert not fits(qtype, k, bn, ns), (qtype, k, bn, ns)


def _offline() -> dict:
    """Executed in a subprocess (no interpreter state): sm_90 SASS and PTX facts of the candidate tiles."""
    import re

    from devstral.kernels import sass_stats
    from devstral.kernels.gguf_gemv_tma import _tma_kernel

    out = {}
    # (type code, BN, NS, stages, stream-K, super-block scales as words of two, register cap)
    for qt, bn, ns, stages, stream, pairs, cap in [
            (0, 128, 16, 3, False, False, None), (0, 64, 16, 4, False, True, None),
            (2, 128, 16, 3, False, False, None), (2, 32, 32, 3, True, True, None), (3, 64, 8, 4, False, False, None),
            (3, 32, 32, 4, True, False, None), (2, 32, 32, 3, True, False, None), (2, 32, 32, 3, True, False, 80),
            (0, 64, 16, 2, True, False, None), (0, 64, 16, 2, True, False, 104)]:
        sb, wps = {0: (32, 4), 2: (16, 2), 3: (32, 8)}[qt]
        q = f"tensordesc<i32[{bn},{ns * wps}]>"
        # Q4_K's sc and mn planes as words (gguf_gemv_tma._WORD_VIEWS), the mn box 16 bytes a row at least
        fields = {0: dict(qh_desc=q, sc_desc=f"tensordesc<i32[{bn},{ns // 4}]>",
                          mn_desc=f"tensordesc<i16[{bn},{max(ns // 4, 8)}]>"),
                  2: dict(qh_desc=f"tensordesc<i16[{bn},{ns * wps}]>", sc_desc=f"tensordesc<i8[{bn},{ns}]>", mn_desc=q),
                  3: dict(qh_desc=q, sc_desc=f"tensordesc<fp16[{bn},{ns}]>", mn_desc=q)}[qt]
        sig = {"xq_ptr": "*i32", "out_ptr": "*bf16", "bias_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
               "q_desc": q, **fields, "d_ptr": "*i32" if pairs else "*fp16", "dm_ptr": "*i32" if pairs else "*fp16",
               "N": "i32", "K": "i32", "s_d": "i32", "SPLIT_K": "i32"}
        const = dict(QT=qt, SB=sb, WPS=wps, BN=bn, NS=ns, NSB=ns if qt == 3 else ns * sb // 256, SPLIT=not stream,
                     HAS_BIAS=False, EVEN_K=True, STAGES=stages, ASM=True, PDL=True, STREAM=stream,
                     PAIRS=pairs)
        k = sass_stats.compile_kernel(_tma_kernel, sig, const,
                                      div16=("xq_ptr", "out_ptr", "ws_ptr", "cnt_ptr", "d_ptr", "dm_ptr", "N", "K"),
                                      num_stages=stages, launch_pdl=True, **({"maxnreg": cap} if cap else {}))
        sass = sass_stats.disassemble(k.asm["cubin"])
        ptx = k.asm["ptx"]
        head = ptx[:ptx.find("griddepcontrol.wait")]
        name = f"{qt}_{bn}_{ns}_{stages}_{'stream' if stream else 'split'}{'_pairs' if pairs else ''}"
        name += f"_cap{cap}" if cap else ""
        out[name] = {
            "registers": sass_stats.registers(k.asm["cubin"]),
            "inner_loop": sass_stats.innermost_loop_stats(sass, "IDP").instructions,
            # two-byte global loads: the K-quants' fp16 super-block scales one by one, synchronous in every iteration
            "pairs": pairs, "b16_loads": len(re.findall(r"\bld\.global[.\w]*\.b16\b", ptx)),
            "tma_loads": sass.count("UTMALDG"), "spilled": sass_stats.loop_stats(sass).registers_spilled,
            "before_wait": len(re.findall(r"\bld\.global|\bst\.global|\batom\.|\bcp\.async", head)),
            "waits": ptx.count("griddepcontrol.wait")}
    return out


@pytest.fixture(scope="module")
def offline():
    from devstral.kernels import sass_stats

    if not sass_stats.tools_available(("ptxas", "nvdisasm", "cuobjdump")):
        pytest.skip("Triton's ptxas / nvdisasm / cuobjdump not shipped on this platform")
    return sass_stats.offline_json(__file__, "--offline")


def test_a_register_cap_buys_occupancy_without_spills_or_a_longer_loop(offline):
    """maxnreg: Q6_K 32 x 32 as stream-K takes over 96 registers uncapped (four programs of 128 threads an SM); capped
    at 80 it fits six and its dp4a loop stays within 2% of the uncapped one's instructions. Q4_K 64 x 16 at 104."""
    for free, capped, cap in (("2_32_32_3_stream", "2_32_32_3_stream_cap80", 80),
                              ("0_64_16_2_stream", "0_64_16_2_stream_cap104", 104)):
        assert offline[free]["registers"] > cap >= offline[capped]["registers"], (free, offline[free], offline[capped])
        assert not offline[capped]["spilled"], capped
        assert offline[capped]["inner_loop"] <= 1.02 * offline[free]["inner_loop"], (offline[free], offline[capped])


def test_tiles_come_by_tma_without_spills_and_after_the_wait(offline):
    for name, st in offline.items():
        assert st["tma_loads"] >= 2, name  # the words and the scales at least, in the pipeline's prologue and loop
        assert not st["spilled"], name
        assert st["waits"] == 1 and st["before_wait"] == 0, name
        if st["pairs"]:  # as words of two they go by cp.async with the tile's other loads
            assert st["b16_loads"] == 0, name
        elif name.startswith(("0_", "2_")):
            assert st["b16_loads"] > 0, name  # the check sees them where they are


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    if sys.argv[1] == "--offline":
        print(json.dumps(_offline()))
    else:
        _run_cases(sys.argv[1])
