"""Every quantized-weight kernel on a real GPU, against the references.

References: quant.dequantize (bit-exact against gguf-py) followed by a matmul; model/nf4's codec and
bitsandbytes' own CUDA dequantization; the fp8 weight dequantized. Odd shapes (partial row tiles,
K not a multiple of the tile), batch sizes across the GEMV / tensor-core GEMM / dequantize+cuBLAS
boundaries, split-K, CUDA-graph capture and replay, and the memory the weights take.

    python -m pytest -m gpu tests/test_kernels_gguf_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from counted_kernel import CountedKernel
from devstral.kernels import (
    fp8_kernels,
    gguf_config,
    gguf_dequant,
    gguf_gemm,
    gguf_gemv,
    gguf_gemv_wide,
    gguf_idot,
    gguf_linear,
    nf4_kernels,
)
from devstral.kernels.fp8_linear import FP8Linear
from devstral.kernels.gguf_pack import ALIGN, FORMATS, pack, unpack
from devstral.model.nf4 import NF4Linear, NF4Tensor, dequantize_nf4, quantize_nf4
from devstral.quant import QType, dequantize
from devstral.quant.layout import block_info
from devstral.quant.linear import GGUFWeight, QuantLinear, fallback_notice

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")

TYPES = [QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q8_0]
F16_FIELDS = {QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,), QType.Q8_0: (0,)}
CUDA = torch.device("cuda")


def blocks(qt: QType, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random valid blocks (any bit pattern is valid) with finite, realistically sized fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    bs, ts = block_info(qt)
    raw = torch.randint(0, 256, (n * k // bs, ts), dtype=torch.uint8, generator=g)
    for off in F16_FIELDS[qt]:
        d = (torch.rand(raw.shape[0], generator=g) * 0.004 + 5e-4).to(torch.float16)
        raw[:, off:off + 2] = d.view(torch.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def k_for(qt: QType, big: bool = False) -> int:
    if qt == QType.Q8_0:
        return 2336 if big else 736  # 73 and 23 blocks
    return 2304 if big else 768  # 9 and 3 super-blocks


def reference(raw, qt, n, k) -> torch.Tensor:
    return dequantize(raw, qt, (n, k)).to(CUDA)


def close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1.6e-2, rel: float = 4e-3) -> None:
    """bf16 outputs against an fp32 reference: elementwise to bf16 precision of the output's scale."""
    ref = ref.float()
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=rtol * ref.abs().max().item())
    assert ((out.float() - ref).norm() / ref.norm()).item() < rel


