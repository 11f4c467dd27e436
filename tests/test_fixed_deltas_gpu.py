"""Fixed-point o/down outputs (DEVSTRAL_FIXED_DELTAS=1, quant/fixed_deltas.py) on a CUDA GPU: the kernels' sums
against their ordinary outputs, eagerly and replayed from a CUDA graph under dependent launch, and a Q4_K_M model's
greedy decode in the engine with them against without them."""

from __future__ import annotations

import pytest
import torch

from devstral.kernels.fixed_point import from_fixed_ref
from devstral.kernels.gguf_pack import pack
from devstral.quant import QType
from q4km_greedy import greedy_off_and_on
from test_kernels_gguf_wide import random_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")


@pytest.mark.parametrize("qtype,kind,cfg", [
    ("Q4_K", "wide_i8", dict(bn=128, ns=16, bm=1, split_k=8)),  # Devstral's o on the H200 table: one tile a program
    ("Q4_K", "wide_tma", dict(bn=64, ns=16, num_stages=2, stream=4, pairs=True)),  # its Q4_K down
    ("Q6_K", "wide_tma", dict(bn=32, ns=32, split_k=4, num_stages=3, maxnreg=96)),  # its Q6_K down
    ("Q8_0", "wide_xq", dict(bn=64, ns=8, bm=1, split_k=7))])  # Q8_0 down
def test_fixed_point_sums_are_the_gemv_outputs_in_a_graph(qtype, kind, cfg):
    from devstral.kernels import gguf_gemv_tma, gguf_gemv_wide

    n, k = 5120, 4096 if kind == "wide_i8" else 32768
    g = torch.Generator().manual_seed(0)
    p = pack(random_blocks(QType[qtype], n, k, g).to("cuda"), QType[qtype], n, k)
    x = torch.randn(1, k, generator=g).to("cuda", torch.bfloat16)

    def gemv(out, **fixed):
        if kind == "wide_tma":
            return gguf_gemv_tma.gemv(x, p, None, out, **cfg, **fixed)
        return gguf_gemv_wide.gemv(x, p, None, out, int8=True, xq=kind == "wide_xq", **cfg, **fixed)

    plain = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
    gemv(plain)
    a, b = torch.zeros(2, 1, n, dtype=torch.int64, device="cuda")
    gemv(a, fixed_zero=b)
    eager = a.clone()
    b.fill_(99)
    a.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv(a, fixed_zero=b)
    for _ in range(3):
        a.zero_()
        b.fill_(99)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(a, eager) and not b.any()
    got = from_fixed_ref(eager, torch.bfloat16).float()
    assert ((got - plain.float()).abs() <= plain.float().abs() * 2**-7 + 1e-3).all()


def test_a_q4_k_m_model_decodes_the_same_tokens_with_fixed_point_deltas(tmp_path, monkeypatch):
    outs = greedy_off_and_on(tmp_path, monkeypatch, "DEVSTRAL_FIXED_DELTAS",
                             lambda model: [b.self_attn.o_proj.fixed_out is not None for b in model.model.layers])
    same = sum(a == b for x, y in zip(*outs, strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 0.9 * sum(len(t) for t in outs[0]), outs  # bf16 rounding apart: a flat random model may flip a few
