"""The fused LoRA linear (hand-written backward) against PEFT's LoRA layer: outputs and grads of x, A, B."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from devstral.kernels.lora_linear import lora_linear
from devstral.model.lora import LoRALinear
from devstral.model.nf4 import NF4Linear, dequantize_nf4

peft = pytest.importorskip("peft")


class _Block(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def _peft_layer(d_in=48, d_out=40, r=8, alpha=16.0, rslora=False, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = peft.get_peft_model(_Block(d_in, d_out).to(dtype), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                                                     use_rslora=rslora, lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.1)  # B starts at zero: make the path carry a gradient
    return model, layer


def _ours_from(layer, r, alpha, rslora, dtype=torch.float32) -> LoRALinear:
    ours = LoRALinear(layer.base_layer, r, alpha, rslora=rslora, init=False, dtype=dtype)
    with torch.no_grad():
        ours.lora_A.weight.copy_(layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(layer.lora_B["default"].weight)
    ours.lora_A.weight.requires_grad_(True)
    ours.lora_B.weight.requires_grad_(True)
    return ours


@pytest.mark.parametrize("rslora", [False, True])
def test_output_and_grads_equal_peft(rslora):
    """In float64, so that a different (equally valid) summation order cannot hide or fake a difference."""
    model, layer = _peft_layer(rslora=rslora, dtype=torch.float64)
    ours = _ours_from(layer, 8, 16.0, rslora, dtype=torch.float64)
    x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = model(x_ref)
    (want * g).sum().backward()
    got = ours(x_ours)
    assert got.grad_fn is not None and "LoRALinear" in type(got.grad_fn).__name__  # the fused node ran
    (got * g).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.lora_A.weight.grad, layer.lora_A["default"].weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.lora_B.weight.grad, layer.lora_B["default"].weight.grad, rtol=1e-12, atol=1e-12)


def test_nf4_base_grads_equal_the_dequantized_reference():
    g = torch.Generator().manual_seed(3)
    base = NF4Linear(torch.randn(32, 64, generator=g) * 0.1, double_quant=True)
    w = dequantize_nf4(base.nf4())
    a = (torch.randn(4, 64, generator=g) * 0.1).requires_grad_()
    b = (torch.randn(32, 4, generator=g) * 0.1).requires_grad_()
    x = torch.randn(5, 64, generator=g).requires_grad_()
    got = lora_linear(x, base, a, b, 2.0)
    grads = torch.autograd.grad(got.square().sum(), (x, a, b))
    want = x @ w.t() + (x @ a.t()) @ b.t() * 2.0
    ref = torch.autograd.grad(want.square().sum(), (x, a, b))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(grads, ref, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_autocast_bf16_grads_match_the_unfused_layer():
    _, layer = _peft_layer()
    ours = _ours_from(layer, 8, 16.0, False)
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(4))
    grads = []
    for run in (ours.forward, ours.unfused):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = run(xi)
        assert y.dtype == torch.bfloat16
        grads.append(torch.autograd.grad(y.float().square().sum(), (xi, ours.lora_A.weight, ours.lora_B.weight)))
    for mine, theirs in zip(*grads, strict=True):
        assert mine.dtype == theirs.dtype
        torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2)


def test_dropout_takes_the_unfused_path_while_training():
    lin = nn.Linear(8, 8, bias=False).requires_grad_(False)
    lora = LoRALinear(lin, 2, 4.0, dropout=0.5)
    y = lora(torch.randn(2, 8, requires_grad=True))
    assert "LoRALinear" not in type(y.grad_fn).__name__
