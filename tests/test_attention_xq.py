"""The decode attention writing the o projection's int8 activations (paged_attention_triton, xq_layout) and
the model asking for them only where o's plan quantizes (quant.linear.attention_xq_layouts).

CPU: the kernels in Triton's interpreter. The words must be gguf_xq's PyTorch twin of the stored output
bit for bit -- rows merged from several splits and rows pass 1 wrote itself (one split with keys), every
KV kind (q4_0 holds its tiles in another column order), both layouts, and every way the output is written:
the merge pass, the fused merge (the last split of a group merges and packs), one split for the whole
grid -- and quantize() must hand them back without a launch. Past the decode sizes nothing is offered
and the GEMV quantizes as before.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from devstral.kernels import gguf_xq  # noqa: E402
from devstral.kernels.paged_attention_triton import DecodeConfig, decode_attention_triton  # noqa: E402
from test_kernels_decode_attention import filled_cache, queries  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _attend(kind, lens, head_dim, layout, cfg, n_heads=4, n_kv_heads=2, seed=0):
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    layer, tables, context = filled_cache(kind, lens, n_kv_heads, head_dim, 8, dtype, "cpu", seed)
    q = queries(len(lens), n_heads, n_kv_heads, head_dim, dtype, "cpu", seed + 1)
    gguf_xq.forget()
    out = decode_attention_triton(q, layer, tables, context, head_dim ** -0.5, max_context=tables.shape[1] * 8,
                                  config=cfg, xq_layout=layout)
    return out, gguf_xq._offered


WRITERS = {"merge_pass": dict(splits=3), "fused_merge": dict(splits=3, fused_merge=True), "one_split": dict(splits=1)}


@pytest.mark.parametrize("kind", ["bf16", "fp32", "q8_0", "q4_0"])
@pytest.mark.parametrize("layout", [gguf_xq.STRIDE8, gguf_xq.STRIDE4], ids=["stride8", "stride4"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_the_attention_writes_the_quantization_of_the_stored_output(kind, layout, writer):
    """Context 1 and 9 fit in one split of 16 keys (pass 1 writes those rows), 37 and 70 are merged; 6 query
    heads over 2 kv heads leave the fused merge's head tile part empty."""
    for head_dim in (32, 64):
        out, entry = _attend(kind, [1, 37, 9, 70], head_dim, layout, DecodeConfig(block_n=16, **WRITERS[writer]),
                             n_heads=6)
        rows = out.view(out.shape[0], -1)
        assert entry is not None and entry[0].data_ptr() == rows.data_ptr() and not entry[3]
        xq = gguf_xq.quantize(rows, layout)
        assert xq is entry[2][layout]
        assert torch.equal(xq, gguf_xq.reference(rows, layout)), (kind, head_dim)


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_the_output_is_the_same_with_and_without(writer):
    lens, cfg = [1, 37, 9, 70], DecodeConfig(block_n=16, **WRITERS[writer])
    plain, _ = _attend("q8_0", lens, 32, None, cfg)
    with_xq, _ = _attend("q8_0", lens, 32, gguf_xq.STRIDE8, cfg)
    assert torch.equal(plain, with_xq)


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_nothing_is_offered_past_the_decode_sizes(writer):
    out, entry = _attend("bf16", [5] * 9, 32, gguf_xq.STRIDE8, DecodeConfig(block_n=16, **WRITERS[writer]))
    assert entry is None


def test_the_model_asks_only_at_the_rows_where_o_quantizes(monkeypatch):
    """attention_xq_layouts: o_proj's layout at each decode row count whose plan is wide_xq / wide_tma;
    nothing for a float plan, a plain linear, or with DEVSTRAL_ATTN_XQ=0."""
    import devstral.quant.linear as ql
    from devstral.kernels import gguf_config
    from devstral.quant import QType
    from test_kernels_gguf_wide import random_blocks

    monkeypatch.setattr(ql, "cuda_kernels", lambda device: True)  # planar weights on the CPU
    g = torch.Generator().manual_seed(3)
    o = ql.QuantLinear(random_blocks(QType.Q8_0, 64, 256, g), QType.Q8_0, 64, 256)
    plans = {1: "wide_xq", 2: "wide_i8", 4: "wide_tma"}
    monkeypatch.setattr(gguf_config, "gguf_plan", lambda qtype, m, n, k, device=None: (
        plans.get(m, "wide"), dict(bn=64, ns=8, bm=1, split_k=1, num_warps=4)))
    assert ql.attention_xq_layouts(o) == {1: (gguf_xq.STRIDE8,), 4: (gguf_xq.STRIDE8,)}
    assert ql.attention_xq_layouts(torch.nn.Linear(256, 64)) == {}
    monkeypatch.setenv("DEVSTRAL_ATTN_XQ", "0")
    assert ql.attention_xq_layouts(o) == {}