def dispatch_rel(qt: QType, m: int) -> float:
    """What the dispatcher's path may miss by: the int8-activation GEMVs round activations to int8."""
    int8 = qt.name in gguf_config.IDOT_TYPES or qt.name in gguf_config.WIDE_INT8_TYPES
    return 1.5e-2 if int8 and m <= gguf_config.IDOT_MAX_M else 4e-3


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_repack_on_the_gpu_round_trips(qt):
    n, k = 257, k_for(qt)
    raw = blocks(qt, n, k)
    p = pack(raw.to(CUDA), qt, n, k, chunk_rows=100)
    assert p.device.type == "cuda"
    assert torch.equal(unpack(p).cpu(), raw)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequantize_is_bit_exact(qt, dtype):
    n, k = 333, k_for(qt, big=True)
    raw = blocks(qt, n, k, seed=1)
    p = pack(raw.to(CUDA), qt, n, k)
    ref = dequantize(raw, qt, (n, k))
    assert torch.equal(gguf_dequant.dequantize(p, dtype=dtype).cpu(), ref.to(dtype))
    assert torch.equal(gguf_dequant.dequantize(p, start=5, stop=77, dtype=dtype).cpu(), ref[5:77].to(dtype))
    idx = torch.tensor([0, 332, 7, 7, 100], device=CUDA)
    assert torch.equal(gguf_dequant.dequantize(p, rows=idx, dtype=dtype).cpu(), ref[idx.cpu()].to(dtype))


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gemv_matches_dequantize_then_matmul(qt, m):
    n, k = 1029, k_for(qt, big=True)
    raw = blocks(qt, n, k, seed=m)
    p = pack(raw.to(CUDA), qt, n, k)
    w = reference(raw, qt, n, k)
    x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
    bias = torch.randn(n, device=CUDA, dtype=torch.bfloat16)
    ref = x.float() @ w.t()
    bm = 1 if m == 1 else (2 if m == 2 else 4)
    for cfg in (dict(bn=64, ns=8 if qt != QType.Q6_K else 16, split_k=1), dict(bn=16, ns=4, split_k=4),
                dict(bn=32, ns=8, split_k=3)):
        out = torch.empty(m, n, device=CUDA, dtype=torch.bfloat16)
        gguf_gemv.gemv(x, p, bias, out, bm=bm, **cfg)
        close(out, ref + bias.float())
    close(gguf_linear.linear(x, p), ref, rel=dispatch_rel(qt, m))  # the dispatcher's own choice


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_streaming_gemv_matches_dequantize_then_matmul(qt, m):
    """gguf_gemv_wide at odd N (partial row tiles) and K cut inside a tile (masked sub-blocks), at an
    even shape (the unmasked path, as at Devstral's shapes), split-K with uneven and empty splits,
    1-8 activation rows (tiles of 1, 2, 4; masked rows), and replayed in a CUDA graph."""
    bm = gguf_gemv_wide.bm_for(m)
    cases = (((1029, k_for(qt, big=True)), (dict(bn=64, ns=16, split_k=3, num_warps=4),  # K-quants: K cut
                                             dict(bn=32, ns=4, split_k=16, num_warps=2),
                                             dict(bn=64, ns=8, split_k=3, num_warps=4, num_stages=3))),
             ((512, 2048), (dict(bn=128, ns=8, split_k=2, num_warps=4), dict(bn=128, ns=8, split_k=1, num_warps=8,
                                                                            num_stages=4),
                            dict(bn=128, ns=16, split_k=8, num_warps=4))))  # one K-tile a split (one_tile)
    for (n, k), cfgs in cases:
        raw = blocks(qt, n, k, seed=m)
        p = pack(raw.to(CUDA), qt, n, k)
        x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
        bias = torch.randn(n, device=CUDA, dtype=torch.bfloat16)
        ref = x.float() @ reference(raw, qt, n, k).t() + bias.float()
        for cfg in cfgs:
            out = torch.full((m, n), float("nan"), device=CUDA, dtype=torch.bfloat16)
            gguf_gemv_wide.gemv(x, p, bias, out, bm=bm, **cfg)
            close(out, ref)
        out = torch.empty(m, n, device=CUDA, dtype=torch.bfloat16)
        gguf_gemv_wide.gemv(x, p, bias, out, bm=bm, **cfgs[0])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gguf_gemv_wide.gemv(x, p, bias, out, bm=bm, **cfgs[0])
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        close(out, ref)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_streaming_gemv_int8_exact_on_int8_activations(qt, m):
    """gguf_gemv_wide with int8 activations (dp4a): on activations int8 represents exactly it equals
    x @ W^T to fp32 accuracy (odd N, K cut inside a tile, split-K, 16 rows a thread, even shapes),
    and on random activations it is int8-close; replayed in a CUDA graph it gives the same."""
    from test_kernels_gguf_interpret import int8_exact

    bm = gguf_gemv_wide.bm_for(m)
    cases = (((1029, k_for(qt, big=True) // 32 * 32), (dict(bn=64, ns=16, split_k=3, num_warps=4),
                                                        dict(bn=32, ns=4, split_k=16, num_warps=2),
                                                        dict(bn=64, ns=8, split_k=3, num_warps=4, num_stages=3))),
             ((512, 2048), (dict(bn=256, ns=8, split_k=2, num_warps=4), dict(bn=128, ns=8, split_k=1, num_warps=4),
                            dict(bn=256, ns=8, split_k=2, num_warps=8, num_stages=4),
                            dict(bn=128, ns=8, split_k=1, num_warps=4, num_stages=3))))
    for (n, k), cfgs in cases:
        raw = blocks(qt, n, k, seed=20 + m)
        p = pack(raw.to(CUDA), qt, n, k)
        w = reference(raw, qt, n, k)
        x = int8_exact(m, k, torch.Generator().manual_seed(m)).to(CUDA)
        ref = x.float() @ w.t()
        for cfg in cfgs:
            for xq in (False, True):  # quantized in the threads / once beforehand (gguf_xq)
                out = torch.full((m, n), float("nan"), device=CUDA, dtype=torch.float32)
                gguf_gemv_wide.gemv(x, p, None, out, bm=bm, int8=True, xq=xq, **cfg)
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        xr = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
        for xq in (False, True):
            out = torch.empty(m, n, device=CUDA, dtype=torch.bfloat16)
            gguf_gemv_wide.gemv(xr, p, None, out, bm=bm, int8=True, xq=xq, **cfgs[0])
            close(out, xr.float() @ w.t(), rel=1.5e-2)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                gguf_gemv_wide.gemv(xr, p, None, out, bm=bm, int8=True, xq=xq, **cfgs[0])
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            close(out, xr.float() @ w.t(), rel=1.5e-2)


