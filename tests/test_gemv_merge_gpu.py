"""The o projection merging the decode attention's splits in its prologue (kernels/gguf_gemv_merge.py) on a CUDA
GPU: at Devstral's o shape (32 heads of 128, Q4_K 5120 x 4096 in the H200 table's tile, 128 x 16, one K-tile of
4 heads a program) against the dequantized weight times the merged output, within the int8 activations' error,
directly and replayed from a CUDA graph with other context lengths (rows of 1, 8 and 45 splits with keys); and
a Q4_K_M model's greedy decode in the engine giving the same tokens with DEVSTRAL_O_MERGE=1 as with 0."""

from __future__ import annotations

import pytest
import torch

from q4km_greedy import greedy_off_and_on

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")

H, D, N, SPLITS = 32, 128, 5120, 45


def test_devstral_o_shape_in_a_graph_with_other_contexts():
    from devstral.kernels import gguf_gemv_merge
    from devstral.kernels.deferred_merge import DeferredMerge
    from devstral.kernels.fixed_point import from_fixed_ref
    from devstral.kernels.gguf_pack import pack
    from devstral.quant import QType, dequantize
    from test_kernels_gguf_wide import random_blocks

    g = torch.Generator().manual_seed(0)
    raw = random_blocks(QType.Q4_K, N, H * D, g)
    p = pack(raw.cuda(), QType.Q4_K, N, H * D)
    w = dequantize(raw, QType.Q4_K, (N, H * D)).float().cuda()
    parts = torch.randn(1, H, SPLITS, D, generator=g).cuda()
    lse = (torch.randn(1, H, SPLITS, generator=g) * 4).cuda()
    direct = torch.randn(1, H, D, generator=g).to(torch.bfloat16).cuda()
    lens = torch.tensor([512], dtype=torch.int32, device="cuda")
    merge = DeferredMerge(direct, parts, lse, lens, SPLITS, 0, 0, 64, True, lambda: None)
    out = torch.zeros(1, N, device="cuda")
    acc, zero = (torch.zeros(1, N, dtype=torch.int64, device="cuda") for _ in range(2))
    gguf_gemv_merge.gemv(merge, p, out, bn=128, ns=16)  # compiles
    gguf_gemv_merge.gemv(merge, p, acc, bn=128, ns=16, fixed_zero=zero)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            gguf_gemv_merge.gemv(merge, p, out, bn=128, ns=16)
            gguf_gemv_merge.gemv(merge, p, acc, bn=128, ns=16, fixed_zero=zero)
    for length in (512, 40, 32768, 3000):  # 8, 1 (pass 1 wrote the row), 43 and 24 splits with keys
        lens.fill_(length)
        acc.zero_()
        graph.replay()
        torch.cuda.synchronize()
        x = gguf_gemv_merge.merged_reference(merge).reshape(1, -1)
        want = x @ w.t()
        bound = (x.abs() @ w.abs().t()) / 127
        assert ((out - want).abs() <= bound + 1e-5).all(), (length, (out - want).abs().max())
        assert ((from_fixed_ref(acc, torch.float32) - want).abs() <= bound + 1e-4).all(), length


def test_greedy_decode_is_the_same_with_and_without(tmp_path, monkeypatch):
    from devstral.kernels import gguf_config
    from devstral.kernels.gguf_gemv_wide import bm_for

    planned = gguf_config.gguf_plan

    def plan(qtype, m, n, k, device=None):  # every decode GEMV the int8 streaming one, a K-tile a program
        if m <= 8:
            sub_block = 16 if qtype == "Q6_K" else 32
            return "wide_i8", dict(bn=64, ns=8, bm=bm_for(m), split_k=k // (8 * sub_block), num_warps=4)
        return planned(qtype, m, n, k, device)

    monkeypatch.setattr(gguf_config, "gguf_plan", plan)
    outs = greedy_off_and_on(tmp_path, monkeypatch, "DEVSTRAL_O_MERGE",
                             lambda model: [b.self_attn.o_merges for b in model.model.layers])
    assert outs[0] == outs[1]
