"""Padding-free packing: each packed document attends only to itself and its positions restart.

Oracles: running every document alone (its own forward pass, plain causal attention), and a
block-diagonal boolean mask through SDPA. Loss and LoRA gradients of a packed batch must equal the
sums over the documents run separately.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from devstral.config import ModelConfig
from devstral.kernels.varlen_attention import Documents, varlen_attention, varlen_attention_ref
from devstral.model.lora import inject_lora, parse_targets, trainable_parameters
from devstral.model.transformer import Transformer
from devstral.train.batching import BatchPlan, collate
from devstral.train.data import IGNORE, Example
from devstral.train.loss import summed_loss


def _masked_reference(q, k, v, lengths, window):
    """Block-diagonal causal (windowed) mask over the flattened rows, one SDPA call."""
    B, T = q.shape[:2]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed &= (pos[:, None] - pos[None, :]) < window
    qf, kf, vf = (t.reshape(1, B * T, *t.shape[2:]).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=allowed, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape)


@pytest.mark.parametrize("window", [None, 3])
def test_varlen_attention_equals_a_block_diagonal_mask(window):
    g = torch.Generator().manual_seed(0)
    B, T, H, Hkv, D = 2, 13, 4, 2, 8
    q, k, v = (torch.randn(B, T, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    lengths = (5, 1, 7, 9, 4)  # row 0: 5 + 1 + 7, row 1: 9 + 4
    docs = Documents(lengths)
    docs.check(B, T)
    want = _masked_reference(q, k, v, lengths, window)
    torch.testing.assert_close(varlen_attention_ref(q, k, v, docs, window), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(varlen_attention(q, k, v, docs, window), want, rtol=1e-12, atol=1e-12)
    one = Documents((T, T))  # one document per row: plain causal attention
    torch.testing.assert_close(varlen_attention_ref(q, k, v, one, window), _masked_reference(q, k, v, (T, T), window),
                               rtol=1e-12, atol=1e-12)


def test_documents_must_tile_the_rows():
    with pytest.raises(ValueError, match="do not tile"):
        Documents((3, 4)).check(1, 8)


def _model():
    cfg = ModelConfig(arch="mistral", dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, hidden_dim=80,
                      vocab_size=97, rope_theta=1e4, max_position_embeddings=256, norm_eps=1e-5)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    inject_lora(model, parse_targets("all-linear"), 4, 8, seed=0, dtype=torch.float64)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    params = trainable_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return model, params


def _examples(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 97, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 3) + ids[n // 3:]  # a prompt part that is not learned
        out.append(Example(ids=ids, labels=labels, line=len(out) + 1))
    return out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_loss_and_grads_equal_the_documents_run_separately(checkpointing):
    model, params = _model()
    model.gradient_checkpointing = checkpointing
    model.train()
    examples = _examples([9, 4, 12, 7, 5])
    plan = BatchPlan(batch_size=2, max_seq_len=20, packing=True)
    rows = [[0, 1, 2], [3, 4]]  # 25 tokens max: row 0 is 25 wide, row 1 padded with 13
    batch = collate(examples, rows, plan)
    assert batch.documents.lengths == (9, 4, 12, 7, 5, 13)
    assert batch.positions[0, 9].item() == 0 and batch.positions[0, 13].item() == 0  # positions restart
    loss, n = summed_loss(model, batch)
    loss.backward()
    packed_grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    total, count = 0.0, 0
    for i in range(len(examples)):
        alone = collate(examples, [[i]], BatchPlan(batch_size=1, max_seq_len=20))
        part, m = summed_loss(model, alone)
        part.backward()
        total, count = total + float(part), count + m
    assert n == count
    assert abs(float(loss) - total) <= 1e-6 * total  # the fused head sums the loss in float32
    for got, p in zip(packed_grads, params, strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 1000])
def test_gpu_flash_varlen_matches_the_per_document_loop(window):
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = (700, 1, 1300, 47, 2000, 48)  # row 0: 700 + 1 + 1300 + 47 = 2048, row 1: 2000 + 48
    q = torch.randn(2, 2048, 32, 128, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2048, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2048, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    docs = Documents(lengths)
    up = torch.randn(2, 2048, 32, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    out = varlen_attention(q, k, v, docs, window)
    grads = torch.autograd.grad(out, (q, k, v), up)
    ref = varlen_attention_ref(q, k, v, docs, window)
    ref_grads = torch.autograd.grad(ref, (q, k, v), up)
    from devstral.kernels import varlen_attention as va

    if va._flash_varlen() is not None:  # this torch has the varlen entry: it must have run, not fallen back
        assert not va._flash_failed, va._flash_failed
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, ref_grads, strict=True):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
