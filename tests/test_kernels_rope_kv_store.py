"""RoPE and the KV store in one launch (kernels/rope_kv_store_triton.py) give exactly what the two
references give one after the other: `apply_rope_ref` for the rotated queries and keys (bit for bit
in bf16/fp16, as rope_triton), then `store_kv_ref` of the rotated keys and the values (the same cache
bytes, every kind), with padding rows (slot -1) that write nothing to the cache, q/k/v as views of one
fused projection, and with and without the llama-4 query temperature.

CPU: Triton's interpreter. GPU (`-m gpu`): the compiled kernel at Devstral-Small shapes, and replayed
from a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from devstral.kernels.kv_store import rope_and_store_kv, rope_and_store_kv_ref  # noqa: E402
from devstral.kernels.rope_kv_store_triton import rope_and_store_kv_triton, supported  # noqa: E402
from test_kernels_kv_store import KINDS, assert_same_bytes, empty_layer  # noqa: E402


def step_inputs(n, n_heads, n_kv_heads, head_dim, dtype, device, seed, *, scaled):
    """q/k/v as views of one qkv row per token (mixed scales), cos/sin of real positions, q_scale."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (n_heads + 2 * n_kv_heads) * head_dim, generator=g)
    qkv = qkv * torch.logspace(-2, 2, qkv.shape[1])[torch.randperm(qkv.shape[1], generator=g)]
    qkv = qkv.to(dtype).to(device)
    q = qkv[:, :n_heads * head_dim].view(n, n_heads, head_dim)
    k = qkv[:, n_heads * head_dim:(n_heads + n_kv_heads) * head_dim].view(n, n_kv_heads, head_dim)
    v = qkv[:, (n_heads + n_kv_heads) * head_dim:].view(n, n_kv_heads, head_dim)
    pos = torch.randint(0, 40000, (n,), generator=g).float()
    inv = 1e6 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    cos, sin = (angles.cos() * 1.1).to(dtype).to(device), (angles.sin() * 1.1).to(dtype).to(device)
    q_scale = (1 + 0.1 * torch.log1p(pos / 8192)).to(device) if scaled else None
    return q, k, v, cos, sin, q_scale


def padded_slots(n, capacity, seed, device):
    g = torch.Generator().manual_seed(seed + 1)
    slots = torch.randperm(capacity, generator=g)[:n]
    slots[torch.randperm(n, generator=g)[: max(1, n // 4)]] = -1
    return slots.to(device)


def check(kind, dtype, device, *, n, n_heads, n_kv_heads, head_dim, num_blocks, block_size, seed, scaled):
    q, k, v, cos, sin, q_scale = step_inputs(n, n_heads, n_kv_heads, head_dim, dtype, device, seed, scaled=scaled)
    slots = padded_slots(n, num_blocks * block_size, seed, device)
    ours = empty_layer(kind, num_blocks, block_size, n_kv_heads, head_dim, device)
    ref = empty_layer(kind, num_blocks, block_size, n_kv_heads, head_dim, device)
    assert supported(q, k, ours)
    q1, k1 = rope_and_store_kv_triton(q, k, v, cos, sin, q_scale, ours, slots)
    q2, k2 = rope_and_store_kv_ref(q, k, v, cos, sin, q_scale, ref, slots)
    assert q1.dtype == q2.dtype and k1.dtype == k2.dtype
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    assert_same_bytes(ours, ref)


# ---------------------------------------------------------------- CPU, through the interpreter
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scaled", [False, True])
def test_fused_equals_rope_then_store(kind, scaled):
    check(kind, torch.bfloat16, "cpu", n=7, n_heads=6, n_kv_heads=3, head_dim=64, num_blocks=4, block_size=8,
          seed=KINDS.index(kind), scaled=scaled)


def test_fused_equals_rope_then_store_fp32_and_fp16():
    for dtype in (torch.float32, torch.float16):
        check("q8_0", dtype, "cpu", n=5, n_heads=4, n_kv_heads=2, head_dim=32, num_blocks=2, block_size=8, seed=3,
              scaled=True)


def test_dispatch_takes_the_reference_where_the_kernel_does_not_apply():
    """head_dim 48 (not a power of two): the two-step path, same result as the reference."""
    q, k, v, cos, sin, q_scale = step_inputs(3, 2, 1, 48, torch.float32, "cpu", 0, scaled=False)
    slots = torch.tensor([0, -1, 5])
    a = empty_layer("bf16", 1, 8, 1, 48, "cpu")
    b = empty_layer("bf16", 1, 8, 1, 48, "cpu")
    assert not supported(q, k, a)
    qa, ka = rope_and_store_kv(q, k, v, cos, sin, q_scale, a, slots)
    qb, kb = rope_and_store_kv_ref(q, k, v, cos, sin, q_scale, b, slots)
    assert torch.equal(qa, qb) and torch.equal(ka, kb)
    assert_same_bytes(a, b)


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 64, 3001])
def test_gpu_fused_equals_rope_then_store(kind, n):
    check(kind, torch.bfloat16, "cuda", n=n, n_heads=32, n_kv_heads=8, head_dim=128, num_blocks=400, block_size=16,
          seed=n, scaled=True)


@pytest.mark.gpu
def test_gpu_fused_replays_in_a_cuda_graph():
    """Captured once, replayed with new inputs and slots in the same buffers."""
    dev, n = "cuda", 16
    q, k, v, cos, sin, q_scale = step_inputs(n, 32, 8, 128, torch.bfloat16, dev, 0, scaled=True)
    slots = torch.full((n,), -1, device=dev)
    ours = empty_layer("q8_0", 64, 16, 8, 128, dev)
    rope_and_store_kv_triton(q, k, v, cos, sin, q_scale, ours, slots)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = rope_and_store_kv_triton(q, k, v, cos, sin, q_scale, ours, slots)
    ref = empty_layer("q8_0", 64, 16, 8, 128, dev)
    for seed in (1, 2):
        new = step_inputs(n, 32, 8, 128, torch.bfloat16, dev, seed, scaled=True)
        for dst, src in zip((q, k, v, cos, sin, q_scale), new, strict=True):
            dst.copy_(src)
        slots.copy_(padded_slots(n, 64 * 16, seed, dev))
        graph.replay()
        expect = rope_and_store_kv_ref(q, k, v, cos, sin, q_scale, ref, slots)
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(outs, expect, strict=True))
    assert_same_bytes(ours, ref)
