"""The LoRA / QLoRA (or, with `full`, full-parameter) training loop on our one Transformer.

Order of work: check flags and data (every user error surfaces before the model is loaded), load the
base (NF4 for QLoRA), wrap the targeted linears with LoRA, then AdamW steps over a deterministic stream
of micro-batches. Checkpoints carry the LoRA weights, the optimizer, the position in the stream and the
RNG states, so `--resume` continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from devstral.errors import DevstralError
from devstral.train.batching import Batch, BatchPlan, collate, epoch_order, micro_batches
from devstral.train.config import TrainConfig
from devstral.train.data import DataStats, Example, load_examples


@dataclass
class TrainResult:
    output: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    stats: DataStats | None = None


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def micro_batch_stream(examples: list[Example], plan: BatchPlan, seed: int,
                       skip: int = 0) -> Iterator[list[list[int]]]:
    """Micro-batches forever, epoch after epoch, each epoch in its own seeded order; skips the first `skip`."""
    epoch, seen = 0, 0
    while True:
        for rows in micro_batches(examples, plan, epoch_order(len(examples), seed, epoch)):
            if seen >= skip:
                yield rows
            seen += 1
        epoch += 1


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def evaluate(model, examples: list[Example], plan: BatchPlan, device: torch.device, images=None) -> float:
    """Mean loss per learned token; `images` (train/images.TrainingImages) embeds the examples' images."""
    from devstral.train.loss import summed_loss

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for rows in micro_batches(examples, plan, list(range(len(examples)))):
            batch = collate(examples, rows, plan).to(device)
            with _autocast(device):
                loss, n = summed_loss(model, batch, inject=images.inject(batch) if images is not None else None)
            total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def _oom_message(cfg: TrainConfig, step: int) -> str:
    hints = []
    if not cfg.qlora and not cfg.full:
        hints.append("--qlora (4-bit base weights)")
    hints.append(f"a smaller --max-seq-len (now {cfg.max_seq_len})")
    if not cfg.grad_checkpointing:
        hints.append("--grad-checkpointing")
    if not cfg.offload_activations:
        hints.append("--offload-activations (layer inputs in CPU memory)")
    elif cfg.offload_host_gib is not None:
        hints.append(f"a larger --offload-host-gib (now {cfg.offload_host_gib:g})")
    if cfg.grad_checkpointing and cfg.checkpoint_layers == 1:
        hints.append("--checkpoint-layers 2 (half the layer inputs kept)")
    tile = cfg.mlp_tile_tokens()
    if tile == 0:
        hints.append("--mlp-tile 4096 (the MLP trained in tiles of tokens)")
    elif tile > 1024:
        hints.append(f"a smaller --mlp-tile (now {tile})")
    if cfg.batch_tokens:
        hints.append(f"a smaller --batch-tokens (now {cfg.batch_tokens})")
    elif cfg.batch_size > 1:
        hints.append(f"a smaller --batch-size (now {cfg.batch_size}) with a larger --grad-accum")
    return f"CUDA out of memory at step {step + 1}; try " + ", ".join(hints)


class _NoMetrics:
    """The metrics log of an FSDP rank other than 0 (only rank 0 writes)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def records(self) -> list[dict[str, Any]]:
        return []


class Progress:
    """A rich progress bar (loss, lr, tok/s, peak GPU memory, ETA) on stderr, or nothing (`quiet`: not even
    lines)."""

    def __init__(self, enabled: bool, total: int | None, start: int, *, quiet: bool = False):
        self.bar, self.quiet = None, quiet
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[tps]} tok/s"), TextColumn("{task.fields[mem]}"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-",
                                      mem="")
            self.bar.start()

    def update(self, loss: float, lr: float, tps: float) -> None:
        if self.bar is not None:
            mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak" if torch.cuda.is_initialized() else ""
            self.bar.update(self.task, advance=1, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}", mem=mem)

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        elif not self.quiet:
            print(text, file=sys.stderr)

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def router_loss(model: torch.nn.Module) -> torch.Tensor:
    """The load-balancing loss over every MoE layer's routing of the last forward (0 for dense models)."""
    from devstral.model.moe import MoE, load_balancing_loss

    layers = [m for m in model.modules() if isinstance(m, MoE) and m.router_logits is not None]
    if not layers:
        return torch.zeros((), device=next(model.parameters()).device)
    return load_balancing_loss([m.router_logits for m in layers], len(layers[0].experts), layers[0].top_k)


