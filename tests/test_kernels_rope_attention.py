"""A decode step's RoPE, KV store and attention in one launch
(`paged_attention_triton.rope_store_decode_attention_triton`) against the references one after the other
(`paged_attention.rope_store_decode_attention_ref`: `rope_and_store_kv_ref`, then `decode_attention_ref`): the
cache holds the same bytes afterwards (the rotated key and the value at each row's slot, nothing for a padding
row's slot -1), and every real row's output matches. Splits one or many, merged by pass 2 or in the launch, scores
either orientation, a sliding window, the llama-4 query temperature, rows whose newest key is alone in its split.

A padding row (slot -1, context 1) attends to its own key from registers where the reference reads the stale slot:
its output is unspecified either way (the engine drops it), so only real rows are compared.

CPU: Triton's interpreter. GPU (`-m gpu`): the compiled kernel at Devstral-Small shapes, and replayed from a CUDA
graph against the two launches it replaces.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from devstral.kernels.kv_format import KVLayer  # noqa: E402
from devstral.kernels.paged_attention import rope_store_decode_attention_ref  # noqa: E402
from devstral.kernels.paged_attention_triton import (  # noqa: E402
    DecodeConfig,
    rope_store_decode_attention_triton,
    rope_supported,
)
from test_kernels_decode_attention import filled_cache  # noqa: E402
from test_kernels_rope_kv_store import step_inputs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def clone(layer: KVLayer) -> KVLayer:
    return KVLayer(*(None if t is None else t.clone() for t in layer[:4]), layer.kind)


def newest_slots(tables, lens, block_size):
    """Each row's slot for its newest position (context - 1); -1 for a padding row (context 1)."""
    slots = []
    for b, n in enumerate(lens.tolist()):
        pos = n - 1
        slots.append(-1 if n == 1 else int(tables[b, pos // block_size]) * block_size + pos % block_size)
    return torch.tensor(slots, dtype=torch.int64, device=tables.device)


def check(kind, context_lens, *, n_heads, n_kv_heads, head_dim, block_size, configs, window=None, scaled=False,
          device="cpu", seed=0):
    dtype = torch.float32 if kind == "fp32" else torch.float16 if kind == "fp16" else torch.bfloat16
    layer, tables, lens = filled_cache(kind, context_lens, n_kv_heads, head_dim, block_size, dtype, device, seed)
    q, k, v, cos, sin, q_scale = step_inputs(len(context_lens), n_heads, n_kv_heads, head_dim, dtype, device,
                                             seed + 1, scaled=scaled)
    assert rope_supported(q, k, v, cos, sin, layer)
    slots = newest_slots(tables, lens, block_size)
    real = lens > 1
    scale = head_dim ** -0.5
    ref_layer = clone(layer)
    ref = rope_store_decode_attention_ref(q, k, v, cos, sin, q_scale, ref_layer, slots, tables, lens, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for cfg in configs:
        mine = clone(layer)
        out = rope_store_decode_attention_triton(q, k, v, cos, sin, q_scale, mine, slots, tables, lens, scale, window,
                                                 max_context=tables.shape[1] * block_size, config=cfg)
        assert out.dtype == q.dtype and out.shape == q.shape
        assert torch.equal(mine.k, ref_layer.k) and torch.equal(mine.v, ref_layer.v), f"{kind} {cfg}: cache bytes"
        err = (out[real].float() - ref[real].float()).abs().max().item()
        assert err <= tol * max(1.0, ref[real].float().abs().max().item()), f"{kind} {cfg}: max error {err}"


SPLITS = [DecodeConfig(block_n=16, splits=3), DecodeConfig(block_n=16, splits=3, fused_merge=True),
          DecodeConfig(block_n=16, splits=1), DecodeConfig(block_n=16, splits=3, tokens_major=True)]


@pytest.mark.parametrize("kind", ["bf16", "fp16", "fp32"])
def test_rope_in_attention_matches_the_two_references(kind):
    # GQA 3:1 (query tile padded to 16 rows); 17 and 33 keys: the newest key alone in its 16-key tile and split;
    # 48: a full last tile; a padding row
    check(kind, [1, 17, 33, 48, 70], n_heads=6, n_kv_heads=2, head_dim=32, block_size=8, configs=SPLITS,
          seed=len(kind))


@pytest.mark.parametrize("window", [1, 20])
def test_rope_in_attention_with_a_sliding_window_and_query_temperature(window):
    check("bf16", [3, 40, 66], n_heads=8, n_kv_heads=4, head_dim=16, block_size=8, window=window, scaled=True,
          configs=SPLITS[:2], seed=window)


def test_rope_in_attention_needs_a_float_cache_and_one_dtype():
    layer, tables, lens = filled_cache("q8_0", [5, 9], 2, 32, 8, torch.bfloat16, "cpu", 1)
    q, k, v, cos, sin, _ = step_inputs(2, 4, 2, 32, torch.bfloat16, "cpu", 2, scaled=False)
    assert not rope_supported(q, k, v, cos, sin, layer)  # quantized caches keep the RoPE + store launch
    layer, tables, lens = filled_cache("bf16", [5, 9], 2, 32, 8, torch.bfloat16, "cpu", 1)
    assert rope_supported(q, k, v, cos, sin, layer)
    assert not rope_supported(q, k, v, cos.float(), sin.float(), layer)


def test_the_engine_step_goes_through_the_fused_path_and_back(monkeypatch):
    """BatchAttention.attend of a decode-only step gives the references' output and cache with the fused launch
    (DEVSTRAL_ROPE_IN_ATTENTION=1) and without it (the RoPE + store launch, then the attention)."""
    from devstral.engine.attention import BatchAttention
    from devstral.kernels import paged_attention

    lens_list = [9, 40]
    layer, tables, lens = filled_cache("bf16", lens_list, 2, 32, 8, torch.bfloat16, "cpu", 7)
    q, k, v, cos, sin, q_scale = step_inputs(2, 4, 2, 32, torch.bfloat16, "cpu", 8, scaled=True)
    slots = newest_slots(tables, lens, 8)
    ref_layer = clone(layer)
    ref = rope_store_decode_attention_ref(q, k, v, cos, sin, q_scale, ref_layer, slots, tables, lens, 0.2)

    class Pool:
        layers = None

    outs = []
    for fused in ("1", "0"):
        monkeypatch.setenv("DEVSTRAL_ROPE_IN_ATTENTION", fused)
        paged_attention.rope_in_attention.cache_clear()
        pool = Pool()
        pool.layers = [clone(layer)]
        step = BatchAttention(pool, slots, 2, tables, lens, max_context=tables.shape[1] * 8, scale=0.2)
        outs.append(step.attend(0, q[None], k[None], v[None], cos[None], sin[None], q_scale[None])[0])
        assert torch.equal(pool.layers[0].k, ref_layer.k) and torch.equal(pool.layers[0].v, ref_layer.v)
    paged_attention.rope_in_attention.cache_clear()
    for out in outs:
        assert (out.float() - ref.float()).abs().max().item() <= 2e-2 * max(1.0, ref.float().abs().max().item())


# ---------------------------------------------------------------- GPU
DEVSTRAL = dict(n_heads=32, n_kv_heads=8, head_dim=128, block_size=16)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_gpu_rope_in_attention_at_devstral_shape(kind):
    check(kind, [1, 17, 300, 513, 1024, 4000, 32768], **DEVSTRAL, device="cuda", seed=3, scaled=True,
          configs=[DecodeConfig(), DecodeConfig(fused_merge=True), DecodeConfig(splits=1), DecodeConfig(block_n=32)])


@pytest.mark.gpu
def test_gpu_rope_in_attention_replays_in_a_cuda_graph_like_the_two_launches():
    """Captured once, replayed with other contexts and slots: the same cache bytes as the RoPE + store launch
    followed by decode_attention_triton in the same graph conditions, outputs within bf16 rounding."""
    from devstral.kernels.kv_store import rope_and_store_kv
    from devstral.kernels.paged_attention_triton import decode_attention_triton

    dev, bs = "cuda", 16
    layer, tables, lens = filled_cache("bf16", [2000, 700, 33, 1], 8, 128, bs, torch.bfloat16, dev, seed=4)
    q, k, v, cos, sin, q_scale = step_inputs(4, 32, 8, 128, torch.bfloat16, dev, 5, scaled=True)
    max_context = tables.shape[1] * bs
    static_lens, static_slots = lens.clone(), newest_slots(tables, lens, bs)
    mine, theirs = clone(layer), clone(layer)

    def fused():
        return rope_store_decode_attention_triton(q, k, v, cos, sin, q_scale, mine, static_slots, tables, static_lens,
                                                  0.088, max_context=max_context)

    fused()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused()
    for new_lens in ([2000, 700, 33, 1], [1, 699, 16, 2]):
        static_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        static_slots.copy_(newest_slots(tables, static_lens, bs))
        graph.replay()
        rq, _ = rope_and_store_kv(q, k, v, cos, sin, q_scale, theirs, static_slots)
        want = decode_attention_triton(rq, theirs, tables, static_lens, 0.088, max_context=max_context)
        torch.cuda.synchronize()
        real = static_lens > 1
        assert torch.equal(mine.k, theirs.k) and torch.equal(mine.v, theirs.v)
        assert (out[real].float() - want[real].float()).abs().max().item() < 2e-2
