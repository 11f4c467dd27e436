"""The decode attention writing the o projection's int8 activations (xq_layout) on a CUDA GPU -- from its merge
pass, from the fused merge's last split, from one split: at Devstral's shape (32 query heads over 8 kv heads,
head_dim 128), replayed from a CUDA graph under dependent launch with other contexts, the words are
gguf_xq.quantize() of the stored output bit for bit (the compiled quantize kernel: both pack with
gguf_xq.pack_blocks) and the output is the one written without them; and a Q4_K_M model's greedy decode in the
engine, every decode GEMV the xq one, gives the same tokens with DEVSTRAL_ATTN_XQ=1 as with 0, with either merge."""

from __future__ import annotations

import pytest
import torch

from q4km_greedy import greedy_off_and_on
from test_kernels_decode_attention import filled_cache, queries

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")


@pytest.mark.parametrize("kind", ["bf16", "q8_0"])
@pytest.mark.parametrize("layout", [0, 1], ids=["stride8", "stride4"])
@pytest.mark.parametrize("writer", ["merge_pass", "fused_merge", "one_split"])
def test_devstral_shape_in_a_graph_with_other_contexts(kind, layout, writer):
    from devstral.kernels import gguf_xq
    from devstral.kernels.paged_attention_triton import DecodeConfig, decode_attention_triton

    cfg = DecodeConfig(fused_merge=writer == "fused_merge", splits=1 if writer == "one_split" else None)

    capture_lens, replay_lens = [512, 3, 4000], [1, 700, 31]  # one-split rows and merged ones, both times
    bound = 4096
    layer, tables, lens = filled_cache(kind, [bound] * 3, 8, 128, 16, torch.bfloat16, "cuda", seed=layout)
    q = queries(3, 32, 8, 128, torch.bfloat16, "cuda", seed=7)
    scale = 128 ** -0.5
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        lens.copy_(torch.tensor(capture_lens))
        decode_attention_triton(q, layer, tables, lens, scale, max_context=bound, config=cfg,
                                xq_layout=layout)  # compiles
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = decode_attention_triton(q, layer, tables, lens, scale, max_context=bound, config=cfg,
                                          xq_layout=layout)
        xq = gguf_xq._offered[2][layout]
    for contexts in (capture_lens, replay_lens):
        lens.copy_(torch.tensor(contexts))
        xq.zero_()
        graph.replay()
        torch.cuda.synchronize()
        expected_out = decode_attention_triton(q, layer, tables, lens, scale, max_context=bound, config=cfg)
        assert torch.equal(out, expected_out)
        rows = out.view(3, -1)
        assert torch.equal(xq, _launched(rows, layout))


def _launched(rows: torch.Tensor, layout: int) -> torch.Tensor:
    """gguf_xq.quantize() through its own kernel (the memo dropped first, so it cannot hand back the offer)."""
    from devstral.kernels import gguf_xq

    gguf_xq.forget()
    return gguf_xq.quantize(rows.clone(), layout)


@pytest.mark.parametrize("fused", ["0", "1"], ids=["merge_pass", "fused_merge"])
def test_greedy_decode_is_the_same_with_and_without(tmp_path, monkeypatch, fused):
    from devstral.kernels import gguf_config
    from devstral.kernels import paged_attention_triton as pa
    from devstral.kernels.gguf_gemv_wide import bm_for

    planned = gguf_config.gguf_plan

    def plan(qtype, m, n, k, device=None):  # every decode GEMV the streaming xq one: o quantizes its input
        if m <= 8:
            return "wide_xq", dict(bn=64, ns=8, bm=bm_for(m), split_k=2, num_warps=4)
        return planned(qtype, m, n, k, device)

    monkeypatch.setattr(gguf_config, "gguf_plan", plan)
    try:
        with monkeypatch.context() as m:
            m.setenv("DEVSTRAL_FUSED_MERGE", fused)
            pa._env_defaults.cache_clear()
            outs = greedy_off_and_on(tmp_path, monkeypatch, "DEVSTRAL_ATTN_XQ",
                                     lambda model: [bool(b.self_attn.out_xq) for b in model.model.layers])
    finally:
        pa._env_defaults.cache_clear()  # read again from the environment as it was
    assert outs[0] == outs[1]
