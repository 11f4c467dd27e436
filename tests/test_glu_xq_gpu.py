"""A gate/up GEMV writing its down projection's activations itself (DEVSTRAL_GLU_XQ=1, gguf_gemv_wide._glu_xq) on
a CUDA GPU: at Devstral's gate/up shape, replayed from a CUDA graph under dependent launch, the output is the plain
launch's and the words are gguf_xq's GLU quantization of it, bit for bit; and a Q4_K_M model's greedy decode in the
engine gives the same tokens with it as without it."""

from __future__ import annotations

import pytest
import torch

from devstral.kernels.gguf_pack import pack
from devstral.quant import QType
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
    import devstral
    from devstral.engine.engine import Engine, EngineConfig
    from devstral.engine.sampling import SamplingParams
    from devstral.formats.gguf import export_gguf
    from devstral.kernels import gguf_config
    from devstral.kernels.gguf_gemv_wide import bm_for
    from devstral.testing import make_tiny_checkpoint

    planned = gguf_config.gguf_plan

    def plan(qtype, m, n, k, device=None):  # every decode GEMV the streaming one, one split: gate/up qualifies
        if m <= 8:
            return "wide_xq", dict(bn=128, ns=8, bm=bm_for(m), split_k=1, num_warps=4)
        return planned(qtype, m, n, k, device)

    monkeypatch.setattr(gguf_config, "gguf_plan", plan)
    ck = make_tiny_checkpoint(tmp_path / "ck", inner_vocab=500, dim=512, hidden_dim=1536, n_layers=4, n_heads=8,
                              n_kv_heads=2, head_dim=64)
    path = export_gguf(ck, tmp_path / "m.gguf", "Q4_K_M")
    greedy = SamplingParams(temperature=0.0)
    prompts = [list(range(1, 40)), list(range(50, 70))]
    outs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("DEVSTRAL_GLU_XQ", flag)
        llm = devstral.load(path, device="cuda", prefix_caching=False)
        engine = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=1, speculative="off", prefix_caching=False),
                        compute_dtype=torch.bfloat16, plan=(1024, 16384))
        installed = [b.mlp.glu_xq is not None for b in llm.model.model.layers]
        assert all(installed) if flag == "1" else not any(installed)
        toks = []
        for prompt in prompts:
            seq = engine.add(prompt, greedy, 48, set())
            while engine.has_work():
                engine.step()
            toks.append(seq.token_ids[seq.num_prompt_tokens:])
        outs.append(toks)
    assert outs[0] == outs[1]
