"""Verify rows through the paged decode kernel: a sequence's last token and its k drafts are k + 1
decode rows with one block table and contexts n+1 ... n+1+k. Each row attending up to its own position
must be exactly causal attention over the chunk (prefill_attention_ref: SDPA with the causal and window
mask over the gathered keys). CPU: the Triton kernel in Triton's interpreter, small odd shapes; GPU
(`-m gpu`): compiled, at Devstral-Small's head layout."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from devstral.kernels.kv_format import KVLayer, storage  # noqa: E402
from devstral.kernels.kv_store import store_kv_ref  # noqa: E402
from devstral.kernels.paged_attention import decode_attention_ref, prefill_attention_ref  # noqa: E402
from devstral.kernels.paged_attention_triton import DecodeConfig, decode_attention_triton  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def verify_case(device, dtype, *, n_heads, n_kv_heads, head_dim, block_size, prefix, k, window, seed=0):
    """One sequence of `prefix` cached tokens verifying k drafts, beside another sequence's plain
    decode row: the pool, the rows' q / tables / contexts, and the reference of each part."""
    g = torch.Generator().manual_seed(seed)
    vdtype, nv, sdtype, ns = storage("bf16" if dtype == torch.bfloat16 else "fp32", head_dim)
    lens = [prefix + 1 + k, 23]
    n_blocks = sum(-(-n // block_size) for n in lens) + 2
    layer = KVLayer(torch.zeros(n_blocks, block_size, n_kv_heads, nv, dtype=vdtype, device=device),
                    torch.zeros(n_blocks, block_size, n_kv_heads, nv, dtype=vdtype, device=device), None, None,
                    "bf16" if dtype == torch.bfloat16 else "fp32")
    order = torch.randperm(n_blocks, generator=g)
    width = max(-(-n // block_size) for n in lens) + 1
    tables = torch.zeros(2, width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):  # every key the rows will see is stored first, as the layer does
        nb = -(-n // block_size)
        tables[b, :nb] = order[used:used + nb]
        used += nb
        pos = torch.arange(n)
        slots = (tables[b][pos // block_size].long() * block_size + pos % block_size).to(device)
        kv = torch.randn(2, n, n_kv_heads, head_dim, generator=g).to(dtype).to(device)
        store_kv_ref(kv[0], kv[1], layer, slots)
    tables = tables.to(device)
    q = torch.randn(k + 2, n_heads, head_dim, generator=g).to(dtype).to(device)
    rows_tables = torch.cat([tables[:1].expand(k + 1, -1), tables[1:]]).contiguous()
    rows_lens = torch.tensor([prefix + 1 + j for j in range(k + 1)] + [lens[1]], dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    ref = torch.cat([prefill_attention_ref(q[:k + 1], layer, tables[0], prefix, scale, window),
                     prefill_attention_ref(q[k + 1:], layer, tables[1], lens[1] - 1, scale, window)])
    return q, layer, rows_tables, rows_lens, scale, ref


@pytest.mark.parametrize("k,window,splits", [(4, None, 1), (6, None, 3), (5, 9, 2)])
def test_verify_rows_in_the_kernel_are_causal_attention_over_the_chunk(k, window, splits):
    q, layer, tables, lens, scale, ref = verify_case("cpu", torch.float32, n_heads=6, n_kv_heads=2, head_dim=16,
                                                     block_size=4, prefix=21, k=k, window=window)
    got = decode_attention_triton(q, layer, tables, lens, scale, window, max_context=64,
                                  config=DecodeConfig(block_n=16, splits=splits))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the reference twin (what the CPU engine runs) groups the rows into the same chunk
    torch.testing.assert_close(decode_attention_ref(q, layer, tables, lens, scale, window), ref, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 700])
def test_verify_rows_in_the_compiled_kernel(window):
    q, layer, tables, lens, scale, ref = verify_case("cuda", torch.bfloat16, n_heads=32, n_kv_heads=8, head_dim=128,
                                                     block_size=16, prefix=3000, k=15, window=window)
    got = decode_attention_triton(q, layer, tables, lens, scale, window, max_context=8192)
    err = float((got.float() - ref.float()).norm() / ref.float().norm())
    assert err < 1e-2, err