def finetune(cfg: TrainConfig) -> TrainResult:
    from devstral.config import ModelConfig
    from devstral.devices import resolve_device
    from devstral.formats.bnb4bit import bnb_quantization
    from devstral.formats.peft import AdapterConfig, save_adapter, save_adapter_state
    from devstral.kernels import train_backends
    from devstral.loader import resolve_model
    from devstral.model.lora import inject_lora, lora_modules, parse_targets, trainable_parameters
    from devstral.parallel import fsdp
    from devstral.prompt.tokenizer import load_tokenizer
    from devstral.train.checkpoint import load_checkpoint, restore_rng, rng_state, save_checkpoint
    from devstral.train.full import full_parameters, load_weights, save_model_folder, weights_state
    from devstral.train.loss import summed_loss
    from devstral.train.metrics import MetricsLog, plot_loss
    from devstral.train.model_setup import load_base
    from devstral.train.schedule import lr_at
    from devstral.train.time_budget import UNBOUNDED, TimeBudget

    cfg.validate()
    train_backends.table()  # a bad DEVSTRAL_TRAIN_KERNELS is a user error before anything loads
    budget = TimeBudget(cfg.max_minutes) if cfg.max_minutes is not None else None
    group = fsdp.join(cfg)  # None in one process; FSDP2 over the group otherwise (parallel/fsdp.py)
    leader = group is None or group.is_leader
    if group is not None and cfg.grad_accum % group.world:
        raise DevstralError(f"--grad-accum ({cfg.grad_accum}) must be a multiple of the {group.world} processes")
    targets = parse_targets(cfg.target)
    model_path = resolve_model(cfg.model)
    if not model_path.is_dir():
        raise DevstralError(f"--model {model_path}: fine-tuning needs a safetensors model folder, not a GGUF file")
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise DevstralError(f"--output {out} exists and is not a folder")
    bnb = bnb_quantization(model_path)
    if bnb is not None and (cfg.full or cfg.merge or cfg.gguf):
        what = "--full" if cfg.full else "--merge" if cfg.merge else "--gguf"
        raise DevstralError(f"{what} needs the 16-bit base model; {model_path} is bitsandbytes 4-bit (the adapter "
                            "it trains applies to the 16-bit model: run it with --model <16-bit folder> --adapter)")
    mcfg = ModelConfig.from_dir(model_path)
    tokenizer = load_tokenizer(model_path)
    vision_config = _enable_images(model_path, mcfg, tokenizer)  # image parts in the data need it
    device = group.device if group is not None else resolve_device(cfg.device)

    examples, stats = load_examples(Path(cfg.data), tokenizer, max_seq_len=cfg.max_seq_len,
                                    train_on=cfg.chat_train_on, skip_invalid=cfg.skip_invalid,
                                    truncate=not cfg.drop_long)
    eval_examples: list[Example] = []
    if cfg.eval_data:
        eval_examples, _ = load_examples(Path(cfg.eval_data), tokenizer, max_seq_len=cfg.max_seq_len,
                                         train_on=cfg.chat_train_on, skip_invalid=cfg.skip_invalid,
                                         truncate=not cfg.drop_long)
    plan = BatchPlan(batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len, packing=cfg.packing,
                     batch_tokens=cfg.batch_tokens, pad_id=mcfg.pad_id if mcfg.pad_id is not None else 0)
    per_epoch = len(micro_batches(examples, plan, epoch_order(len(examples), cfg.seed, 0)))
    steps_per_epoch = max(1, math.ceil(per_epoch / cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil((cfg.epochs or 1.0) * steps_per_epoch))
    if cfg.max_minutes is not None and cfg.max_steps is None and cfg.epochs is None:
        total_steps = UNBOUNDED  # the time budget alone decides, after calibration
    fingerprint = _fingerprint(Path(cfg.data))

    state: dict[str, Any] | None = None
    if cfg.resume:
        state = load_checkpoint(out)
        if budget is not None and state.get("total_steps", UNBOUNDED) < UNBOUNDED:
            total_steps, budget = state["total_steps"], None  # the count the interrupted run fixed
        _check_resumable(state, cfg, fingerprint, total_steps)

    torch.manual_seed(cfg.seed)
    # Full training keeps fp32 master weights (bf16 autocast on CUDA); LoRA's frozen base can be bf16.
    dtype = torch.bfloat16 if device.type == "cuda" and not cfg.full else torch.float32
    model = load_base(model_path, mcfg, device=device, dtype=dtype, nf4_targets=targets if cfg.qlora else None,
                      double_quant=cfg.double_quant)
    images = None
    if any(ex.images for ex in (*examples, *eval_examples)):
        if group is not None:
            raise DevstralError("training data with images runs in one process (not with --nproc / torchrun)")
        from devstral.formats.vision_checkpoint import build_vision
        from devstral.train.images import TrainingImages

        # the tower is frozen; it computes in the base's dtype, as the decoder does
        images = TrainingImages(build_vision(model_path, mcfg, vision_config, dtype=dtype, device=device),
                                train_projector=cfg.train_projector)
    elif cfg.train_projector:
        raise DevstralError("--train-projector: no example has an image (the projector would learn nothing)")
    if cfg.full:
        params = full_parameters(model)
    else:
        inject_lora(model, targets, cfg.lora_r, cfg.lora_alpha, dropout=cfg.lora_dropout, rslora=cfg.rslora,
                    dtype=torch.float32, seed=cfg.seed)
        params = trainable_parameters(model)
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.tile_mlp(cfg.mlp_tile_tokens())
    model.checkpoint_layers = cfg.checkpoint_layers
    if cfg.offload_activations:
        from devstral.train.offload import ActivationOffload

        host = None if cfg.offload_host_gib is None else int(cfg.offload_host_gib * 2**30)
        model.activation_offload = ActivationOffload(device, host_budget_bytes=host)
    for p in params:
        p.requires_grad_(True)

    start_step, micro_done = 0, 0
    if state is not None and cfg.full:
        load_weights(model, state["weights"])
    elif state is not None:
        with torch.no_grad():
            for name, m in lora_modules(model).items():
                m.lora_A.weight.copy_(state["lora"][f"{name}.lora_A.weight"])
                m.lora_B.weight.copy_(state["lora"][f"{name}.lora_B.weight"])
    projector = images.parameters() if images is not None else []  # fp32, stepped as they are (no masters)
    if state is not None and projector:
        images.load_projector(state["projector"])
    n_trainable = sum(p.numel() for p in params) + sum(p.numel() for p in projector)
    masters = None
    if not cfg.full and _lora_dtype(cfg, device, group) != torch.float32:
        from devstral.train.master_weights import MasterWeights

        masters = MasterWeights(params, torch.bfloat16)  # after the resume's fp32 values: the masters are exact
    if group is not None:  # after the weights are final: parameters become this rank's shards (DTensors)
        fsdp.shard(model, group)
        params = trainable_parameters(model)
    updated = masters.masters if masters is not None else params  # what the optimizer steps and clips
    updated = [*updated, *projector]
    optimizer = torch.optim.AdamW(updated, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda" and group is None)
    if state is not None:
        if group is not None:
            fsdp.load_optimizer_state(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        start_step, micro_done = state["step"], state["micro_batches"]
        restore_rng(state["rng"])

    out.mkdir(parents=True, exist_ok=True)
    if leader:
        (out / "finetune_config.json").write_text(json.dumps(cfg.as_dict(), indent=2) + "\n", encoding="utf-8")
    metrics = (MetricsLog(out / "metrics.jsonl", resume_from_step=start_step if state is not None else None)
               if leader else _NoMetrics())
    progress = Progress(cfg.progress and leader, total_steps if total_steps < UNBOUNDED else None, start_step,
                        quiet=not leader)
    progress.print(f"data: {stats.summary()}")
    what = "full-parameter" if cfg.full else f"LoRA r={cfg.lora_r} on {', '.join(targets)}"
    progress.print(f"model: {mcfg.n_params / 1e6:,.1f}M parameters, {what}: "
                   f"{n_trainable / 1e6:,.2f}M trainable"
                   + (" (base in NF4)" if cfg.qlora or bnb is not None else "")
                   + ("; LoRA weights bf16, fp32 masters in the optimizer" if masters is not None else "")
                   + (f"; vision projector {sum(p.numel() for p in projector) / 1e6:,.2f}M" if projector else "")
                   + (f"; resuming at step {start_step}" if state is not None else ""))

    stream = micro_batch_stream(examples, plan, cfg.seed, skip=micro_done)
    result = TrainResult(output=out, steps=total_steps, stats=stats)
    model.train()
    step = start_step
    try:
        for step in range(start_step, UNBOUNDED):
            if step >= total_steps:  # a range would not see the count --max-minutes fixes
                break
            t0 = time.perf_counter()
            batches: list[Batch] = [collate(examples, next(stream), plan) for _ in range(cfg.grad_accum)]
            micro_done += len(batches)
            n_learned = sum(b.n_label_tokens for b in batches)
            lr = lr_at(step, base_lr=cfg.lr, warmup=cfg.warmup_steps, total=total_steps, schedule=cfg.schedule)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            loss_sum = 0.0
            # FSDP2: this rank's share of the step's micro-batches; gradients are averaged over the
            # ranks, so the loss is scaled back up to the step's sum
            mine = batches if group is None else batches[group.rank::group.world]
            scale = 1.0 if group is None else float(group.world)
            for batch in mine:
                batch = batch.to(device)
                with _autocast(device):
                    loss, _ = summed_loss(model, batch, inject=images.inject(batch) if images is not None else None)
                objective = loss * (scale / n_learned)
                if cfg.router_aux_loss > 0:
                    objective = objective + scale * cfg.router_aux_loss * router_loss(model) / len(batches)
                objective.backward()
                loss_sum += float(loss.detach())
            if group is not None:
                loss_sum = fsdp.all_sum(group, loss_sum)
                grad_norm = fsdp.grad_norm(params, cfg.max_grad_norm)
            elif cfg.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(updated, cfg.max_grad_norm))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in updated])))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if masters is not None:
                masters.push()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t0
            n_tokens = sum(b.n_tokens for b in batches)
            step_loss = loss_sum / n_learned
            if not math.isfinite(step_loss):
                raise DevstralError(f"loss became {step_loss} at step {step + 1}; try a lower --lr (now {cfg.lr})")
            result.losses.append(step_loss)
            metrics.write({"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens": n_tokens, "tokens_per_s": n_tokens / elapsed,
                           "epoch": micro_done / per_epoch})
            progress.update(step_loss, lr, n_tokens / elapsed)
            done = step + 1
            if budget is not None:
                budget.observe(elapsed)
                if budget.ready():
                    total_steps = budget.total_steps(done, total_steps)
                    result.steps = total_steps
                    progress.set_total(total_steps)
                    progress.print(f"--max-minutes {cfg.max_minutes:g}: {total_steps} steps "
                                   f"({budget.per_step:.3f} s each)")
            if eval_examples and cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
                ev = evaluate(model, eval_examples, plan, device, images)
                metrics.write({"step": done, "eval_loss": ev})
                progress.print(f"step {done}: eval loss {ev:.4f}")
            if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
                if group is not None:  # every rank takes part in gathering; rank 0 writes
                    lora, optim = fsdp.full_lora_state(model), fsdp.optimizer_state(model, optimizer)
                else:
                    lora = None if cfg.full else _checkpoint_lora(model, masters)
                    optim = optimizer.state_dict()
                if leader:
                    save_checkpoint(out, {
                        "step": done, "micro_batches": micro_done, "rng": rng_state(),
                        **({"weights": weights_state(model)} if cfg.full else {"lora": lora}),
                        **({"projector": images.projector_state()} if projector else {}),
                        "optimizer": optim, "config": cfg.as_dict(), "data_sha256": fingerprint,
                        "total_steps": total_steps})
    except torch.OutOfMemoryError:
        progress.close()
        raise DevstralError(_oom_message(cfg, step)) from None
    finally:
        progress.close()
    if masters is not None:
        masters.release()  # the model's LoRA weights are the fp32 masters again: eval and the adapter use them

    if eval_examples:
        result.eval_loss = evaluate(model, eval_examples, plan, device, images)
        metrics.write({"step": total_steps, "eval_loss": result.eval_loss})
        if leader:
            print(f"eval loss {result.eval_loss:.4f}", file=sys.stderr)
    wrapped = {name.rpartition(".")[2] for name in lora_modules(model)}  # what this model had of them
    adapter = AdapterConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=[t for t in targets if t in wrapped],
                            lora_dropout=cfg.lora_dropout, use_rslora=cfg.rslora, base_model_name_or_path=str(cfg.model))
    if group is not None:
        lora = fsdp.full_lora_state(model)  # the last collective: then the other ranks are done
        fsdp.leave(group)
        if not leader:
            return result
        save_adapter_state(lora, out, adapter)
    elif cfg.full:
        save_model_folder(model, model_path, out, projector=images.projector_state() if projector else None)
    else:
        save_adapter(model, out, adapter, projector=images.projector_state() if projector else None)
    plot_loss(metrics.records(), out / "loss.png")
    del model, optimizer
    if cfg.full:  # OUTPUT is already a whole model: nothing to merge
        if cfg.gguf:
            from devstral.train.export import export_gguf

            print(f"gguf: {export_gguf(out, out / f'model-{cfg.gguf}.gguf', cfg.gguf)}", file=sys.stderr)
    elif cfg.merge or cfg.gguf:
        from devstral.formats.peft import read_projector
        from devstral.train.export import export_gguf, write_merged

        merged = write_merged(model_path, out, out / "merged",
                              projector=read_projector(out) if cfg.train_projector else None)
        print(f"merged model: {merged}", file=sys.stderr)
        if cfg.gguf:
            gguf = export_gguf(merged, out / f"model-{cfg.gguf}.gguf", cfg.gguf)
            print(f"gguf: {gguf}", file=sys.stderr)
    return result


