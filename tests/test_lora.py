"""LoRA wrapping of the model's own linears: names, init, scaling, targets."""

from __future__ import annotations

import math

import pytest
import torch

from devstral.errors import DevstralError
from devstral.model.lora import LoRALinear, inject_lora, lora_modules, parse_targets, trainable_parameters
from devstral.model.transformer import Transformer
from devstral.testing import tiny_config


def _model():
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=128)).eval()


def test_parse_targets():
    assert parse_targets("all-linear") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj", "w1", "w2", "w3"]  # w1-3: Mixtral's experts
    assert parse_targets("q,experts") == ["q_proj", "w1", "w2", "w3"]
    assert parse_targets("v,q") == ["q_proj", "v_proj"]
    with pytest.raises(DevstralError, match="unknown module 'lm'"):
        parse_targets("q,lm")


def test_fresh_adapter_is_identity_and_names_follow_peft():
    model = _model()
    tokens = torch.randint(0, 128, (2, 7))
    before = model(tokens)
    wrapped = inject_lora(model, parse_targets("all-linear"), r=4, alpha=8, seed=0)
    assert len(wrapped) == 7 * 2
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "model.layers.1.mlp.down_proj.base_layer.weight" in names
    assert "lm_head.weight" in names and not any("lm_head.lora" in n for n in names)
    assert torch.equal(model(tokens), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set() or all("lora_" in n for n in trainable)
    assert len(trainable_parameters(model)) == 28
    a = model.model.layers[0].self_attn.q_proj.lora_A.weight
    assert a.shape == (4, 64) and float(a.detach().abs().max()) <= 1 / math.sqrt(64)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_base_plus_scaled_low_rank(rslora):
    base = torch.nn.Linear(16, 12, bias=False)
    lora = LoRALinear(base, r=4, alpha=8, rslora=rslora)
    torch.nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(5, 16)
    scale = 8 / 2 if rslora else 8 / 4
    expected = x @ base.weight.t() + (x @ lora.lora_A.weight.t() @ lora.lora_B.weight.t()) * scale
    assert torch.allclose(lora(x), expected, atol=1e-5)
    assert torch.allclose(lora.delta_weight(), lora.lora_B.weight @ lora.lora_A.weight * scale)


def test_bad_rank_and_unknown_targets():
    with pytest.raises(DevstralError, match="--lora-r must be a positive integer, got 0"):
        inject_lora(_model(), ["q_proj"], r=0, alpha=16)
    with pytest.raises(DevstralError, match="no linear layers"):
        inject_lora(_model(), ["nonexistent"], r=4, alpha=16)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = _model()
    inject_lora(model, ["q_proj"], r=4, alpha=4, dropout=0.5, seed=0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight)
    tokens = torch.randint(0, 128, (1, 6))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