def _replays_exactly(run, outs: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
    """run() captured in a CUDA graph; three replays, the outputs zeroed before each, give refs bit for bit."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(3):
        for out in outs:
            out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for out, ref in zip(outs, refs, strict=True):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_stream_k_gemv_matches_dequantize_then_matmul(qt):
    """Stream-K (gemv(stream=...)): 1-4 programs per SM sharing the row-tile x K-tile units, so runs cross
    row tiles and several programs add up one tile; float and pre-quantized int8 activations (exact where
    int8 represents them), 1 and 3 activation rows, odd N; a CUDA graph replays it bit for bit."""
    from test_kernels_gguf_interpret import int8_exact

    n, k = 1029, k_for(qt, big=True) // 32 * 32
    raw = blocks(qt, n, k, seed=41)
    p = pack(raw.to(CUDA), qt, n, k)
    w = reference(raw, qt, n, k)
    bias = torch.randn(n, device=CUDA, dtype=torch.bfloat16)
    for m in (1, 3):
        x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
        xe = int8_exact(m, k, torch.Generator().manual_seed(m)).to(CUDA)
        for per_sm, (bn, ns) in ((1, (64, 16)), (2, (128, 8)), (4, (32, 8))):
            bm = gguf_gemv_wide.bm_for(m)
            out = torch.full((m, n), float("nan"), device=CUDA, dtype=torch.bfloat16)
            gguf_gemv_wide.gemv(x, p, bias, out, bn=bn, ns=ns, bm=bm, stream=per_sm)
            close(out, x.float() @ w.t() + bias.float())
            oute = torch.full((m, n), float("nan"), device=CUDA, dtype=torch.float32)
            gguf_gemv_wide.gemv(xe, p, None, oute, bn=bn, ns=ns, bm=bm, stream=per_sm, int8=True, xq=True)
            ref = xe.float() @ w.t()
            torch.testing.assert_close(oute, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    once = torch.empty(1, n, device=CUDA, dtype=torch.float32)
    gguf_gemv_wide.gemv(xe[:1], p, None, once, bn=128, ns=8, bm=1, stream=2, int8=True, xq=True)
    out = torch.empty_like(once)
    _replays_exactly(lambda: gguf_gemv_wide.gemv(xe[:1], p, None, out, bn=128, ns=8, bm=1, stream=2, int8=True,
                                                 xq=True), [out], [once])


@pytest.mark.parametrize(("qt", "n", "k", "cfg"), [
    (QType.Q4_K, 6144, 5120, dict(bn=64, ns=16, split_k=2, num_stages=3, pairs=True)),
    # a row tile and a K-tile cut (Q4_K's K a multiple of 1024 for TMA: tiles of 64 sub-blocks, 2048 weights)
    (QType.Q4_K, 1029, 3072, dict(bn=32, ns=64, split_k=3, num_stages=2)),
    (QType.Q6_K, 5120, 32768, dict(bn=128, ns=16, split_k=8, num_stages=3)),
    (QType.Q8_0, 5120, 4096, dict(bn=64, ns=8, split_k=4, num_stages=4)),
    (QType.Q6_K, 5120, 32768, dict(bn=64, ns=16, stream=2, num_stages=4)),  # stream-K: whole waves, shared row tiles
    (QType.Q4_K, 1029, 3072, dict(bn=32, ns=64, stream=3, num_stages=2)),
    (QType.Q4_K, 5120, 32768, dict(bn=64, ns=16, split_k=8, num_stages=2, pairs=True)),  # Q4_K ffn_down
    (QType.Q6_K, 5120, 32768, dict(bn=32, ns=32, stream=4, num_stages=3, pairs=True)),  # scales as words of two
    (QType.Q6_K, 5120, 32768, dict(bn=32, ns=32, stream=6, num_stages=3, maxnreg=80)),  # registers capped: 6 an SM
    (QType.Q4_K, 65536, 5120, dict(bn=128, ns=16, split_k=1, num_stages=2, maxnreg=128))],  # capped, spilling a little
    ids=lambda v: getattr(v, "name", None))
def test_tma_gemv_matches_the_streaming_xq_gemv(qt, n, k, cfg):
    """kernels/gguf_gemv_tma.py on Hopper: TMA boxes (rows past N zero-filled), the xq row dot of the streaming GEMV
    (the same up to fp32 summation order), near the dequantized weights; exact on activations int8 represents;
    replayed from a CUDA graph bit for bit."""
    from devstral.kernels import gguf_gemv_tma
    from test_kernels_gguf_interpret import int8_exact

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90")
    raw = blocks(qt, n, k, seed=7)
    p = pack(raw.to(CUDA), qt, n, k)
    assert gguf_gemv_tma.supports(p, cfg["bn"], cfg["ns"])
    w = reference(raw, qt, n, k)
    x = torch.randn(1, k, device=CUDA, dtype=torch.bfloat16)
    out = torch.full((1, n), float("nan"), device=CUDA, dtype=torch.float32)
    gguf_gemv_tma.gemv(x, p, None, out, **cfg)
    wide = torch.full_like(out, float("nan"))
    gguf_gemv_wide.gemv(x, p, None, wide, bm=1, int8=True, xq=True,
                        **{key: v for key, v in cfg.items() if key not in gguf_gemv_tma.TMA_ONLY_KEYS})
    torch.testing.assert_close(out, wide, rtol=1e-5, atol=1e-5 * wide.abs().max().item())
    close(out, x.float() @ w.t(), rel=1.5e-2)
    xe = int8_exact(1, k, torch.Generator().manual_seed(3)).to(CUDA)
    gguf_gemv_tma.gemv(xe, p, None, out, **cfg)
    ref = xe.float() @ w.t()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    once = out.clone()
    _replays_exactly(lambda: gguf_gemv_tma.gemv(xe, p, None, out, **cfg), [out], [once])


@pytest.mark.parametrize("xq", [False, True], ids=["i8", "xq"])
def test_dependent_launch_gives_the_same_outputs_eager_and_in_a_graph(monkeypatch, xq):
    """DEVSTRAL_PDL=1 (kernels/pdl.py): RMSNorm -> (quantize ->) GEMV launched as programmatic dependents
    give the outputs of the plain launches, eagerly and replayed from a CUDA graph."""
    from devstral.kernels.rms_norm_triton import rms_norm_triton

    n, k = 1536, 2048
    raw = blocks(QType.Q4_K, n, k, seed=5)
    p = pack(raw.to(CUDA), QType.Q4_K, n, k)
    x = torch.randn(1, k, device=CUDA, dtype=torch.bfloat16)
    w = torch.rand(k, device=CUDA, dtype=torch.bfloat16) + 0.5
    cfg = dict(bn=128, ns=8, bm=1, split_k=2, num_warps=4)

    def step(out):
        gguf_gemv_wide.gemv(rms_norm_triton(x, w, 1e-5), p, None, out, int8=True, xq=xq, **cfg)
        return out

    monkeypatch.setenv("DEVSTRAL_PDL", "0")
    ref = step(torch.empty(1, n, device=CUDA, dtype=torch.bfloat16)).clone()
    monkeypatch.setenv("DEVSTRAL_PDL", "1")
    out = torch.empty(1, n, device=CUDA, dtype=torch.bfloat16)
    torch.testing.assert_close(step(out), ref, rtol=0, atol=0)
    _replays_exactly(lambda: step(out), [out], [ref])


@pytest.mark.parametrize("down_type", [QType.Q4_K, QType.Q6_K], ids=lambda t: t.name)
def test_the_swiglu_in_downs_quantization_gives_silu_mul_then_the_gemv(down_type, monkeypatch):
    """gguf_linear.linear(glu=True) on [gate | up] rows, with down's plan forced to wide_xq: bit for bit
    silu_mul (the same float steps, the same exponential) then the GEMV on its output."""
    from devstral.kernels.silu_mul import silu_mul

    hidden, dim = 2048, 1024
    p = pack(blocks(down_type, dim, hidden, seed=8).to(CUDA), down_type, dim, hidden)
    pre = torch.randn(1, 2 * hidden, device=CUDA, dtype=torch.bfloat16) * 2
    monkeypatch.setattr(gguf_config, "gguf_plan",
                        lambda *a, **kw: ("wide_xq", dict(bn=64, ns=8, bm=1, split_k=2, num_warps=4)))
    fused = gguf_linear.linear(pre, p, glu=True)
    apart = gguf_linear.linear(silu_mul(pre[:, :hidden], pre[:, hidden:]), p)
    torch.testing.assert_close(fused, apart, rtol=0, atol=0)


@pytest.mark.parametrize(("qa", "qb"), [(QType.Q4_K, QType.Q8_0), (QType.Q4_K, QType.Q6_K)], ids=lambda t: t.name)
def test_a_gemv_pair_gives_each_gemv_alone_eager_and_in_a_graph(qa, qb):
    """gemv_pair (Mixtral's q and k/v, Devstral's q/k and Q6_K v): both outputs bit for bit those of the
    two xq GEMVs launched apart with the same constants, eagerly and replayed from a CUDA graph."""
    k = 4096
    a = pack(blocks(qa, 4096, k, seed=9).to(CUDA), qa, 4096, k)
    b = pack(blocks(qb, 2048, k, seed=10).to(CUDA), qb, 2048, k)
    x = torch.randn(1, k, device=CUDA, dtype=torch.bfloat16)
    # the second pair of constants gives A one K-tile a split (gguf_gemv_wide.one_tile)
    for ca, cb in ((dict(bn=128, ns=8, bm=1, split_k=8, num_warps=4), dict(bn=16, ns=32, bm=1, split_k=1, num_warps=4)),
                   (dict(bn=128, ns=16, bm=1, split_k=8, num_warps=4), dict(bn=16, ns=32, bm=1, split_k=2,
                                                                            num_warps=4))):
        alone = [gguf_gemv_wide.gemv(x, p, None, torch.empty(1, p.n, device=CUDA, dtype=torch.bfloat16), int8=True,
                                     xq=True, **c) for p, c in ((a, ca), (b, cb))]
        outs = [torch.empty(1, p.n, device=CUDA, dtype=torch.bfloat16) for p in (a, b)]
        gguf_gemv_wide.gemv_pair(x, a, ca, outs[0], b, cb, outs[1])
        for out, ref in zip(outs, alone, strict=True):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
        _replays_exactly(lambda ca=ca, cb=cb, outs=outs: gguf_gemv_wide.gemv_pair(x, a, ca, outs[0], b, cb, outs[1]),
                         outs, alone)


def test_activation_quantization_on_the_gpu():
    """gguf_xq.quantize against its PyTorch twin: scales and sums exact (the sum's order is a fixed tree of
    pairs), levels equal but at rounding ties (the kernel's multiply-add rounds once)."""
    from devstral.kernels import gguf_xq

    x = torch.randn(5, 4096 + 96, device=CUDA, dtype=torch.bfloat16) * 4
    x[2, 64:96] = 0
    for layout in (gguf_xq.STRIDE8, gguf_xq.STRIDE4):
        got, ref = gguf_xq.quantize(x, layout).cpu(), gguf_xq.reference(x.cpu(), layout)
        assert torch.equal(got[..., 8], ref[..., 8])
        assert ((got[..., :8] != ref[..., :8]).float().mean() < 0.01).item()
        assert torch.equal(got[..., 9], ref[..., 9])


@pytest.mark.parametrize("delta", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("m", [1, 3])
def test_the_norms_activations_give_the_quantize_launchs_gemvs(delta, m, monkeypatch):
    """The norm writing the GEMVs' activations (rms_norm_triton xq; Devstral's dim, 5120, and a Q4_K and a
    Q6_K weight as one gemv_pair, as its q/k and v: both layouts): its row and residual are the plain
    kernel's, its words those of gguf_xq.quantize of that row, and the GEMVs' outputs those after the
    quantize launches, bit for bit -- with no quantize launch, eagerly and replayed from a CUDA graph
    captured in inference mode (as the engine's: the norm's output is then allocated outside it, for its
    version counter)."""
    from devstral.kernels import gguf_xq
    from devstral.kernels.rms_norm_triton import add_rms_norm_triton, rms_norm_triton

    k = 5120
    a = pack(blocks(QType.Q4_K, 1024, k, seed=11).to(CUDA), QType.Q4_K, 1024, k)
    b = pack(blocks(QType.Q6_K, 256, k, seed=12).to(CUDA), QType.Q6_K, 256, k)
    x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16) * 2
    d = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16) * 2
    w = torch.rand(k, device=CUDA, dtype=torch.bfloat16) + 0.5
    bm = gguf_gemv_wide.bm_for(m)
    ca = dict(bn=128, ns=8, bm=bm, split_k=4, num_warps=4)
    cb = dict(bn=32, ns=16, bm=bm, split_k=2, num_warps=4)

    def norm(xq):
        return add_rms_norm_triton(x, d, w, 1e-5, xq=xq) if delta else (rms_norm_triton(x, w, 1e-5, xq=xq), None)

    def step(xq, outs):
        y, _ = norm(xq)
        gguf_gemv_wide.gemv_pair(y, a, ca, outs[0], b, cb, outs[1])

    def empty():
        return [torch.empty(m, p.n, device=CUDA, dtype=torch.bfloat16) for p in (a, b)]

    gguf_xq.forget()
    refs = empty()
    step((), refs)
    plain, fused = norm(()), norm((gguf_xq.STRIDE8, gguf_xq.STRIDE4))
    for got, ref in zip(fused, plain, strict=True):
        assert (got is None and ref is None) or torch.equal(got, ref)
    words = {layout: gguf_xq._offered[2][layout].clone() for layout in (gguf_xq.STRIDE8, gguf_xq.STRIDE4)}
    gguf_xq.forget()
    for layout, got in words.items():
        assert torch.equal(got, gguf_xq.quantize(fused[0], layout))

    launches = CountedKernel(gguf_xq._quantize_kernel)
    monkeypatch.setattr(gguf_xq, "_quantize_kernel", launches)
    outs = empty()
    step((gguf_xq.STRIDE8, gguf_xq.STRIDE4), outs)
    for out, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with torch.inference_mode():
        _replays_exactly(lambda: step((gguf_xq.STRIDE8, gguf_xq.STRIDE4), outs), outs, refs)
    assert launches.count == 0


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [5, 16, 33, 130])
def test_tile_gemm_matches_dequantize_then_matmul(qt, m):
    n, k = 515, k_for(qt, big=True)
    raw = blocks(qt, n, k, seed=10 + m)
    p = pack(raw.to(CUDA), qt, n, k)
    w = reference(raw, qt, n, k)
    x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
    ref = x.float() @ w.t()
    bm = 16 if m <= 16 else 64
    for cfg in (dict(bn=128, bm=bm, nsub=4, split_k=1), dict(bn=64, bm=bm, nsub=2, split_k=3)):
        out = torch.empty(m, n, device=CUDA, dtype=torch.bfloat16)
        gguf_gemm.gemm(x, p, None, out, **cfg)
        close(out, ref)


