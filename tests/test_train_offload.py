"""--offload-activations: the checkpointed layer inputs live in (pinned) CPU memory between forward and
backward. Oracle: the same model and batch trained without offloading (loss and every LoRA gradient
bit for bit), and the stored copies really being what backward uses."""

from __future__ import annotations

import pytest
import torch

from devstral.config import ModelConfig
from devstral.kernels.varlen_attention import Documents
from devstral.model.lora import inject_lora, parse_targets, trainable_parameters
from devstral.model.transformer import Transformer
from devstral.train.batching import Batch
from devstral.train.config import TrainConfig
from devstral.train.loss import summed_loss
from devstral.train.offload import ActivationOffload

CFG = ModelConfig(arch="mistral", dim=40, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=10, hidden_dim=72,
                  vocab_size=89, rope_theta=1e4, max_position_embeddings=256, norm_eps=1e-5)


def _setup(device="cpu", dtype=torch.float64, cfg=CFG):
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
    inject_lora(model, parse_targets("all-linear"), 4, 8, seed=0, dtype=torch.float32 if device == "cuda" else dtype)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    params = trainable_parameters(model)
    for p in params:
        p.requires_grad_(True)
    model.gradient_checkpointing = True
    model.train()
    return model, params


def _batch(seq, device="cpu", vocab=89):
    tokens = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(3)).to(device)
    return Batch(tokens, tokens.clone(), torch.arange(seq, device=device).expand(2, seq), None, Documents((seq, seq)))


def _step(model, params, batch):
    loss, n = summed_loss(model, batch)
    (loss / n).backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_same_loss_and_grads_as_without_offloading():
    model, params = _setup()
    batch = _batch(17)
    want_loss, want = _step(model, params, batch)
    model.activation_offload = ActivationOffload(torch.device("cpu"))
    for _ in range(2):  # the second step reuses the pooled buffers
        loss, got = _step(model, params, batch)
        assert torch.equal(loss, want_loss)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    assert model.activation_offload.offloaded == 2 * CFG.n_layers  # one input per checkpointed layer


def test_backward_uses_the_stored_copies():
    """Zero the stored copy of layer 1's input after forward: the gradients must change (they come from the
    store, not from a tensor still held on the device)."""
    model, params = _setup()
    batch = _batch(11)
    offload = model.activation_offload = ActivationOffload(torch.device("cpu"))
    _, want = _step(model, params, batch)
    loss, _ = summed_loss(model, batch)
    assert len(offload.saved) == CFG.n_layers
    for slab in offload.saved[1].slabs:
        slab.zero_()
    loss.backward()
    changed = [not torch.equal(p.grad, w) for p, w in zip(params, want, strict=True)]
    assert any(changed)


def test_not_active_without_grad_or_outside_training():
    model, params = _setup()
    offload = model.activation_offload = ActivationOffload(torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        summed_loss(model, _batch(9))
    assert offload.offloaded == 0


def test_flag_implies_checkpointing():
    cfg = TrainConfig(model="m", data="d", output="o", offload_activations=True)
    cfg.validate()
    assert cfg.grad_checkpointing


@pytest.mark.gpu
def test_gpu_offload_same_grads_and_less_memory():
    cfg = ModelConfig(arch="mistral", dim=2048, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=128, hidden_dim=4096,
                      vocab_size=4096, rope_theta=1e6, max_position_embeddings=32768, norm_eps=1e-5)
    model, params = _setup("cuda", torch.bfloat16, cfg)
    from devstral.model.rope import Rotary

    model.rotary = Rotary(cfg).cuda()
    batch = _batch(8192, "cuda", vocab=4096)

    def measured():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = _step(model, params, batch)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    def rel(xs, ys):
        return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(xs, ys, strict=True))

    (want_loss, want), plain_peak = measured()
    (_, again), _ = measured()
    # flash attention's backward accumulates with atomics, so two plain steps already differ (on the H200 a
    # bound of 1e-3 failed at 7e-3 in bf16): that run-to-run spread is the scale offloading must stay within
    noise = rel(again, want)
    model.activation_offload = ActivationOffload(torch.device("cuda"))
    measured()  # pins the pool
    (loss, got), offload_peak = measured()
    assert torch.equal(loss, want_loss)  # the forward is deterministic
    assert rel(got, want) <= 3 * noise + 1e-4, (rel(got, want), noise)
    layer_input = 2 * 8192 * cfg.dim * 2  # bytes of one [B, T, dim] bf16 layer input
    assert offload_peak <= plain_peak - (cfg.n_layers - 3) * layer_input


def test_finetune_cli_with_offloading_gives_the_same_loss_curve(tiny_hf, tmp_path):
    import json

    from devstral.cli import main

    rows = [{"prompt": f"Question {i}?", "completion": "answer " * (i + 2)} for i in range(5)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["finetune", "--model", str(tiny_hf), "--data", str(data), "--max-steps", "3", "--lr", "5e-3",
              "--packing", "--max-seq-len", "64", "--batch-size", "2", "--no-progress", "--seed", "3"]
    curves = []
    for flag, out in (("--grad-checkpointing", "plain"), ("--offload-activations", "offload")):
        assert main([*common, flag, "--output", str(tmp_path / out)]) == 0
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        curves.append([json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)])
    assert len(curves[0]) == 3 and curves[0] == curves[1]
    saved = json.loads((tmp_path / "offload" / "finetune_config.json").read_text())
    assert saved["offload_activations"] and saved["grad_checkpointing"]
