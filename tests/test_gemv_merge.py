"""The o projection's GEMV merging the decode attention's splits in its prologue (kernels/gguf_gemv_merge.py,
kernels/deferred_merge.py; DEVSTRAL_O_MERGE=1) on CPU, in Triton's interpreter.

Oracles: the dequantized weight (quant.dequantize, bit-exact against gguf-py) times the attention output pass 2
stores. The model's attention layer at one decode row hands its merge to a planar o and matches the layer run with
the merge pass. Partials that int8 represents exactly, equal in every split, must give that product to fp32 accuracy
(every head, split and row mapping exercised with no quantization error); random partials and log-sum-exps
within the int8 activations' error. The output as pass 2 leaves it (materialize) is the reference merge's; the
attention defers only one row with several splits, when asked; the dispatcher takes a deferral where the plan
can and launches pass 2 where it cannot, so the output is never read unwritten.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from devstral.kernels import deferred_merge, gguf_gemv_merge  # noqa: E402
from devstral.kernels.deferred_merge import DeferredMerge  # noqa: E402
from devstral.kernels.fixed_point import from_fixed_ref  # noqa: E402
from devstral.kernels.gguf_pack import pack  # noqa: E402
from devstral.kernels.paged_attention_triton import DecodeConfig, decode_attention_triton  # noqa: E402
from devstral.quant import QType, dequantize  # noqa: E402
from test_kernels_decode_attention import filled_cache, queries  # noqa: E402
from test_kernels_gguf_interpret import int8_exact  # noqa: E402
from test_kernels_gguf_wide import random_blocks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

H, D, N = 8, 32, 24  # 8 heads of 32: K = 256 (one Q4_K/Q6_K super-block a row)
# (type, ns): tiles of 2 heads (Q4_K, Q6_K) and 4 heads (Q8_0)
TYPES = [(QType.Q4_K, 2), (QType.Q6_K, 4), (QType.Q8_0, 4)]


def _weight(qt: QType, seed: int = 0):
    raw = random_blocks(qt, N, H * D, torch.Generator().manual_seed(seed))
    return pack(raw, qt, N, H * D), dequantize(raw, qt, (N, H * D))


def _merge(length: int, splits: int, parts: torch.Tensor, lse: torch.Tensor, direct: torch.Tensor | None = None,
           window: int = 0, block_n: int = 16) -> DeferredMerge:
    out = direct if direct is not None else torch.full((1, H, D), float("nan"), dtype=torch.bfloat16)
    return DeferredMerge(out, parts, lse, torch.tensor([length], dtype=torch.int32), splits, window, 0, block_n,
                         False, lambda: None)


def _used(length: int, splits: int, block_n: int = 16) -> int:
    """The splits with keys (paged_attention_triton._split_range, no window or min_chunk)."""
    chunk = math.ceil(math.ceil(length / splits) / block_n) * block_n
    return math.ceil(length / chunk)


def _run(merge: DeferredMerge, p, ns: int, bn: int = 8, fixed: bool = False) -> torch.Tensor:
    if fixed:
        acc, zero = torch.zeros(1, N, dtype=torch.int64), torch.full((1, N), 7, dtype=torch.int64)
        gguf_gemv_merge.gemv(merge, p, acc, bn=bn, ns=ns, fixed_zero=zero)
        assert torch.equal(zero, torch.zeros_like(zero))  # the other buffer zeroed, as o's fixed-point protocol asks
        return from_fixed_ref(acc, torch.float32)
    out = torch.full((1, N), float("nan"))
    return gguf_gemv_merge.gemv(merge, p, out, bn=bn, ns=ns)


@pytest.mark.parametrize("qt,ns", TYPES, ids=[t.name for t, _ in TYPES])
@pytest.mark.parametrize("length,splits", [(70, 5), (37, 3), (9, 3), (300, 20)],
                         ids=["5_used", "3_used", "one_split", "19_used"])
def test_exact_activations_give_the_product(qt, ns, length, splits):
    """Every split of a head holds the same int8-exact values (the merge's weights sum to 1, and the bf16
    rounding brings the result back to them): the kernel must give x @ W^T to fp32 accuracy. A row of one
    split reads pass 1's output instead, here the same values."""
    g = torch.Generator().manual_seed(1)
    x = int8_exact(1, H * D, g).reshape(1, H, D)
    lse = torch.randn(1, H, splits, generator=g) * 3
    parts = x.float()[:, :, None, :].expand(1, H, splits, D).contiguous()
    direct = x.clone() if _used(length, splits) == 1 else None
    p, w = _weight(qt)
    want = x.reshape(1, -1).float() @ w.float().t()
    for fixed in (False, True):
        got = _run(_merge(length, splits, parts, lse, direct), p, ns, fixed=fixed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("qt,ns", TYPES, ids=[t.name for t, _ in TYPES])
@pytest.mark.parametrize("window,splits,length", [(0, 6, 90), (40, 6, 90), (0, 40, 640)],
                         ids=["6_used", "window_3_used", "40_used"])
def test_random_partials_within_the_int8_error(qt, ns, window, splits, length):
    """40 splits with keys: the first chunk of 8, then two steps of two chunks."""
    g = torch.Generator().manual_seed(2)
    parts = torch.randn(1, H, splits, D, generator=g)
    lse = torch.randn(1, H, splits, generator=g) * 4
    merge = _merge(length, splits, parts, lse, window=window)
    p, w = _weight(qt, seed=3)
    want = gguf_gemv_merge.reference(merge, w)
    x = gguf_gemv_merge.merged_reference(merge).reshape(1, -1)
    bound = (x.abs() @ w.float().abs().t()) / 127  # each activation off by at most half its block's step
    got = _run(merge, p, ns)
    assert ((got - want).abs() <= bound + 1e-6).all(), (got - want).abs().max()
    # and not trivially: the merge uses the splits' weights (a plain mean of the partials is far off)
    mean = parts.mean(dim=2).to(torch.bfloat16).float().reshape(1, -1) @ w.float().t()
    assert ((got - mean).abs() > bound).any()


def test_the_attention_defers_one_row_of_several_splits_when_asked():
    layer, tables, lens = filled_cache("bf16", [37], 2, D, 8, torch.bfloat16, "cpu", 0)
    q = queries(1, H, 2, D, torch.bfloat16, "cpu", 1)
    cfg = DecodeConfig(block_n=16, splits=3)
    kw = dict(max_context=tables.shape[1] * 8, config=cfg)
    plain = decode_attention_triton(q, layer, tables, lens, D ** -0.5, **kw)
    deferred_merge.settle()
    out = decode_attention_triton(q, layer, tables, lens, D ** -0.5, defer_merge=True, **kw)
    merge = deferred_merge.take(out.view(1, -1))
    assert merge is not None and merge.out is out and deferred_merge.take(out.view(1, -1)) is None
    # pass 2 as the reference merge computes it, then launched: the same output as without deferral
    torch.testing.assert_close(gguf_gemv_merge.merged_reference(merge), plain.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(merge.materialize(), plain)
    # the GEMV on the deferred partials against the product with the output launched without deferral
    p, w = _weight(QType.Q8_0)
    out2 = decode_attention_triton(q, layer, tables, lens, D ** -0.5, defer_merge=True, **kw)
    got = _run(deferred_merge.take(out2.view(1, -1)), p, ns=4)
    want = plain.reshape(1, -1).float() @ w.float().t()
    assert ((got - want).abs() <= (plain.reshape(1, -1).float().abs() @ w.float().abs().t()) / 127 + 1e-6).all()
    # not deferred: one split for the whole grid, two rows, or not asked
    for lens_, cfg_, ask in (([37], DecodeConfig(block_n=16, splits=1), True), ([37, 9], cfg, True), ([37], cfg, False)):
        layer_, tables_, lens_t = filled_cache("bf16", lens_, 2, D, 8, torch.bfloat16, "cpu", 0)
        q_ = queries(len(lens_), H, 2, D, torch.bfloat16, "cpu", 1)
        o = decode_attention_triton(q_, layer_, tables_, lens_t, D ** -0.5, max_context=tables_.shape[1] * 8,
                                    config=cfg_, defer_merge=ask)
        assert deferred_merge.take(o.view(o.shape[0], -1)) is None


def test_the_dispatcher_takes_it_or_launches_pass_2(monkeypatch):
    """gguf_linear.linear: an int8 streaming plan whose tile fits runs the merging GEMV; any other plan (here
    dequantize + matmul) launches pass 2 first and reads the written output; another input leaves it pending."""
    from devstral.kernels import gguf_config, gguf_linear

    p, w = _weight(QType.Q8_0)
    g = torch.Generator().manual_seed(5)
    x = int8_exact(1, H * D, g).reshape(1, H, D)
    parts = x.float()[:, :, None, :].expand(1, H, 3, D).contiguous()
    written = []

    def merge():
        m = _merge(37, 3, parts, torch.zeros(1, H, 3))
        m.launch_merge = lambda: (m.out.copy_(x), written.append(True))
        return m

    want = x.reshape(1, -1).float() @ w.float().t()
    monkeypatch.setattr(gguf_config, "gguf_plan", lambda *a, **k: ("wide_i8", dict(bn=8, ns=4, bm=1, split_k=2)))
    m = merge()
    deferred_merge.defer(m)
    assert deferred_merge.take(m.out.view(1, -1).clone()) is None and deferred_merge._pending is m  # another tensor
    got = gguf_linear.linear(m.out.view(1, -1), p)
    assert not written and deferred_merge._pending is None
    torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    monkeypatch.setattr(gguf_config, "gguf_plan", lambda *a, **k: ("dequant", {}))
    # dequantize + cuBLAS, in PyTorch here: what matters is that it reads the output after pass 2 wrote it
    monkeypatch.setattr(gguf_linear, "dequant_matmul", lambda xx, pp, bias, out: out.copy_(xx.float() @ w.float().t()))
    m = merge()
    deferred_merge.defer(m)
    got = gguf_linear.linear(m.out.view(1, -1), p)
    assert written == [True] and deferred_merge._pending is None
    torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    # a merge left over when the next is deferred is launched, not lost
    written.clear()
    deferred_merge.defer(merge())
    deferred_merge.defer(merge())
    assert written == [True]
    deferred_merge.settle()
    assert written == [True, True] and deferred_merge._pending is None


def test_fits_needs_the_plan_as_planned_with_whole_heads_in_whole_tiles():
    """One K-tile a program (split-K = K's tiles) of an int8 streaming plan, tiles of a power of two of heads."""
    p, _ = _weight(QType.Q4_K)
    m = _merge(37, 3, torch.zeros(1, H, 3, D), torch.zeros(1, H, 3))

    def cfg(ns, split, **kw):
        return dict(bn=8, ns=ns, bm=1, split_k=split, **kw)

    assert gguf_gemv_merge.fits(m, p, "wide_i8", cfg(2, 4)) and gguf_gemv_merge.fits(m, p, "wide_xq", cfg(8, 1))
    assert not gguf_gemv_merge.fits(m, p, "wide_i8", cfg(2, 2))  # two tiles a program (Q8_0's o in the H200 table)
    assert not gguf_gemv_merge.fits(m, p, "wide_tma", cfg(2, 4))  # not the streaming int8 GEMV
    assert not gguf_gemv_merge.fits(m, p, "wide", cfg(2, 4))  # float activations
    assert not gguf_gemv_merge.fits(m, p, "wide_i8", cfg(2, 4, stream=2))  # stream-K
    assert not gguf_gemv_merge.fits(m, p, "wide_i8", cfg(3, 3))  # 3 heads a tile: not a power of two, nor whole
    assert not gguf_gemv_merge.fits(m, _weight(QType.Q6_K)[0], "wide_i8", cfg(1, 16))  # 16 values: part of a head
    two = DeferredMerge(torch.zeros(2, H, D), m.part_out, m.part_lse, m.context_lens, 3, 0, 0, 16, False,
                        lambda: None)
    assert not gguf_gemv_merge.fits(two, p, "wide_i8", cfg(2, 4))  # two rows


def test_the_model_defers_only_where_o_runs_the_merging_plan(monkeypatch):
    import devstral.quant.linear as ql
    from devstral.kernels import gguf_config

    monkeypatch.setattr(ql, "cuda_kernels", lambda device: True)  # planar weights on the CPU
    raw = random_blocks(QType.Q4_K, N, H * D, torch.Generator().manual_seed(0))
    o = ql.QuantLinear(raw, QType.Q4_K, N, H * D)
    plans = {"wide_i8": dict(bn=8, ns=2, bm=1, split_k=4), "wide_xq": dict(bn=8, ns=2, bm=1, split_k=2)}
    for kind, planned, env, want in (("wide_i8", "wide_i8", "1", True), ("wide_i8", "wide_i8", "late", True),
                                     ("wide_i8", "wide_i8", "0", False), ("wide_xq", "wide_xq", "1", False)):
        monkeypatch.setenv("DEVSTRAL_O_MERGE", env)
        monkeypatch.setattr(gguf_config, "gguf_plan", lambda *a, k=kind, c=plans[planned], **kw: (k, c))
        assert ql.merges_attention(o, D) is want, (kind, env)
    monkeypatch.setenv("DEVSTRAL_O_MERGE", "1")
    monkeypatch.setattr(gguf_config, "gguf_plan", lambda *a, **kw: ("wide_i8", plans["wide_i8"]))
    assert not ql.merges_attention(o, 3 * D)  # heads wider than a tile
    assert not ql.merges_attention(torch.nn.Linear(H * D, N, bias=False), D)  # not a GGUF weight


def test_the_switch_names_its_values(monkeypatch):
    from devstral.errors import DevstralError

    for raw, on, late in (("0", False, False), ("1", True, False), ("late", True, True)):
        monkeypatch.setenv("DEVSTRAL_O_MERGE", raw)
        assert gguf_gemv_merge.enabled() == on and deferred_merge.signal_at_end() == late
    monkeypatch.setenv("DEVSTRAL_O_MERGE", "yes")
    with pytest.raises(DevstralError, match="DEVSTRAL_O_MERGE='yes': expected 0, 1 or late"):
        gguf_gemv_merge.enabled()


class _Cache:
    """An AttentionCache over a filled paged cache, attending with the Triton kernels in the interpreter (the
    engine's cache on the GPU does the same: engine/attention.py); it ignores the new keys (the cache is filled)."""

    def __init__(self):
        self.layer, self.tables, self.lens = filled_cache("bf16", [37], 2, D, 8, torch.bfloat16, "cpu", 0)
        self.deferred = []

    def attend(self, layer, q, k, v, cos, sin, q_scale, xq=(), defer_merge=False):
        self.deferred.append(defer_merge)
        out = decode_attention_triton(q[0], self.layer, self.tables, self.lens, D ** -0.5, defer_merge=defer_merge,
                                      max_context=self.tables.shape[1] * 8, config=DecodeConfig(block_n=16, splits=3))
        return out[None]


def test_the_attention_layer_hands_its_merge_to_o(monkeypatch):
    """model.transformer.Attention at one decode row, o a planar Q4_K QuantLinear: with o_merges the cache is asked
    to defer and o's GEMV merges (nothing left pending); the output matches the layer run with the merge pass and
    o through dequantize + matmul, within the int8 activations' error."""
    import devstral.quant.linear as ql
    from devstral.config import ModelConfig
    from devstral.kernels import gguf_config, gguf_linear
    from devstral.model.transformer import Attention

    monkeypatch.setattr(ql, "cuda_kernels", lambda device: True)  # planar weights on the CPU
    cfg = ModelConfig(arch="mistral", dim=64, n_layers=1, n_heads=H, n_kv_heads=2, head_dim=D, hidden_dim=128, vocab_size=100)
    attn = Attention(cfg, 0)
    raw = random_blocks(QType.Q4_K, 64, H * D, torch.Generator().manual_seed(4))
    attn.o_proj = ql.QuantLinear(raw, QType.Q4_K, 64, H * D)
    w = dequantize(raw, QType.Q4_K, (64, H * D)).float()
    attn = attn.to(torch.bfloat16)
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    cos = sin = torch.zeros(1, 1, D)
    monkeypatch.setattr(gguf_linear, "dequant_matmul", lambda xx, pp, bias, out: out.copy_(xx.float() @ w.t()))
    results = {}
    for merges, plan in ((False, ("dequant", {})), (True, ("wide_i8", dict(bn=8, ns=2, bm=1, split_k=4)))):
        monkeypatch.setattr(gguf_config, "gguf_plan", lambda *a, pl=plan, **kw: pl)
        attn.o_merges = merges
        cache = _Cache()
        with torch.no_grad():
            results[merges] = attn(x, cos, sin, None, None, cache).float()
        assert cache.deferred == [merges] and deferred_merge._pending is None
    err = (results[True] - results[False]).abs()
    assert err.max() <= 0.02 * results[False].abs().max(), err.max()