def test_a_gemm_pipeline_deeper_than_shared_memory_runs_shallower():
    """kernels/stage_fit.py on the GPU: 128 x 128 tiles at 8 stages need more shared memory than any GPU has a block;
    the launch runs at the depth that fits, and gives dequantize-then-matmul's result (a config from the rules on a
    GPU without a tuned table once failed so: 249856 bytes against an H100's 232448)."""
    from devstral.kernels import stage_fit

    qt, m, n, k = QType.Q4_K, 130, 515, k_for(QType.Q4_K, big=True)
    raw = blocks(qt, n, k, seed=4)
    p = pack(raw.to(CUDA), qt, n, k)
    x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
    out = torch.empty(m, n, device=CUDA, dtype=torch.bfloat16)
    gguf_gemm.gemm(x, p, None, out, bn=128, bm=128, nsub=4, num_warps=8, num_stages=8)
    close(out, x.float() @ reference(raw, qt, n, k).t())
    assert any(key[0] == "gguf_gemm" and want == 8 and stages < 8 for (key, want), stages in stage_fit._fitted.items())


@pytest.mark.parametrize("qt", [QType.Q4_K, QType.Q8_0], ids=lambda t: t.name)
def test_large_batches_dequantize_into_bands_then_cublas(qt, monkeypatch):
    n, k = 700, k_for(qt)
    raw = blocks(qt, n, k, seed=3)
    p = pack(raw.to(CUDA), qt, n, k)
    w = reference(raw, qt, n, k)
    x = torch.randn(1000, k, device=CUDA, dtype=torch.bfloat16)
    monkeypatch.setenv("DEVSTRAL_DEQUANT_SCRATCH_MB", "0.5")  # bands of a few hundred rows
    bias = torch.randn(n, device=CUDA, dtype=torch.bfloat16)
    out = gguf_linear.linear(x, p, bias)
    close(out, x.float() @ w.t() + bias.float())


