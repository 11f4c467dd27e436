"""Fixed-point o/down outputs (DEVSTRAL_FIXED_DELTAS=1, quant/fixed_deltas.py) on a CUDA GPU: the kernels' sums
against their ordinary outputs, eagerly and replayed from a CUDA graph under dependent launch, and a Q4_K_M model's
greedy decode in the engine with them against without them."""

from __future__ import annotations

import pytest
import torch

from devstral.kernels.fixed_point import from_fixed_ref
from devstral.kernels.gguf_pack import pack
from devstral.quant import QType
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
    import devstral
    from devstral.engine.engine import Engine, EngineConfig
    from devstral.engine.sampling import SamplingParams
    from devstral.formats.gguf import export_gguf
    from devstral.testing import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "ck", inner_vocab=500, dim=512, hidden_dim=1536, n_layers=4, n_heads=8,
                              n_kv_heads=2, head_dim=64)
    path = export_gguf(ck, tmp_path / "m.gguf", "Q4_K_M")
    greedy = SamplingParams(temperature=0.0)
    prompts = [list(range(1, 40)), list(range(50, 70))]
    outs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("DEVSTRAL_FIXED_DELTAS", flag)
        llm = devstral.load(path, device="cuda", prefix_caching=False)
        engine = Engine(llm.model, llm.config, EngineConfig(max_num_seqs=1, speculative="off", prefix_caching=False),
                        compute_dtype=torch.bfloat16, plan=(1024, 16384))
        installed = [b.self_attn.o_proj.fixed_out is not None for b in llm.model.model.layers]
        assert all(installed) if flag == "1" else not any(installed)
        toks = []
        for prompt in prompts:  # one row at a time: every decode step takes the fixed-point path
            seq = engine.add(prompt, greedy, 48, set())
            while engine.has_work():
                engine.step()
            toks.append(seq.token_ids[seq.num_prompt_tokens:])
        outs.append(toks)
    same = sum(a == b for x, y in zip(*outs, strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 0.9 * sum(len(t) for t in outs[0]), outs  # bf16 rounding apart: a flat random model may flip a few