def _enable_images(model_path: Path, mcfg, tokenizer):
    """The model's VisionConfig when it has a vision tower (the tokenizer then encodes image parts as
    serving does), else None (an image in the data is then a one-line error naming its line)."""
    from devstral.formats.vision_checkpoint import has_vision_tensors, vision_config_of

    vc = vision_config_of(model_path, mcfg)
    if vc is None or not has_vision_tensors(model_path) or not hasattr(tokenizer, "enable_images"):
        return None
    tokenizer.enable_images(vc)
    return vc


def _lora_state(model) -> dict[str, torch.Tensor]:
    from devstral.model.lora import lora_state

    return lora_state(model)


def _lora_dtype(cfg: TrainConfig, device: torch.device, group) -> torch.dtype:
    """--lora-dtype: auto is bf16 (with fp32 masters) for LoRA / QLoRA on CUDA in one process, else fp32."""
    if group is not None:  # FSDP2 shards the fp32 LoRA weights themselves (torchrun gets here without --nproc)
        if cfg.lora_dtype == "bf16":
            raise DevstralError("--lora-dtype bf16 is for one process; under FSDP2 the LoRA weights stay fp32")
        return torch.float32
    if cfg.lora_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and not cfg.full else torch.float32
    return torch.bfloat16 if cfg.lora_dtype == "bf16" else torch.float32