@pytest.mark.parametrize("qt", [QType.Q4_K, QType.Q6_K, QType.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_integer_dot_gemv_exact_on_int8_activations(qt, m):
    """Activations int8 represents exactly: the dp4a kernel equals x @ W^T (fp32 output, fp32 tolerance),
    for every tile height and with split-K; on random activations it is int8-close."""
    from test_kernels_gguf_interpret import int8_exact

    n, k = 1029, k_for(qt, big=True) // 32 * 32
    raw = blocks(qt, n, k, seed=10 + m)
    p = pack(raw.to(CUDA), qt, n, k)
    w = reference(raw, qt, n, k)
    x = int8_exact(m, k, torch.Generator().manual_seed(m)).to(CUDA)
    ref = x.float() @ w.t()
    bm = gguf_config.idot_bm(m)
    for cfg in (dict(bn=64, ns=4, split_k=1), dict(bn=32, ns=2, split_k=3), dict(bn=16, ns=1, split_k=2)):
        out = torch.empty(m, n, device=CUDA, dtype=torch.float32)
        gguf_idot.gemv(x, p, None, out, bm=bm, **cfg)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    xr = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
    out = torch.empty(m, n, device=CUDA, dtype=torch.bfloat16)
    gguf_idot.gemv(xr, p, None, out, bm=bm, bn=64, ns=4, split_k=1)
    close(out, xr.float() @ w.t(), rel=1.5e-2)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_quant_linear_on_cuda_matches_the_cpu_layer(qt):
    n, k = 301, k_for(qt)
    raw = blocks(qt, n, k, seed=4)
    cpu = QuantLinear(raw, qt, n, k)
    gpu = QuantLinear(raw.to(CUDA), qt, n, k)
    # planar fields: the file's bytes (gguf_pack), plus up to ALIGN - 1 bytes of padding after each field array
    padding = (ALIGN - 1) * len(FORMATS[qt].fields)
    assert gpu.weight_q.mode == "planar" and gpu.weight_q.nbytes() <= raw.numel() + padding
    for m in (1, 3, 7, 64, 700):
        x = torch.randn(2, m, k)
        close(gpu(x.to(CUDA, torch.bfloat16)), cpu(x.to(torch.bfloat16).float()).to(CUDA), rel=dispatch_rel(qt, 2 * m))


def test_split_k_is_deterministic_and_graph_replays_agree():
    qt, n, k = QType.Q4_K, 1024, 5120
    layer = QuantLinear(blocks(qt, n, k, seed=5).to(CUDA), qt, n, k)
    for m in (1, 3, 12):
        x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
        eager = layer(x)
        assert all(torch.equal(layer(x), eager) for _ in range(3))  # fixed split-K summation order
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(static_x)  # warm up (compile) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(static_x)
        for _ in range(2):  # replays re-arm the split-K counters themselves
            new = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
            static_x.copy_(new)
            graph.replay()
            assert torch.equal(static_out, layer(new))


def test_embedding_lookup_and_dense_fallback_notice():
    qt, n, k = QType.Q6_K, 500, 512
    raw = blocks(qt, n, k, seed=6)
    emb = GGUFWeight(raw.to(CUDA), qt, n, k, name="token_embd.weight")
    ids = torch.tensor([[4, 499], [0, 4]], device=CUDA)
    ref = dequantize(raw, qt, (n, k))[ids.cpu().reshape(-1)]
    assert torch.equal(emb.lookup(ids, torch.bfloat16).cpu(), ref.to(torch.bfloat16))
    # IQ4_XS has no kernel: dequantized once at load, and said so
    iq = torch.randint(0, 256, (n, 136), dtype=torch.uint8)
    iq[:, 0:2] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    model = torch.nn.Module()
    model.lin = QuantLinear(iq.reshape(n, 136).to(CUDA), QType.IQ4_XS, n, 256, name="blk.0.ffn_down.weight")
    assert model.lin.weight_q.mode == "dense"
    x = torch.randn(3, 256, device=CUDA, dtype=torch.bfloat16)
    close(model.lin(x), x.float() @ dequantize(iq, QType.IQ4_XS, (n, 256)).to(CUDA).t())
    note = fallback_notice(model)
    assert note is not None and "IQ4_XS" in note and "blk.0.ffn_down.weight" in note and "MiB" in note


@pytest.mark.parametrize("dq", [False, True])
def test_nf4_kernels(dq):
    w = torch.randn(1031, 1536, device=CUDA) * 0.05
    t = quantize_nf4(w, double_quant=dq)
    ref = dequantize_nf4(t)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(nf4_kernels.dequantize(t, dtype), ref.to(dtype))
    odd = quantize_nf4(torch.randn(13, 70, device=CUDA), double_quant=dq)
    assert torch.equal(nf4_kernels.dequantize(odd, torch.float32), dequantize_nf4(odd))
    for m in (1, 2, 3, 4):
        x = torch.randn(m, 1536, device=CUDA, dtype=torch.bfloat16)
        for split in (1, 4):
            out = torch.empty(m, 1031, device=CUDA, dtype=torch.bfloat16)
            nf4_kernels.gemv(x, t, None, out, bn=32, ns=4, bm=1 if m == 1 else 4, split_k=split)
            close(out, x.float() @ ref.t())
    layer = NF4Linear(w, double_quant=dq)
    for m in (1, 40):
        x = torch.randn(m, 1536, device=CUDA, dtype=torch.bfloat16)
        close(layer(x), x.float() @ dequantize_nf4(layer.nf4()).t())


def test_nf4_matches_bitsandbytes_cuda():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(512, 768, device=CUDA, dtype=torch.float32) * 0.05
    try:
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"bitsandbytes has no CUDA backend here: {e}")
    ours = NF4Tensor(q.reshape(-1), tuple(w.shape), None, state.absmax, state.state2.absmax, float(state.offset))
    theirs = F.dequantize_4bit(q, state).float()
    torch.testing.assert_close(nf4_kernels.dequantize(ours, torch.float32), theirs, rtol=1e-6, atol=1e-7)


def test_fp8_gemv_and_scaled_mm():
    w = torch.randn(1040, 2048, device=CUDA) * 0.02
    layer = FP8Linear(w)
    deq = layer.dequantized_weight(torch.float32)
    for m in (1, 2, 3, 4):
        x = torch.randn(m, 2048, device=CUDA, dtype=torch.bfloat16)
        for split in (1, 4):
            out = torch.empty(m, 1040, device=CUDA, dtype=torch.bfloat16)
            fp8_kernels.gemv(x, layer.weight_fp8, layer.weight_scale, None, out, bn=16, bk=512 // (1 if m == 1 else 4),
                             bm=1 if m == 1 else (2 if m == 2 else 4), split_k=split)
            close(out, x.float() @ deq.t())
    x = torch.randn(256, 2048, device=CUDA, dtype=torch.bfloat16)
    out = layer(x)
    ref = x.float() @ deq.t()
    # large batches also quantize the activations to e4m3 (3 mantissa bits): a few percent per element
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.06


def test_gguf_model_on_cuda_matches_cpu_and_stays_near_file_size(tmp_path):
    import devstral
    from devstral.formats.gguf import export_gguf
    from devstral.testing import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "ck", inner_vocab=500, dim=512, hidden_dim=1536, n_layers=2, n_heads=8,
                              n_kv_heads=2, head_dim=64)
    path = export_gguf(ck, tmp_path / "m.gguf", "Q4_K_M")
    ids = list(range(1, 200))
    cpu = devstral.load(path, device="cpu", dtype="fp32", backend="torch").logits(ids)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    llm = devstral.load(path, device="cuda")
    quant_bytes = sum(m.nbytes() for m in llm.model.modules() if isinstance(m, GGUFWeight))
    file_bytes = sum(m.file_bytes for m in llm.model.modules() if isinstance(m, GGUFWeight))
    assert quant_bytes <= 1.03 * file_bytes
    assert torch.cuda.memory_allocated() - before <= 1.05 * path.stat().st_size + (4 << 20)
    gpu = llm.logits(ids).cpu()
    assert ((gpu - cpu).norm() / cpu.norm()).item() < 0.03  # bf16 activations vs fp32
    assert (gpu.argmax(-1) == cpu.argmax(-1)).float().mean().item() > 0.9
    # q/k/v (or q/k) and gate/up as one planar weight each: same logits, no more memory
    torch.cuda.synchronize()
    loaded = torch.cuda.memory_allocated()
    llm.model.fuse_projections()
    layers = llm.model.model.layers
    assert all(b.mlp.gate_up is not None and (b.self_attn.qkv or b.self_attn.qk) for b in layers)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= loaded + (1 << 20)
    assert sum(m.nbytes() for m in llm.model.modules() if isinstance(m, GGUFWeight)) == quant_bytes
    with torch.no_grad():
        fused = llm.logits(ids).cpu()
    assert ((fused - gpu).norm() / gpu.norm()).item() < 1e-2
    assert (fused.argmax(-1) == gpu.argmax(-1)).float().mean().item() > 0.97


