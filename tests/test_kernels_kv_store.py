"""The Triton KV-store kernel writes exactly the bytes of the reference store (`store_kv_ref`, whose
q8_0/q4_0 codecs are byte-identical to gguf-py's, test_kv_cache.py): every kind, keys and values as
views of a fused qkv projection, padding rows (slot -1) that must write nothing, any block size.

CPU: Triton's interpreter. GPU (`-m gpu`): the compiled kernel at Devstral-Small shapes and inside a
captured CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from devstral.kernels.kv_format import KV_KINDS, KVLayer, storage  # noqa: E402
from devstral.kernels.kv_store import store_kv_ref  # noqa: E402
from devstral.kernels.kv_store_triton import store_kv_triton  # noqa: E402

KINDS = ["bf16", "fp16", "fp32", "fp8", "q8_0", "q4_0"]


def empty_layer(kind: str, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, device) -> KVLayer:
    """A layer whose every byte is a sentinel, so that a stray write shows."""
    vdtype, nv, sdtype, ns = storage(kind, head_dim)

    def fill(n, dtype):
        if dtype is None:
            return None
        t = torch.empty(num_blocks, block_size, n_kv_heads, n, dtype=dtype, device=device)
        t.view(torch.uint8).fill_(0x5A)
        return t

    return KVLayer(fill(nv, vdtype), fill(nv, vdtype), fill(ns, sdtype), fill(ns, sdtype), kind)


def fused_kv(n_tokens, n_heads, n_kv_heads, head_dim, dtype, device, seed):
    """k, v [N, Hkv, D] as views of one qkv row per token; values of very different scales per head
    and one all-zero 32-group (q8_0/q4_0 must store a zero scale there)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n_tokens, (n_heads + 2 * n_kv_heads) * head_dim, generator=g)
    qkv = qkv * torch.logspace(-2, 2, qkv.shape[1])[torch.randperm(qkv.shape[1], generator=g)]
    qkv[0, n_heads * head_dim:n_heads * head_dim + 32] = 0
    qkv = qkv.to(dtype).to(device)
    k = qkv[:, n_heads * head_dim:(n_heads + n_kv_heads) * head_dim].view(n_tokens, n_kv_heads, head_dim)
    v = qkv[:, (n_heads + n_kv_heads) * head_dim:].view(n_tokens, n_kv_heads, head_dim)
    return k, v


def assert_same_bytes(a: KVLayer, b: KVLayer) -> None:
    for x, y in zip(a[:4], b[:4], strict=True):
        if x is not None:
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def check_store(kind, dtype, device, *, n_tokens, n_heads, n_kv_heads, head_dim, num_blocks, block_size, seed,
                slot_dtype=torch.int64):
    k, v = fused_kv(n_tokens, n_heads, n_kv_heads, head_dim, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n_tokens]
    slots[torch.randperm(n_tokens, generator=g)[: max(1, n_tokens // 4)]] = -1  # padding rows
    slots = slots.to(slot_dtype).to(device)
    ours = empty_layer(kind, num_blocks, block_size, n_kv_heads, head_dim, device)
    ref = empty_layer(kind, num_blocks, block_size, n_kv_heads, head_dim, device)
    store_kv_triton(k, v, ours, slots)
    store_kv_ref(k, v, ref, slots)
    assert_same_bytes(ours, ref)


# ---------------------------------------------------------------- CPU, through the interpreter
def test_every_kind_is_covered():
    assert set(KINDS) | {"f16", "f32"} == set(KV_KINDS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_writes_the_reference_bytes(kind, dtype):
    check_store(kind, dtype, "cpu", n_tokens=9, n_heads=4, n_kv_heads=3, head_dim=64, num_blocks=5,
                block_size=8, seed=KINDS.index(kind))


@pytest.mark.parametrize("block_size", [8, 32])
def test_store_any_block_size_and_int32_slots(block_size):
    check_store("q4_0", torch.float16, "cpu", n_tokens=6, n_heads=2, n_kv_heads=2, head_dim=32, num_blocks=3,
                block_size=block_size, seed=block_size, slot_dtype=torch.int32)


def test_all_padding_rows_write_nothing():
    k, v = fused_kv(4, 2, 2, 32, torch.bfloat16, "cpu", 0)
    layer = empty_layer("q8_0", 2, 8, 2, 32, "cpu")
    before = [t.clone() for t in layer[:4]]
    store_kv_triton(k, v, layer, torch.full((4,), -1))
    assert all(torch.equal(a, b) for a, b in zip(layer[:4], before, strict=True))


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_tokens", [1, 64, 3001])
def test_gpu_store_writes_the_reference_bytes(kind, n_tokens):
    check_store(kind, torch.bfloat16, "cuda", n_tokens=n_tokens, n_heads=32, n_kv_heads=8, head_dim=128,
                num_blocks=400, block_size=16, seed=n_tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "fp8", "q8_0"])
def test_gpu_store_replays_in_a_cuda_graph(kind):
    """Captured once; replayed with new keys and new slots (padding rows included) in the same buffers."""
    n, dev = 16, "cuda"
    k, v = fused_kv(n, 32, 8, 128, torch.bfloat16, dev, 0)
    slots = torch.full((n,), -1, dtype=torch.long, device=dev)
    ours = empty_layer(kind, 64, 16, 8, 128, dev)
    store_kv_triton(k, v, ours, slots)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        store_kv_triton(k, v, ours, slots)
    ref = empty_layer(kind, 64, 16, 8, 128, dev)
    for seed in (1, 2):
        k2, v2 = fused_kv(n, 32, 8, 128, torch.bfloat16, dev, seed)
        k.copy_(k2)
        v.copy_(v2)
        new_slots = torch.randperm(64 * 16, device=dev)[:n]
        new_slots[::5] = -1
        slots.copy_(new_slots)
        graph.replay()
        store_kv_ref(k, v, ref, slots)
    torch.cuda.synchronize()
    assert_same_bytes(ours, ref)
