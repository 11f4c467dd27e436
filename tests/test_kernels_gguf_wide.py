"""The streaming GEMV (kernels/gguf_gemv_wide.py) on CPU, in Triton's interpreter, against quant.dequantize()
followed by a matmul (dequantize is bit-exact against gguf-py), and its PyTorch twin against the same.

Small odd shapes: row tiles cut by N, K not a multiple of the tile (masked sub-blocks), split-K with
uneven and empty splits, 1..6 activation rows in tiles of 1, 2 and 4, a bias. One subprocess runs
every kernel case under TRITON_INTERPRET=1 (the interpreter is chosen when a kernel is decorated, so
it must not leak into other tests); outputs are fp32 (the interpreter truncates fp32 -> bf16).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import interpreter_runs

pytest.importorskip("triton")

from devstral.kernels.gguf_pack import pack  # noqa: E402
from devstral.quant import QType, dequantize  # noqa: E402
from devstral.quant.layout import block_info  # noqa: E402

N = 13
# Q4_K/Q5_K: 3 super-blocks (a tile of 16 sub-blocks is cut), Q6_K 2, Q8_0 13 blocks (a tile of 8 is cut)
K = {QType.Q4_K: 768, QType.Q5_K: 768, QType.Q6_K: 512, QType.Q8_0: 416}
TYPES = list(K)
F16_FIELDS = {QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,), QType.Q8_0: (0,)}
# (rows m, BN, NS, BM, split_k, num_stages): even and uneven tiles, split-K 3 over fewer tiles than splits;
# num_stages > 1 is the software-pipelined loop (its own branch of the kernel); a split of one K-tile
# (gguf_gemv_wide.one_tile: (2, 16, 16, 2, 2, 1) and (1, 16, 16, 1, 2, 1), a cut tile for Q4_K/Q5_K, an
# empty split for Q8_0) is loaded whole before the wait, without a next-tile buffer
CASES = [(1, 16, 8, 1, 1, 1), (1, 8, 2, 1, 3, 1), (2, 16, 16, 2, 2, 1), (6, 8, 2, 4, 5, 1), (1, 8, 2, 1, 2, 3),
         (3, 16, 4, 4, 1, 2), (1, 16, 16, 1, 2, 1)]
INT8_TYPES = [QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q8_0]  # the int8-activation (dp4a) row dots
# int8 activations: every case on activations int8 represents exactly (each index, byte order and scale of
# every tile path); random ones (rounded to int8: data, not another path) at one row and at 3 rows pipelined
INT8_RANDOM_CASES = [CASES[0], CASES[5]]
# stream-K (rows m, BN, NS, BM, num_stages, programs): runs that cross row tiles, several programs on one
# tile, more activation-row tiles, the pipelined loop, and more programs than units (capped)
STREAM_CASES = [(1, 8, 2, 1, 1, 5), (1, 16, 8, 1, 1, 2), (3, 8, 4, 2, 1, 7), (1, 8, 2, 1, 2, 5), (2, 8, 2, 2, 1, 40)]

INTERPRETER_EARLY = True  # its subprocess starts when collection ends (interpreter_runs.py)


def random_blocks(qt: QType, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Random bytes are valid blocks (every bit pattern of every field occurs); fp16 scales realistic."""
    bs, ts = block_info(qt)
    raw = torch.randint(0, 256, (n * k // bs, ts), dtype=torch.uint8, generator=g)
    for off in F16_FIELDS[qt]:
        d = (torch.rand(raw.shape[0], generator=g) * 0.01 + 1e-3).to(torch.float16)
        raw[:, off:off + 2] = d.view(torch.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def _inputs(qt: QType, g: torch.Generator):
    raw = random_blocks(qt, N, K[qt], g)
    x = torch.randn(6, K[qt], generator=g).to(torch.bfloat16)
    bias = torch.randn(N, generator=g)
    return raw, x, bias


def _run_cases(out_path: str) -> None:
    """Executed in the subprocess, under the interpreter."""
    from devstral.kernels import gguf_gemv_wide

    g = torch.Generator().manual_seed(0)
    res = {}
    for qt in TYPES:
        raw, x, bias = _inputs(qt, g)
        p = pack(raw, qt, N, K[qt])
        outs = {}
        for m, bn, ns, bm, split, stages in CASES:
            out = torch.full((m, N), float("nan"))
            b = bias if split != 1 or m == 1 else None
            gguf_gemv_wide.gemv(x[:m], p, b, out, bn=bn, ns=ns, bm=bm, split_k=split, num_stages=stages)
            outs[(m, bn, ns, bm, split, stages)] = (out, b is not None)
        res[qt.name] = {"raw": raw, "x": x, "bias": bias, "outs": outs}
        if qt in INT8_TYPES:  # int8 activations: exact on activations int8 represents, close on random ones
            from test_kernels_gguf_interpret import int8_exact

            xe = int8_exact(6, K[qt], g)
            i8 = {}
            for m, bn, ns, bm, split, stages in CASES:
                inputs = (("exact", xe), ("random", x))
                for name, xin in inputs if (m, bn, ns, bm, split, stages) in INT8_RANDOM_CASES else inputs[:1]:
                    for xq in (False, True):  # quantized in the kernel's threads / once by gguf_xq
                        out = torch.full((m, N), float("nan"))
                        gguf_gemv_wide.gemv(xin[:m], p, bias, out, bn=bn, ns=ns, bm=bm, split_k=split, int8=True,
                                            num_stages=stages, xq=xq)
                        i8[(name, xq, m, bn, ns, bm, split, stages)] = out
            res[qt.name].update(xe=xe, int8=i8)
        stream = {}
        real_programs = gguf_gemv_wide.stream_programs
        for m, bn, ns, bm, stages, programs in STREAM_CASES:
            gguf_gemv_wide.stream_programs = lambda per_sm, units, device, n=programs: min(units, n)
            for int8 in (False, True) if qt in INT8_TYPES else (False,):
                xin = res[qt.name]["xe"] if int8 else x
                out = torch.full((m, N), float("nan"))
                gguf_gemv_wide.gemv(xin[:m], p, bias, out, bn=bn, ns=ns, bm=bm, num_stages=stages, int8=int8,
                                    xq=int8, stream=1)
                stream[(int8, m, bn, ns, bm, stages, programs)] = out
        gguf_gemv_wide.stream_programs = real_programs
        res[qt.name]["stream"] = stream
    # the dispatcher (gguf_linear.linear) running a tuned table's wide_xq entry, pipelined, end to end
    from devstral.kernels import gguf_config, gguf_linear

    raw = random_blocks(QType.Q4_K, N, K[QType.Q4_K], g)
    plan = gguf_config.gguf_plan
    gguf_config.gguf_plan = lambda *a, **kw: ("wide_xq", dict(bn=16, ns=8, bm=1, split_k=2, num_warps=4,
                                                              num_stages=2))
    xd = torch.randn(1, K[QType.Q4_K], generator=g).to(torch.bfloat16)
    res["dispatch_xq"] = {"raw": raw, "x": xd,
                          "out": gguf_linear.linear(xd.float(), pack(raw, QType.Q4_K, N, K[QType.Q4_K]))}
    gguf_config.gguf_plan = plan
    # the activation quantization kernel (gguf_xq.py) against its PyTorch twin, both layouts
    from devstral.kernels import gguf_xq

    xz = (torch.randn(3, 320, generator=g) * 3).to(torch.bfloat16)
    xz[1, 32:64] = 0  # an all-zero block
    res["xq"] = {"x": xz, **{layout: gguf_xq.quantize(xz, layout) for layout in (gguf_xq.STRIDE8, gguf_xq.STRIDE4)}}
    # with the SwiGLU: x holds [gate | up] rows (a cat MoE gate_up's output), the values are silu(gate) * up
    pre = (torch.randn(3, 640, generator=g) * 3).to(torch.bfloat16)
    pre[2, 320 + 64:320 + 96] = 0  # an all-zero block of up
    from devstral.kernels.interpret_triton import hardware_rounding

    with hardware_rounding():  # silu(gate) and the product round to bf16 as on the GPU, not by truncation
        res["xq_glu"] = {"x": pre, **{layout: gguf_xq.quantize(pre, layout, glu=True)
                                      for layout in (gguf_xq.STRIDE8, gguf_xq.STRIDE4)}}
    # q/k/v-style fusion (quant.linear.fuse_quant): planar QuantLinears on the CPU, as on CUDA
    import devstral.quant.linear as ql

    ql.cuda_kernels = lambda device: True
    raws = [random_blocks(QType.Q4_K, n, 256, g) for n in (16, 8, 8)]
    mods = [ql.QuantLinear(r, QType.Q4_K, r.shape[0], 256) for r in raws]
    xf = torch.randn(2, 256, generator=g).to(torch.bfloat16)
    alone = [m(xf).float() for m in mods]
    proj = ql.fuse_quant(*mods)
    x_big = torch.randn(9, 256, generator=g).to(torch.bfloat16)  # past the decode sizes: per member
    res["fuse"] = {"raws": raws, "x": xf, "alone": alone, "fused": torch.cat(proj(xf), dim=-1).float(),
                   "x_big": x_big, "big": [o.float() for o in proj(x_big)],
                   "after": [m(xf).float() for m in mods],
                   "shared": all(m.weight_q.planar is proj.packed.buf for m in mods)}
    # an attention whose q cannot join k and v (an 8-expert Q4_K_M: attn_q Q4_K, attn_k / attn_v Q8_0)
    from types import SimpleNamespace

    from devstral.model.transformer import Attention

    attn = Attention(SimpleNamespace(sliding_window=None, n_heads=2, n_kv_heads=1, head_dim=128, dim=256), 0)
    mixed = {"q_proj": (QType.Q4_K, 256), "k_proj": (QType.Q8_0, 128), "v_proj": (QType.Q8_0, 128)}
    mixed_raws = {}
    for name, (qt, n) in mixed.items():
        mixed_raws[name] = random_blocks(qt, n, 256, g)
        setattr(attn, name, ql.QuantLinear(mixed_raws[name], qt, n, 256))
    os.environ["DEVSTRAL_PAIR_GEMV"] = "0"  # the unpaired groups (the pair is checked below)
    attn.fuse()
    os.environ.pop("DEVSTRAL_PAIR_GEMV")
    with torch.no_grad():
        res["fuse_kv"] = {"raws": mixed_raws, "x": xf, "out": [o.float() for o in attn.project(xf)],
                          "which": [attn.qkv is not None, attn.qk is not None, attn.kv is not None],
                          "shared": attn.k_proj.weight_q.planar is attn.v_proj.weight_q.planar}
    # two GEMVs of one input in one launch (gemv_pair): A's and B's programs in one grid, against each
    # launched alone with the same constants; the types share gguf_xq's layout (Q4_K, Q8_0) or not (Q6_K)
    res["pair"] = {}
    for (qa, na), (qb, nb), m in (((QType.Q4_K, 96), (QType.Q8_0, 40), 1), ((QType.Q4_K, 64), (QType.Q6_K, 48), 3)):
        pa, pb = (pack(random_blocks(qt, n, 512, g), qt, n, 512) for qt, n in ((qa, na), (qb, nb)))
        xp = torch.randn(m, 512, generator=g).to(torch.bfloat16)
        ca = dict(bn=32, ns=8, bm=gguf_gemv_wide.bm_for(m), split_k=2, num_warps=4)
        cb = dict(bn=16, ns=16, bm=gguf_gemv_wide.bm_for(m), split_k=1, num_warps=4)
        outs = [torch.full((m, n), float("nan"), dtype=torch.bfloat16) for n in (na, nb)]
        gguf_gemv_wide.gemv_pair(xp, pa, ca, outs[0], pb, cb, outs[1])
        alone = [gguf_gemv_wide.gemv(xp, p_, None, torch.empty(m, p_.n, dtype=torch.bfloat16), int8=True, xq=True,
                                     **c) for p_, c in ((pa, ca), (pb, cb))]
        res["pair"][(qa.name, qb.name)] = (outs, alone)
    # the attention above as it fuses by default: q (Q4_K) and the fused k/v (Q8_0) as one PairedProjection
    plan = gguf_config.gguf_plan
    gguf_config.gguf_plan = lambda *a, **kw: ("wide_xq", dict(bn=16, ns=8, bm=1, split_k=2, num_warps=4))
    attn = Attention(SimpleNamespace(sliding_window=None, n_heads=2, n_kv_heads=1, head_dim=128, dim=256), 0)
    for name, (qt, n) in mixed.items():
        setattr(attn, name, ql.QuantLinear(mixed_raws[name], qt, n, 256))
    attn.fuse()  # paired by default
    x1 = xf[:1]
    with torch.no_grad():
        res["pair_attn"] = {"paired": type(attn.qkv).__name__, "out": [o.float() for o in attn.qkv(x1)],
                            "alone": [attn.q_proj(x1).float(), *(o.float() for o in attn.kv(x1))]}
    gguf_config.gguf_plan = plan
    # the dense SwiGLU folded into down's activation quantization (MLP._swiglu -> QuantLinear.forward_glu):
    # gate/up Q4_K fused, down Q4_K (stride-8 activations) or Q6_K (stride-4); or all three Q8_0 (a Q8_0 file: its
    # down is wide_xq on the H200 table since session 13); every GEMV wide_xq
    from devstral.kernels.silu_mul import silu_mul
    from devstral.model.transformer import MLP

    plan = gguf_config.gguf_plan
    gguf_config.gguf_plan = lambda *a, **kw: ("wide_xq", dict(bn=16, ns=8, bm=1, split_k=2, num_warps=4))
    res["mlp_glu"] = {}
    quantize, calls = gguf_xq.quantize, []

    def recording(x, layout, glu=False):  # which activation quantizations the MLP launches
        calls.append(glu)
        return quantize(x, layout, glu)

    for down_type in (QType.Q4_K, QType.Q6_K, QType.Q8_0):
        mlp = MLP(SimpleNamespace(dim=256, hidden_dim=512))
        mlp_raws = {}
        gu = QType.Q8_0 if down_type == QType.Q8_0 else QType.Q4_K
        for name, (qt, n, k) in {"gate_proj": (gu, 512, 256), "up_proj": (gu, 512, 256),
                                 "down_proj": (down_type, 256, 512)}.items():
            mlp_raws[name] = (random_blocks(qt, n, k, g), qt.name, n, k)
            setattr(mlp, name, ql.QuantLinear(mlp_raws[name][0], qt, n, k))
        mlp.fuse()
        xm = torch.randn(1, 256, generator=g).to(torch.bfloat16)
        calls.clear()
        with torch.no_grad(), hardware_rounding():
            gguf_xq.quantize = recording
            fused = mlp(xm).float()
            gguf_xq.quantize = quantize
            gate, up = mlp.gate_up(xm)
            res["mlp_glu"][down_type.name] = {"raws": mlp_raws, "x": xm, "fused": fused, "glu_calls": list(calls),
                                             "apart": mlp.down_proj(silu_mul(gate, up)).float()}
    gguf_config.gguf_plan = plan
    torch.save(res, out_path)


@pytest.fixture(scope="module")
def results():
    return interpreter_runs.results(__file__, timeout=900)


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-5, atol=2e-5 * expected.abs().max().item())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_streaming_gemv_matches_dequantize_then_matmul(results, qtype):
    r = results[qtype.name]
    w = dequantize(r["raw"], qtype, (N, K[qtype]))
    x = r["x"].float()
    assert len(r["outs"]) == len(CASES)
    for (m, *_), (out, has_bias) in r["outs"].items():
        ref = x[:m] @ w.t() + (r["bias"] if has_bias else 0.0)
        assert not out.isnan().any()  # every output row and column written
        _close(out, ref)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_stream_k_gemv_matches_dequantize_then_matmul(results, qtype):
    """Stream-K (each program an equal run of row-tile x K-tile units, partials of shared tiles added by
    the last one): every output written once, equal to x @ W^T + b (float activations; int8 ones that
    int8 represents exactly, quantized once by gguf_xq)."""
    r = results[qtype.name]
    w = dequantize(r["raw"], qtype, (N, K[qtype]))
    assert len(r["stream"]) == len(STREAM_CASES) * (2 if qtype in INT8_TYPES else 1)
    for (int8, m, *_), out in r["stream"].items():
        xin = (r["xe"] if int8 else r["x"])[:m].float()
        assert not out.isnan().any()
        _close(out, xin @ w.t() + r["bias"])


def test_one_tile_splits():
    """STAGES 0 (the program's only tile, no next-tile buffer) exactly when no split has two K-tiles."""
    from devstral.kernels import gguf_gemv_wide

    assert gguf_gemv_wide.one_tile(8, 8) and gguf_gemv_wide.one_tile(1, 2) and gguf_gemv_wide.one_tile(7, 8)
    assert not gguf_gemv_wide.one_tile(9, 8) and not gguf_gemv_wide.one_tile(2, 1)


def _programs_on_a_tile(units: int, programs: int, n_tiles: int) -> int:
    """The most programs whose run of units [lo[g], lo[g + 1]) is not empty and meets one row tile
    [t, t + n_tiles): the definition, program by program and tile by tile."""
    lo = [(g * units) // programs for g in range(programs + 1)]
    return max(sum(1 for g in range(programs) if lo[g] < min(lo[g + 1], t + n_tiles) and lo[g + 1] > t)
               for t in range(0, units, n_tiles))


def _programs_on_a_tile_all(units: int, n_tiles: int) -> list[int]:
    """_programs_on_a_tile for programs = 1..units at once: the runs meeting tile t are the programs
    g1 <= g < g2 (g1 the first whose run ends after t, g2 the first that starts at or past t + n_tiles),
    counted without the empty ones. Runs past `programs` are padded as empty (lo = units)."""
    p = torch.arange(1, units + 1)[:, None]
    lo = torch.minimum(torch.arange(units + 1)[None, :], p) * units // p  # [programs, units + 1]
    start, end = lo[:, :-1].contiguous(), lo[:, 1:].contiguous()
    filled = torch.nn.functional.pad((start < end).cumsum(1), (1, 0))
    t = torch.arange(0, units, n_tiles).expand(units, -1).contiguous()
    g1 = torch.searchsorted(end, t, right=True)
    g2 = torch.searchsorted(start, t + n_tiles)
    return (filled.gather(1, g2) - filled.gather(1, g1)).clamp_min(0).amax(1).tolist()


def test_stream_k_shares_bound_the_programs_on_a_tile():
    """The workspace holds stream_shares partials per tile: never fewer than the programs that touch one.
    Every split of up to 199 units (whole row tiles of 1..13 units) over 1..units programs."""
    from devstral.kernels.gguf_gemv_wide import stream_shares

    for units in range(1, 200):
        for n_tiles in (1, 2, 3, 5, 8, 13):
            if units % n_tiles:
                continue
            most = _programs_on_a_tile_all(units, n_tiles)
            if units <= 40:  # the vectorized count is the definition's
                assert most == [_programs_on_a_tile(units, p, n_tiles) for p in range(1, units + 1)], units
            for programs in range(1, units + 1):
                assert most[programs - 1] <= stream_shares(units, programs, n_tiles), (units, n_tiles, programs)


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_streaming_gemv_int8_activations(results, qtype):
    """With int8 activations (dp4a): x @ W^T to fp32 accuracy where int8 per sub-block represents x
    exactly (this checks every index, byte order and scale), and within int8 rounding elsewhere."""
    r = results[qtype.name]
    w = dequantize(r["raw"], qtype, (N, K[qtype]))
    assert len(r["int8"]) == 2 * (len(CASES) + len(INT8_RANDOM_CASES))
    for (name, _, m, *_), out in r["int8"].items():
        xin = (r["xe"] if name == "exact" else r["x"])[:m].float()
        ref = xin @ w.t() + r["bias"]
        assert not out.isnan().any()
        if name == "exact":
            _close(out, ref)
        else:  # per-sub-block absmax int8: ~0.5% of a dot product's magnitude
            assert ((out - ref).norm() / (xin @ w.t()).norm()).item() < 2e-2


@pytest.mark.parametrize("glu", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("layout", [0, 1], ids=["stride8", "stride4"])
def test_activation_quantization_kernel_matches_its_twin(results, layout, glu):
    """glu: the kernel applies silu(gate) * up to [gate | up] rows first; its twin runs silu_mul's
    reference and then quantizes, so the SwiGLU's roundings are silu_mul's too."""
    from devstral.kernels import gguf_xq

    case = results["xq_glu" if glu else "xq"]
    x, got = case["x"], case[layout]
    ref = gguf_xq.reference(x, layout, glu=glu)
    assert got.shape == ref.shape == (3, 10, gguf_xq.WORDS)
    if not glu:  # the interpreter rounds the multiply and the add apart, as the twin does: every word
        assert torch.equal(got, ref)
    assert torch.equal(got[..., 8], ref[..., 8])  # the scales
    # levels: equal but for rounding ties (x * 127 / absmax at k + 1/2: the kernel's one-rounding
    # multiply-add and the twin's two roundings may part there), never by more than one
    diff = _levels(got, layout) - _levels(ref, layout)
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 0.01
    assert torch.equal(got[..., 10:] - ref[..., 10:], diff.reshape(*diff.shape[:2], 2, 16).sum(-1).to(torch.int32))
    torch.testing.assert_close(got[..., 9].view(torch.float32), ref[..., 9].view(torch.float32), rtol=1e-6, atol=1e-5)


def test_the_dispatcher_runs_a_wide_xq_entry(results):
    r = results["dispatch_xq"]
    ref = r["x"].float() @ dequantize(r["raw"], QType.Q4_K, (N, K[QType.Q4_K])).t()
    assert ((r["out"].float() - ref).norm() / ref.norm()).item() < 2e-2  # int8 activations


def _levels(xq: torch.Tensor, layout: int) -> torch.Tensor:
    """The int8 levels [.., blocks, 32] of gguf_xq's words, read by the documented byte order."""
    raw = xq[..., :8].to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*xq.shape[:-1], 32, dtype=torch.int64)
    for w in range(8):
        for a in range(4):
            byte = (raw[..., w] >> (8 * a)) & 0xFF
            v = 8 * a + w if layout == 0 else 16 * (w // 4) + 4 * a + w % 4
            out[..., v] = torch.where(byte >= 128, byte - 256, byte)
    return out


@pytest.mark.parametrize("layout", [0, 1], ids=["stride8", "stride4"])
def test_activation_quantization_layout(layout):
    """gguf_xq.reference, read back independently: levels round(x * 127 / absmax) per 32 values in the
    documented byte order, the scale, the exact sum and the levels' sums per half."""
    from devstral.kernels import gguf_xq

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 96, generator=g) * 5
    x[0, 32:64] = 0
    xq = gguf_xq.reference(x, layout)
    blocks = x.reshape(2, 3, 32)
    amax = blocks.abs().amax(-1)
    levels = torch.round(blocks * 127 / amax.clamp_min(1e-30)[..., None]).to(torch.int64)
    assert torch.equal(_levels(xq, layout), levels)
    torch.testing.assert_close(xq[..., 8].view(torch.float32), amax / 127)
    torch.testing.assert_close(xq[..., 9].view(torch.float32), blocks.sum(-1), rtol=1e-6, atol=1e-5)
    assert torch.equal(xq[..., 10:].to(torch.int64), levels.reshape(2, 3, 2, 16).sum(-1))


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_prequantized_activations_meet_the_weights_they_multiply(qtype):
    """gguf_xq.layout_for(type): byte a of the activation word the xq row dot pairs with a weight operand
    holds the activation of the weight whose level byte a of that operand holds. Pairing as _row_dot_xq
    reads it: word v of a sub-block meets block word v, its high-nibble operand word v + WPS, Q6_K's
    second sub-block of 16 the block's words from 4; a nibble operand's byte a is value 2a (low) or
    2a + 1 (high) of the word, a Q8_0 word's byte a value a; value s of word v is weight s * WPS + v."""
    from devstral.kernels import gguf_xq
    from devstral.kernels.gguf_decode import GEOMETRY, qt_code

    qt = qt_code(qtype)
    sb, wps, _ = GEOMETRY[qt]
    layout = gguf_xq.layout_for(qt)
    operands = (0,) if qtype == QType.Q8_0 else (0, 1)
    for j in range(32 // sb):  # the sub-blocks of one activation block
        for v in range(wps):
            for o in operands:
                for a in range(4):
                    s = a if qtype == QType.Q8_0 else 2 * a + o
                    w = 4 * j + v + o * wps
                    x_value = 8 * a + w if layout == gguf_xq.STRIDE8 else 16 * (w // 4) + 4 * a + w % 4
                    assert x_value == j * sb + s * wps + v, (j, v, o, a)


def _ptx(asm: str, n_out: int, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """The PTX instructions the Q5_K row dot pins, on 32-bit values held in int64 tensors ($0.. are the
    outputs, the inputs follow them)."""
    regs = {f"${n_out + i}": x & 0xFFFFFFFF for i, x in enumerate(inputs)}

    def value(tok: str):
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for stmt in filter(None, (x.strip() for x in asm.split(";"))):
        op, rest = stmt.split(None, 1)
        dst, *toks = (x.strip() for x in rest.split(","))
        args = [value(x) for x in toks]
        if op == "and.b32":
            r = args[0] & args[1]
        elif op == "shr.u32":
            r = args[0] >> args[1]
        elif op == "lop3.b32":  # bit k of the table: the result where (a, b, c) have bits (k>>2, k>>1, k) & 1
            a, b, c, lut = args
            r = sum(((a if k & 4 else ~a) & (b if k & 2 else ~b) & (c if k & 1 else ~c)) for k in range(8)
                    if lut >> k & 1)
        elif op == "prmt.b32":  # byte i: byte sel_i & 7 of (b << 32 | a); with sel_i & 8, its bit 7 8 times
            pool = (args[1] << 32) | args[0]
            r = 0
            for i in range(4):
                sel = args[2] >> (4 * i) & 0xF
                byte = pool >> (8 * (sel & 7)) & 0xFF
                r = r | ((byte >> 7) * 0xFF if sel & 8 else byte) << (8 * i)
        else:
            raise NotImplementedError(op)
        regs[dst] = r & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(n_out)]


def test_q5k_ptx_makes_signed_levels_minus_16():
    """The compiled Q5_K operands (Triton's interpreter runs the plain-op twins instead): every high-bit
    byte through the spreading multiply and the sign-replicating PRMT, random words through the LOP3,
    and the byte unpacking at the load, against the levels the planar layout defines."""
    from devstral.kernels import gguf_gemv_wide as wide

    g = torch.Generator().manual_seed(4)
    hi = torch.arange(256, dtype=torch.int64).repeat(64)
    words = torch.randint(0, 2**32, hi.shape, dtype=torch.int64, generator=g)
    ops = []
    for spread in (wide.Q5K_SPREAD_EVEN.value, wide.Q5K_SPREAD_ODD.value):
        r, = _ptx(wide.SIGNS_REVERSED_PTX.value, 1, hi * (spread & 0xFFFFFFFF))
        nib = words if not ops else (words - ((words >> 31) << 32)) >> 4  # the kernel's int32 >> 4
        ops.append(_ptx(wide.NIBBLES_UNDER_PTX.value, 1, nib, r)[0])
    for s in range(8):  # value s: byte s // 2 of the even (s even) or odd operand, as int8
        byte = ops[s % 2] >> (8 * (s // 2)) & 0xFF
        q = (words >> (4 * s) & 0xF) | ((hi >> s & 1) << 4)
        assert torch.equal(byte - ((byte >> 7) << 8), q - 16), s
    unpacked = _ptx(wide.BYTES_PTX.value, 4, words)
    for v in range(4):
        assert torch.equal(unpacked[v], words >> (8 * v) & 0xFF), v


def test_fused_projection_is_its_members_side_by_side(results):
    """Three planar QuantLinears joined by fuse_quant: one call gives each member's output in order,
    the members keep working on their rows of the shared buffer, and all match dequantize + matmul."""
    r = results["fuse"]
    x = r["x"].float()
    refs = [x @ dequantize(raw, QType.Q4_K, (raw.shape[0], 256)).t() for raw in r["raws"]]
    def near(got, ref):  # bf16 outputs of the dispatcher's path (int8 activations at 2 rows): ~1%
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2

    assert r["shared"]
    near(r["fused"], torch.cat(refs, dim=1))
    for alone, after, ref in zip(r["alone"], r["after"], refs, strict=True):
        near(alone, ref)
        torch.testing.assert_close(after, alone, rtol=0, atol=0)  # the same rows, the same kernel
    xb = r["x_big"].float()
    assert [o.shape[-1] for o in r["big"]] == [raw.shape[0] for raw in r["raws"]]
    for out, raw in zip(r["big"], r["raws"], strict=True):
        near(out, xb @ dequantize(raw, QType.Q4_K, (raw.shape[0], 256)).t())


@pytest.mark.parametrize("down_type", ["Q4_K", "Q6_K", "Q8_0"])
def test_the_mlp_folds_the_swiglu_into_downs_activation_quantization(results, down_type):
    """At decode sizes a GGUF MLP hands down_proj the [gate | up] rows and its xq GEMV quantizes
    silu(gate) * up in one launch: the output of silu_mul then the GEMV (to the exponential's last
    bit), and near the dequantized weights' reference (int8 activations: ~1%)."""
    from devstral.kernels.silu_mul import silu_mul_ref

    r = results["mlp_glu"][down_type]
    assert r["glu_calls"] == [False, True]  # gate/up's input, then down's: the SwiGLU in its quantization
    assert ((r["fused"] - r["apart"]).norm() / r["apart"].norm()).item() < 1e-3
    x = r["x"].float()
    deq = {name: dequantize(raw, QType[qt], (n, k)) for name, (raw, qt, n, k) in r["raws"].items()}
    ref = silu_mul_ref(x @ deq["gate_proj"].t(), x @ deq["up_proj"].t()) @ deq["down_proj"].t()
    assert ((r["fused"] - ref).norm() / ref.norm()).item() < 3e-2


@pytest.mark.parametrize("types", [("Q4_K", "Q8_0"), ("Q4_K", "Q6_K")], ids="_".join)
def test_a_gemv_pair_gives_each_weights_launch_alone(results, types):
    """gemv_pair: every row of both outputs written, bit for bit what each GEMV gives alone with its own
    tile, split and row dot (one quantized input where the layouts agree, two where they do not)."""
    outs, alone = results["pair"][types]
    for out, ref in zip(outs, alone, strict=True):
        assert not out.isnan().any()
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_paired_attention_projections_give_the_unpaired_outputs(results):
    """By default q (Q4_K) and the fused k/v (Q8_0) become one PairedProjection, and its q, k, v
    at one row are those of q_proj and kv launched apart."""
    r = results["pair_attn"]
    assert r["paired"] == "PairedProjection"
    assert [o.shape for o in r["out"]] == [o.shape for o in r["alone"]]
    for out, ref in zip(r["out"], r["alone"], strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_attention_fuses_k_and_v_when_q_has_another_type(results):
    """q Q4_K, k and v Q8_0, not paired (DEVSTRAL_PAIR_GEMV=0): k/v become one planar weight (one launch
    fewer per layer), q runs alone,
    and the three outputs are still the dequantized weights times x."""
    r = results["fuse_kv"]
    assert r["which"] == [False, False, True] and r["shared"]
    x = r["x"].float()
    for name, out in zip(("q_proj", "k_proj", "v_proj"), r["out"], strict=True):
        raw = r["raws"][name]
        qt = QType.Q4_K if name == "q_proj" else QType.Q8_0
        ref = x @ dequantize(raw, qt, (raw.shape[0], 256)).t()
        assert out.shape == ref.shape
        assert ((out - ref).norm() / ref.norm()).item() < 2e-2, name


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_pytorch_twin_matches_dequantize_then_matmul(qtype):
    from devstral.kernels import gguf_gemv_wide

    g = torch.Generator().manual_seed(1)
    raw, x, bias = _inputs(qtype, g)
    p = pack(raw, qtype, N, K[qtype])
    ref = x.float() @ dequantize(raw, qtype, (N, K[qtype])).t() + bias
    _close(gguf_gemv_wide.reference(x, p, bias), ref)


# (type code, sub-block, words per sub-block, values per word, sc dtype, qh dtype) of the kernel's arguments
SASS_TYPES = {"Q4_K": (0, 32, 4, 8, "*u8", "*i32"), "Q5_K": (1, 32, 4, 8, "*u8", "*u8"),
              "Q6_K": (2, 16, 2, 8, "*i8", "*i16"), "Q8_0": (3, 32, 8, 4, "*u8", "*i32")}
# loop instructions per weight at BM=1, BN=128 (8 rows a thread), NS=8, 4 warps, as counted when the kernel
# was written (Triton 3.6): Q4_K 3.65, Q8_0 4.05-4.3, Q5_K 6.78, Q6_K 7.17; the float GEMV (gguf_gemv.py)
# spends 5.2 / 4.7 / - / 11.2. Bounds with a little slack: a change that breaks the one-layout loop (layout
# conversions, scalar loads, per-weight scale work) lands far above them (Q5_K with its high bytes in
# 16-byte loads: 7.65 and spilling, gguf_gemv_wide._load_words).
# Q4_K/Q5_K's scales and mins packed in the file's 12 bytes a super-block (gguf_pack.py) took Q4_K to 3.75 (int8
# 2.45, pipelined 2.48, xq 1.75) and Q5_K to 6.90 (int8 3.20, pipelined 3.36, xq 2.70): the bounds were kept.
SASS_BOUNDS = {"Q4_K": 4.0, "Q5_K": 7.3, "Q6_K": 7.7, "Q8_0": 4.6}
# with int8 activations (dp4a), counted when written: Q4_K 2.34, Q5_K 3.13, Q6_K 4.84 (6.21 before its high-bit
# words got Q5_K's layout hint), Q8_0 1.64
SASS_BOUNDS_INT8 = {"Q4_K": 2.6, "Q5_K": 3.4, "Q6_K": 5.2, "Q8_0": 1.9}


def _sass_counts() -> dict:
    """Executed in a subprocess (no interpreter state from other tests): loop statistics per type."""
    from devstral.kernels import sass_stats
    from devstral.kernels.gguf_gemv_wide import _wide_kernel

    out = {}
    for (name, (qt, sb, wps, e, sc_t, qh_t)), int8 in [(t, i) for i in (False, True) for t in SASS_TYPES.items()]:
        sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "bias_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
               "q_ptr": "*i32", "qh_ptr": qh_t, "sc_ptr": sc_t, "mn_ptr": "*u8", "d_ptr": "*fp16", "dm_ptr": "*fp16",
               **dict.fromkeys(("M", "N", "K", "s_xm", "s_om", "s_q", "s_qh", "s_sc", "s_d", "one", "SPLIT_K"), "i32")}
        bn, ns = 128, 8
        const = dict(M=1, QT=qt, SB=sb, WPS=wps, E=e, BN=bn, NS=ns, BM=1, SPLIT=True, HAS_BIAS=False, EVEN_N=True,
                     EVEN_K=True, ASM=True, INT8=int8, STAGES=1, XQ=False)
        # what the launcher specializes at Devstral's shapes: aligned pointers, strides and sizes divisible by 16
        div16 = [n for n, t in sig.items() if t.startswith("*")] + ["N", "K", "s_xm", "s_om", "s_q", "s_qh", "s_sc"]
        for stages, xq in ((1, False), (3, False), (1, True)) if int8 else ((1, False),):
            sig_x = dict(sig, x_ptr="*i32") if xq else sig  # gguf_xq's int32 words
            sass = sass_stats.compile_sass(_wide_kernel, sig_x, dict(const, STAGES=stages, XQ=xq), div16=div16,
                                           num_warps=4, num_stages=stages)
            st = sass_stats.loop_stats(sass)
            out[name + ("_int8" if int8 else "") + ("_pipelined" if stages > 1 else "") + ("_xq" if xq else "")] = {
                "per_weight": st.instructions / (bn * ns * sb / 128), "spilled": st.registers_spilled,
                "ldg": st.ops["LDG"], "async_copies": sass.count("LDGSTS"), "ops": dict(st.ops.most_common(12))}
    return out


@pytest.fixture(scope="module")
def sass_counts():
    from devstral.kernels import sass_stats

    if not sass_stats.tools_available():
        pytest.skip("Triton's ptxas / nvdisasm not shipped on this platform")
    return sass_stats.offline_json(__file__, "--sass")


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("name", list(SASS_BOUNDS))
def test_streaming_gemv_instructions_per_weight_on_sm90(sass_counts, name, int8):
    """Compiled offline for an H100/H200 (sm_90): no GPU needed, Triton's own ptxas and nvdisasm."""
    st = sass_counts[name + ("_int8" if int8 else "")]
    assert not st["spilled"]
    assert st["ldg"] <= 64  # vector loads: 16-byte words, 8-byte activations
    assert st["per_weight"] < (SASS_BOUNDS_INT8 if int8 else SASS_BOUNDS)[name], st


# with the activations quantized beforehand (gguf_xq.py), counted when written: Q4_K 1.63, Q5_K 2.61,
# Q6_K 3.29, Q8_0 1.03
SASS_BOUNDS_XQ = {"Q4_K": 1.8, "Q5_K": 2.8, "Q6_K": 3.5, "Q8_0": 1.15}


@pytest.mark.parametrize("name", list(SASS_BOUNDS_XQ))
def test_gemv_on_prequantized_activations_drops_the_per_thread_quantization(sass_counts, name):
    """xq: the loop only loads the packed int8 activations: about 15% (Q5_K, whose high bits cost the
    same either way) to 45% (Q6_K) fewer instructions per weight than quantizing them in every thread."""
    st = sass_counts[name + "_int8_xq"]
    assert not st["spilled"]
    assert st["per_weight"] < SASS_BOUNDS_XQ[name] < sass_counts[name + "_int8"]["per_weight"], st


@pytest.mark.parametrize("name", list(SASS_BOUNDS_INT8))
def test_pipelined_gemv_streams_tiles_through_shared_memory(sass_counts, name):
    """num_stages > 1: the tiles' words go to shared memory by cp.async (LDGSTS), not through registers,
    and the loop keeps the register-prefetch loop's instructions per weight."""
    st = sass_counts[name + "_int8_pipelined"]
    assert not st["spilled"]
    assert st["async_copies"] >= 2 * 8  # the words of two stages at least, 16 bytes a copy
    assert st["per_weight"] < SASS_BOUNDS_INT8[name] * 1.06, st


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    if sys.argv[1] == "--sass":
        print(json.dumps(_sass_counts()))
    else:
        _run_cases(sys.argv[1])