@pytest.mark.parametrize("kind", ["q8_0", "q4_k", "fp8"])
def test_quantize_on_load_on_cuda(tmp_path, kind):
    import devstral
    from devstral.testing import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "ck", dim=512, hidden_dim=1536, n_layers=2, n_heads=8, n_kv_heads=2,
                              head_dim=64)
    ids = list(range(1, 100))
    ref = devstral.load(ck, device="cuda").logits(ids)
    got = devstral.load(ck, device="cuda", quantize_on_load=kind).logits(ids)
    bound = {"q8_0": 0.03, "q4_k": 0.25, "fp8": 0.1}[kind]
    assert ((got - ref).norm() / ref.norm()).item() < bound


def test_gradients_flow_through_quantized_layers():
    """The kernels have no backward: with autograd on, the layers take the dequantized path."""
    qt, n, k = QType.Q4_K, 64, 512
    raw = blocks(qt, n, k, seed=7)
    layer = QuantLinear(raw.to(CUDA), qt, n, k)
    x = torch.randn(3, k, device=CUDA, requires_grad=True)
    layer(x).sum().backward()
    w = dequantize(raw, qt, (n, k)).to(CUDA)
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)
    fp8 = FP8Linear(torch.randn(64, 512, device=CUDA))
    x.grad = None
    fp8(x).sum().backward()
    torch.testing.assert_close(x.grad, fp8.dequantized_weight().sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)
