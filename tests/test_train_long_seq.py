"""Long sequences (issue 16): the MLP trained in token tiles and the offload's host budget.

Oracles: the untiled model (same weights, same batch: loss and every gradient), autograd's saved tensors
(what a block keeps for backward must not grow with the MLP's width once tiled), and the offload's placement
rule checked against the placement it really makes."""

from __future__ import annotations

import pytest
import torch

from devstral.config import ModelConfig
from devstral.errors import DevstralError
from devstral.kernels.varlen_attention import Documents
from devstral.model import tiled_mlp
from devstral.model.lora import inject_lora, parse_targets, trainable_parameters
from devstral.model.transformer import MLP, Transformer
from devstral.train.batching import Batch
from devstral.train.config import MLP_TILE, TrainConfig
from devstral.train.loss import summed_loss
from devstral.train.offload import (
    ActivationOffload,
    _cgroup_room,
    _meminfo_available,
    host_budget,
    longest_sequence,
    plan_offload,
)


def _cfg(hidden=72, layers=3):
    return ModelConfig(arch="mistral", dim=40, n_layers=layers, n_heads=4, n_kv_heads=2, head_dim=10,
                       hidden_dim=hidden, vocab_size=89, rope_theta=1e4, max_position_embeddings=256, norm_eps=1e-5)


def _setup(cfg=None, dtype=torch.float32, device="cpu", lora_dtype=None):
    cfg = cfg or _cfg()
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
    inject_lora(model, parse_targets("all-linear"), 4, 8, seed=0, dtype=lora_dtype or dtype)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    params = trainable_parameters(model)
    for p in params:
        p.requires_grad_(True)
    model.train()
    return model, params


def _batch(seq, rows=2, device="cpu", vocab=89):
    tokens = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(3)).to(device)
    return Batch(tokens, tokens.clone(), torch.arange(seq, device=device).expand(rows, seq), None,
                 Documents((seq,) * rows))


def _step(model, params, batch):
    loss, n = summed_loss(model, batch)
    (loss / n).backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _close(got, want, rtol=1e-5, atol=1e-7):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("tile", [5, 16])
def test_tiled_mlp_same_loss_and_grads_as_untiled(checkpointing, tile):
    model, params = _setup()
    model.gradient_checkpointing = checkpointing
    batch = _batch(17)  # 34 token rows: tiles of 5 (the last one 4) or 16 (the last one 2)
    want_loss, want = _step(model, params, batch)
    model.tile_mlp(tile)
    loss, got = _step(model, params, batch)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    _close(got, want)


def test_tiled_mlp_with_offload_and_a_partial_host_budget():
    model, params = _setup(dtype=torch.float64)
    model.gradient_checkpointing = True
    batch = _batch(13)
    want_loss, want = _step(model, params, batch)
    model.tile_mlp(7)
    layer_bytes = 2 * 13 * 40 * 8
    # slabs of 1 KiB: each layer input is 9 slabs; a budget of 20 slabs takes the first two layers
    offload = model.activation_offload = ActivationOffload(torch.device("cpu"), host_budget_bytes=20 << 10,
                                                           slab_bytes=1 << 10)
    for _ in range(2):  # the second step reuses the slabs
        loss, got = _step(model, params, batch)
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
        _close(got, want, rtol=1e-10, atol=1e-13)
    assert plan_offload([layer_bytes] * 3, 20 << 10, 1 << 10) == [True, True, False]
    assert (offload.offloaded, offload.kept) == (4, 2)  # two layers out and one kept, per step
    assert offload.host_bytes == 18 << 10  # the slabs were reused, never grown past the budget


def test_tiled_grads_match_with_bf16_lora_weights_and_fp32_masters():
    """--lora-dtype bf16: the per-tile partial sums are fp32 and rounded once, the masters get fp32 grads."""
    from devstral.train.master_weights import MasterWeights

    grads = []
    for tile in (None, 6):
        model, params = _setup(lora_dtype=torch.float32)
        masters = MasterWeights(params, torch.bfloat16)
        model.gradient_checkpointing = True
        model.tile_mlp(tile)
        loss, n = summed_loss(model, _batch(15))
        (loss / n).backward()
        grads.append([m.grad.clone() for m in masters.masters])
    for a, b in zip(*grads, strict=True):  # both are sums of bf16 products: within bf16 rounding of each other
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-4)


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct tensors autograd keeps for backward over one block (no checkpointing)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    block = model.model.layers[0]
    x = model.model.embed_tokens(batch.tokens).requires_grad_(True)
    cos, sin = model.rotary(batch.positions, x.dtype)
    q_scale = model.rotary.query_scale(batch.positions)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin, q_scale, batch.documents, None)
    return sum(seen.values())


