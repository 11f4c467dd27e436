"""A gate/up GEMV writing its down projection's activations itself (DEVSTRAL_GLU_XQ=1, gguf_gemv_wide._glu_xq) on
a CUDA GPU: at Devstral's gate/up shape, replayed from a CUDA graph under dependent launch, the output is the plain
launch's and the words are gguf_xq's GLU quantization of it, bit for bit; and a Q4_K_M model's greedy decode in the
engine gives the same tokens with it as without it."""

from __future__ import annotations

import pytest
import torch

from devstral.kernels.gguf_pack import pack
from devstral.quant import QType
from q4km_greedy import greedy_off_and_on
from test_kernels_gguf_wide import random_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")


@pytest.mark.parametrize("layout", [0, 1], ids=["stride8", "stride4"])
def test_devstrals_gate_up_writes_downs_activations_in_a_graph(layout):
    from devstral.kernels import gguf_gemv_wide, gguf_xq

    n, k = 65536, 5120
    g = torch.Generator().manual_seed(0)
    p = pack(random_blocks(QType.Q4_K, n, k, g).to("cuda"), QType.Q4_K, n, k)
    x = torch.randn(1, k, generator=g).to("cuda", torch.bfloat16)
    cfg = dict(bn=128, ns=16, bm=1, split_k=1, int8=True, xq=True)  # the H200 table's Q4_K 65536 x 5120
    plain = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
    gguf_gemv_wide.gemv(x, p, None, plain, **cfg)
    expected = gguf_xq.quantize(plain, layout, glu=True)
    out = torch.empty_like(plain)
    xq = torch.empty(1, n // 64, gguf_xq.WORDS, dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gguf_gemv_wide.gemv(x, p, None, out, **cfg, glu_xq=(xq, layout))  # compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            gguf_gemv_wide.gemv(x, p, None, out, **cfg, glu_xq=(xq, layout))
    out.zero_()
    xq.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, plain)
    assert torch.equal(xq, expected)


def test_greedy_decode_is_the_same_with_and_without(tmp_path, monkeypatch):
    from devstral.kernels import gguf_config
    from devstral.kernels.gguf_gemv_wide import bm_for

    planned = gguf_config.gguf_plan

    def plan(qtype, m, n, k, device=None):  # every decode GEMV the streaming one, one split: gate/up qualifies
        if m <= 8:
            return "wide_xq", dict(bn=128, ns=8, bm=bm_for(m), split_k=1, num_warps=4)
        return planned(qtype, m, n, k, device)

    monkeypatch.setattr(gguf_config, "gguf_plan", plan)
    outs = greedy_off_and_on(tmp_path, monkeypatch, "DEVSTRAL_GLU_XQ",
                             lambda model: [b.mlp.glu_xq is not None for b in model.model.layers])
    assert outs[0] == outs[1]