def _checkpoint_lora(model, masters) -> dict[str, torch.Tensor]:
    """The LoRA weights for a checkpoint, in fp32: the optimizer's masters when the model's are bf16."""
    state = _lora_state(model)
    if masters is not None:  # trainable_parameters and lora_state share one order: each module's A, then B
        state = dict(zip(state, masters.masters, strict=True))
    return {k: v.detach().cpu().clone() for k, v in state.items()}


_MUST_MATCH = ("model", "data", "lora_r", "lora_alpha", "rslora", "target", "qlora", "seed", "batch_size",
               "grad_accum", "batch_tokens", "max_seq_len", "packing", "train_on", "lr", "schedule",
               "warmup_steps", "lora_dropout", "full", "train_projector")


def _check_resumable(state: dict[str, Any], cfg: TrainConfig, fingerprint: str, total_steps: int) -> None:
    saved = state.get("config", {})
    for key in _MUST_MATCH:
        # "full" and "train_projector" came later: older checkpoints have neither
        if saved.get(key, False if key in ("full", "train_projector") else None) != getattr(cfg, key):
            raise DevstralError(f"--resume: {key.replace('_', '-')} was {saved.get(key)!r} in the checkpointed run "
                                f"but is {getattr(cfg, key)!r} now")
    if state.get("data_sha256") != fingerprint:
        raise DevstralError(f"--resume: {cfg.data} changed since the checkpoint was written")
    if state.get("total_steps") != total_steps:
        raise DevstralError(f"--resume: the run had {state.get('total_steps')} steps, now {total_steps} "
                            "(keep --epochs/--max-steps the same)")