def test_tiled_block_keeps_nothing_as_wide_as_the_mlp():
    """What a block saves for backward grows with hidden_dim untiled, and does not tiled."""
    batch = _batch(32, rows=1)
    saved = {}
    for hidden in (64, 640):
        for tile in (None, 8):
            model, _ = _setup(_cfg(hidden, layers=1))
            model.tile_mlp(tile)
            saved[hidden, tile] = _saved_bytes(model, batch)
    assert saved[640, None] - saved[64, None] >= 3 * 32 * (640 - 64) * 4  # gate, up and their product
    assert saved[640, 8] == saved[64, 8]
    assert saved[64, 8] < saved[64, None]


def test_checkpoint_rerun_skips_the_mlp_matmuls(monkeypatch):
    """Under checkpointing the tiles run once in forward and once in backward, never a third time."""
    calls = []
    original = MLP._swiglu

    def counted(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(MLP, "_swiglu", counted)
    model, params = _setup(_cfg(layers=2))
    model.gradient_checkpointing = True
    model.tile_mlp(10)
    _step(model, params, _batch(12))  # 24 rows: tiles of 10, 10, 4
    assert calls == [10, 10, 4] * 2 + [10, 10, 4] * 2  # forward (2 layers), then backward (2 layers)
    assert not tiled_mlp.is_recomputing()


@pytest.mark.parametrize("group", [2, 3])
def test_layers_per_checkpoint_same_loss_and_grads(group):
    """Two or three layers per checkpoint (3 layers: segments of 2 + 1, or one of 3), offloaded, tiled."""
    model, params = _setup(dtype=torch.float64)
    model.gradient_checkpointing = True
    batch = _batch(11)
    want_loss, want = _step(model, params, batch)
    model.checkpoint_layers = group
    model.tile_mlp(6)
    offload = model.activation_offload = ActivationOffload(torch.device("cpu"))
    loss, got = _step(model, params, batch)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    _close(got, want, rtol=1e-10, atol=1e-13)
    assert offload.offloaded == -(-3 // group)  # one input per checkpointed segment


def test_mlp_with_dropout_is_not_tiled():
    cfg = _cfg()
    torch.manual_seed(0)
    model = Transformer(cfg)
    inject_lora(model, parse_targets("all-linear"), 4, 8, seed=0, dropout=0.1)
    model.train()
    model.tile_mlp(4)
    mlp = model.model.layers[0].mlp
    assert not mlp._tileable()
    model.eval()
    assert mlp._tileable()


def test_placement_plan_and_budget():
    assert plan_offload([100, 100, 100, 100], 250, 50) == [True, True, False, False]
    assert plan_offload([100, 30, 100], 150, 10) == [True, True, False]  # a smaller one still fits after
    assert plan_offload([100], 0, 64) == [False]
    gib = 2**30
    assert host_budget(100 * gib) == 90 * gib  # a tenth kept back
    assert host_budget(10 * gib) == 8 * gib  # ... at least 2 GiB
    assert host_budget(gib) == 0
    assert host_budget(None) >= 2**60  # unknown: no limit
    assert _meminfo_available("MemTotal: 100 kB\nMemAvailable:    2048 kB\n") == 2048 * 1024
    assert _meminfo_available("MemTotal: 100 kB\n") is None
    assert _cgroup_room("max\n", "123\n") is None
    assert _cgroup_room("1000\n", "400\n") == 600


def test_longest_sequence_split_between_gpu_and_host():
    mib = 2**20
    # the host takes all 4 checkpoints of 1 MiB per 1k tokens: the GPU's 100 MiB working set binds
    got = longest_sequence(gpu_free=110 * mib, host_budget=1 << 40, fixed=10 * mib, per_token=mib / 1000,
                           checkpoints=4, checkpoint_per_token=1024, slab_bytes=mib)
    assert (got["gpu_checkpoints"], got["binding"]) == (0, "gpu") and got["tokens"] == 100_000
    # a host of 40 MiB: all 4 on it fit 10240 tokens (host binds); 1 on the GPU 13312 (3 x 13 slabs); 2 on it
    # 20480; 3 on it 25447, where the GPU's 100 MiB bind (1048.576 + 3 x 1024 bytes a token); 4 on it 20382
    got = longest_sequence(gpu_free=110 * mib, host_budget=40 * mib, fixed=10 * mib, per_token=mib / 1000,
                           checkpoints=4, checkpoint_per_token=1024, slab_bytes=mib)
    assert (got["gpu_checkpoints"], got["binding"], got["tokens"]) == (3, "gpu+host", 25447)
    # a GPU with no room for any checkpoint (11000 bytes at 1 a token): all on the host, which binds at 10240
    got_host = longest_sequence(gpu_free=11000, host_budget=40 * mib, fixed=0, per_token=1, checkpoints=4,
                                checkpoint_per_token=1024, slab_bytes=mib)
    assert (got_host["gpu_checkpoints"], got_host["binding"], got_host["tokens"]) == (0, "host", 10240)
    assert got["host_bytes"] <= 40 * mib and got["gpu_bytes"] <= 110 * mib
    # brute force over every token count: no longer sequence fits any split
    t = got["tokens"] + 1
    for k in range(5):
        gpu = 10 * mib + t * mib / 1000 + k * 1024 * t
        host = (4 - k) * -(-1024 * t // mib) * mib
        assert gpu > 110 * mib or host > 40 * mib


def test_train_config_tile_defaults_and_bad_values():
    cfg = TrainConfig(model="m", data="d", output="o")
    cfg.validate()
    assert cfg.mlp_tile_tokens() == 0  # no checkpointing: a tile's forward would cost a second run
    cfg = TrainConfig(model="m", data="d", output="o", offload_activations=True)
    cfg.validate()
    assert cfg.mlp_tile_tokens() == MLP_TILE
    for bad in (dict(mlp_tile=-1), dict(offload_host_gib=-2.0), dict(offload_host_gib=float("nan")),
                dict(checkpoint_layers=0)):
        with pytest.raises(DevstralError, match="--mlp-tile|--offload-host-gib|--checkpoint-layers"):
            TrainConfig(model="m", data="d", output="o", **bad).validate()


@pytest.mark.gpu
def test_gpu_tiled_mlp_bf16_same_grads_and_less_memory():
    """CUDA, bf16 weights under autocast, Liger/our kernels as the trainer uses them: tiled against untiled.
    Bound: flash attention's backward is not deterministic, so the untiled run against itself sets the noise
    scale; the tiled run must stay within 3x that plus 2e-3 relative (bf16 rounding of per-tile sums)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    cfg = ModelConfig(arch="mistral", dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=8192,
                      vocab_size=4096, rope_theta=1e6, max_position_embeddings=65536, norm_eps=1e-5)
    from devstral.model.rope import Rotary

    model, params = _setup(cfg, torch.bfloat16, "cuda", lora_dtype=torch.float32)
    model.rotary = Rotary(cfg).cuda()
    model.gradient_checkpointing = True
    batch = _batch(16384, rows=1, device="cuda", vocab=4096)

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
    noise = rel(again, want)
    model.tile_mlp(2048)
    (loss, got), tiled_peak = measured()
    torch.testing.assert_close(loss, want_loss, rtol=1e-3, atol=0)
    assert rel(got, want) <= 3 * noise + 2e-3, (rel(got, want), noise)
    # untiled, backward holds gate, up, their product and gradients of all 16384 tokens: >= 4 x 16 KB per token
    assert tiled_peak <= plain_peak - 3 * 16384 * cfg.hidden_dim * 2, (tiled_peak, plain_peak)


@pytest.mark.gpu
def test_gpu_offload_in_small_slabs_with_a_partial_host_budget():
    """CUDA: layer inputs split over several pinned slabs, the host budget taking 3 of 6, tiled MLP, two
    layers per checkpoint for the last case: loss bit for bit, gradients within the run-to-run noise of flash
    attention's backward (measured as in test_train_offload.py)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    cfg = ModelConfig(arch="mistral", dim=512, n_layers=6, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=2048,
                      vocab_size=4096, rope_theta=1e6, max_position_embeddings=65536, norm_eps=1e-5)
    from devstral.model.rope import Rotary

    model, params = _setup(cfg, torch.bfloat16, "cuda", lora_dtype=torch.float32)
    model.rotary = Rotary(cfg).cuda()
    model.gradient_checkpointing = True
    model.tile_mlp(1024)
    batch = _batch(4000, rows=2, device="cuda", vocab=4096)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _step(model, params, batch)

    def rel(xs, ys):
        return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(xs, ys, strict=True))

    want_loss, want = step()
    noise = rel(step()[1], want)
    layer_bytes = 2 * 4000 * cfg.dim * 2  # 8 MB: 8 slabs of 1 MiB (the last one partial)
    slabs = -(-layer_bytes // (1 << 20))
    offload = model.activation_offload = ActivationOffload(torch.device("cuda"), host_budget_bytes=3 * slabs << 20,
                                                           slab_bytes=1 << 20)
    for _ in range(2):  # the second step reuses the pinned slabs
        loss, got = step()
        assert torch.equal(loss, want_loss)
        assert rel(got, want) <= 3 * noise + 1e-4, (rel(got, want), noise)
    assert (offload.offloaded, offload.kept) == (6, 6) and offload.host_bytes == 3 * slabs << 20
    model.checkpoint_layers = 2
    loss, got = step()
    assert torch.equal(loss, want_loss)
    assert rel(got, want) <= 3 * noise + 1e-4, (rel(got, want), noise)


class _Stop(Exception):
    pass


def test_finetune_tiled_resumes_exactly_and_follows_the_untiled_curve(tiny_hf, tmp_path, monkeypatch):
    """Through the CLI: --mlp-tile 8 with offloaded checkpoints two layers at a time. A run stopped right after
    its step-2 checkpoint and resumed gives the uninterrupted run's losses exactly; the untiled run's curve
    is the same within fp32 rounding."""
    import json

    import devstral.train.checkpoint as ckpt
    from devstral.cli import main

    rows = [{"prompt": f"Question {i}?", "completion": "answer " * (i + 3)} for i in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["finetune", "--model", str(tiny_hf), "--data", str(data), "--max-steps", "4", "--lr", "5e-3",
              "--packing", "--max-seq-len", "48", "--batch-size", "2", "--no-progress", "--seed", "5",
              "--offload-activations", "--checkpoint-layers", "2", "--save-every", "2"]

    def losses(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]

    import devstral.model.transformer as transformer

    tiled = []
    real_tiled_rows = transformer.tiled_rows
    monkeypatch.setattr(transformer, "tiled_rows", lambda *a: tiled.append(a[2]) or real_tiled_rows(*a))
    assert main([*common, "--mlp-tile", "8", "--output", str(tmp_path / "straight")]) == 0
    assert tiled and set(tiled) == {8}  # the trainer did run the MLP in tiles
    monkeypatch.setattr(transformer, "tiled_rows", real_tiled_rows)
    assert main([*common, "--mlp-tile", "0", "--output", str(tmp_path / "untiled")]) == 0
    original = ckpt.save_checkpoint

    def save_then_stop(out, state):
        original(out, state)
        raise _Stop

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_stop)
    with pytest.raises(_Stop):
        main([*common, "--mlp-tile", "8", "--output", str(tmp_path / "stopped")])
    monkeypatch.setattr(ckpt, "save_checkpoint", original)
    assert main([*common, "--mlp-tile", "8", "--output", str(tmp_path / "stopped"), "--resume"]) == 0
    straight = losses(tmp_path / "straight")
    assert len(straight) == 4 and losses(tmp_path / "stopped") == straight
    assert straight == pytest.approx(losses(tmp_path / "untiled"), rel=1e-5)


def test_oom_message_names_the_long_sequence_knobs():
    from devstral.train.trainer import _oom_message

    cfg = TrainConfig(model="m", data="d", output="o", offload_activations=True, offload_host_gib=20.0)
    cfg.validate()
    msg = _oom_message(cfg, step=0)
    assert "--checkpoint-layers 2" in msg and "a smaller --mlp-tile (now 4096)" in msg
    assert "a larger --offload-host-gib (now 20)" in msg
    cfg = TrainConfig(model="m", data="d", output="o", grad_checkpointing=True, mlp_tile=0)
    cfg.validate()
    assert "--mlp-tile 4096" in _oom_message(cfg, step=0)


def test_long_inputs_leave_liger_for_the_fixed_chunk_head(monkeypatch):
    """Liger's logits chunk grows with the rows (next_pow2(rows / ceil(V / D)) x V); past the cap ours runs,
    whose chunk is fixed. Oracle for the loss: F.cross_entropy on the full logits."""
    import devstral.kernels.liger as liger
    from devstral.kernels import fused_linear_ce as fce

    assert fce.liger_chunk_bytes(8192, 5120, 131072, 2) == fce.LIGER_MAX_CHUNK_BYTES  # 512 rows
    assert fce.liger_chunk_bytes(16384, 5120, 131072, 2) == 2 * fce.LIGER_MAX_CHUNK_BYTES
    assert fce.liger_chunk_bytes(2048, 5120, 131072, 2) == 128 * 131072 * 2  # 79 rows -> 128
    calls = []
    monkeypatch.setattr(fce, "use_liger", lambda op, t: True)
    monkeypatch.setattr(liger, "liger_linear_cross_entropy", lambda h, w, t, i: calls.append(h.shape[0]) or
                        torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum", ignore_index=i))
    h, w = torch.randn(600, 8, dtype=torch.float64), torch.randn(64, 8, dtype=torch.float64)
    t = torch.randint(0, 64, (600,))
    want = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")
    assert fce.liger_chunk_bytes(600, 8, 64, 8) == 128 * 64 * 8  # 75 rows -> 128
    monkeypatch.setattr(fce, "LIGER_MAX_CHUNK_BYTES", 128 * 64 * 8)
    torch.testing.assert_close(fce.linear_cross_entropy(h, w, t), want)
    assert calls == [600]
    monkeypatch.setattr(fce, "LIGER_MAX_CHUNK_BYTES", 64 * 64 * 8)
    torch.testing.assert_close(fce.linear_cross_entropy(h, w, t).double(), want, rtol=1e-6, atol=0)  # fp32 sum
    assert calls == [600]  # ours this time
