"""Inference fuses q/k/v and gate/up into one matmul each (model/transformer.fused_projection): the
logits stay those of the unfused model (transformers' Mistral on the same checkpoint is the oracle
of the unfused path elsewhere), the weights are views of the fused one, and memory does not grow."""

from __future__ import annotations

import torch

import devstral
from devstral.testing import make_tiny_checkpoint


def test_fused_projections_keep_the_logits_and_share_the_weights(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck")
    llm = devstral.load(ck, device="cpu", dtype="fp32", backend="torch")
    ids = list(range(1, 40))
    with torch.no_grad():
        before = llm.logits(ids)
    params = sum(p.numel() for p in llm.model.parameters())
    llm.model.fuse_projections()
    for block in llm.model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        assert attn.qkv is not None and mlp.gate_up is not None
        fused = attn.qkv.keywords["weight"]  # functools.partial of the one matmul
        assert attn.q_proj.weight.data_ptr() == fused.data_ptr()  # a view, not a copy
        assert attn.v_proj.weight.data_ptr() == fused[-attn.v_proj.weight.shape[0]:].data_ptr()
    assert sum(p.numel() for p in llm.model.parameters()) == params
    with torch.no_grad():
        after = llm.logits(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
