"""Fused linear + cross-entropy: loss and gradients equal F.cross_entropy(F.linear(h, W)) (fp32, tight)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from devstral.kernels.fused_linear_ce import linear_cross_entropy


def _inputs(n=37, d=24, v=101, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[::5] = -100
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_loss_and_grads_equal_reference(chunk):
    h, w, t = _inputs()
    ref = F.cross_entropy(F.linear(h, w), t, reduction="sum", ignore_index=-100)
    gh_ref, gw_ref = torch.autograd.grad(ref * 0.37, (h, w))
    got = linear_cross_entropy(h, w, t, chunk=chunk)
    gh, gw = torch.autograd.grad(got * 0.37, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)


def test_frozen_weight_gets_no_grad_and_no_grad_mode_computes_only_the_loss():
    h, w, t = _inputs(ignore=False)
    w.requires_grad_(False)
    loss = linear_cross_entropy(h, w, t, chunk=16)
    loss.backward()
    assert w.grad is None and h.grad is not None
    with torch.no_grad():
        again = linear_cross_entropy(h, w, t, chunk=16)
    assert not again.requires_grad
    torch.testing.assert_close(again, F.cross_entropy(h @ w.t(), t, reduction="sum"))


def test_autocast_bf16_matches_the_unfused_autocast_path():
    h, w, t = _inputs(n=64, d=32, v=257)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
        got = linear_cross_entropy(h, w, t, chunk=20)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    gh, gw = torch.autograd.grad(got, (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=1e-2)
    torch.testing.assert_close(gh, gh_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, gw_ref, rtol=2e-2, atol=2e-2)


def test_training_loss_and_lora_grads_equal_full_logits_reference(tiny_hf):
    """summed_loss (fused head) against F.cross_entropy over the model's full logits, LoRA on every linear."""
    from devstral.config import ModelConfig
    from devstral.model.lora import ALL_LINEAR, inject_lora, trainable_parameters
    from devstral.train.batching import Batch
    from devstral.train.loss import summed_loss
    from devstral.train.model_setup import load_base

    cfg = ModelConfig.from_dir(tiny_hf)
    model = load_base(tiny_hf, cfg, device=torch.device("cpu"), dtype=torch.float32)
    inject_lora(model, list(ALL_LINEAR), 4, 8.0, seed=0)
    params = trainable_parameters(model)
    for p in params:
        p.requires_grad_(True)
        torch.nn.init.normal_(p, std=0.05)  # B != 0, so every LoRA weight has a gradient
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 19), generator=g)
    labels = tokens.clone()
    labels[:, :6] = -100
    batch = Batch(tokens=tokens, labels=labels, positions=torch.arange(19).expand(2, 19), attn_mask=None)
    loss, n = summed_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    logits = model.lm_head(model.hidden_states(tokens, batch.positions))[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1), reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
