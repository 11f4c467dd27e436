"""LoRA and QLoRA training: our trainer's step vs HF transformers + PEFT, same model, sequence and batch.

Workload (issue 16): LoRA r=16 on all linears of a decoder of Devstral-Small width (dim 5120, FFN 32768,
32/8 heads, 131k vocabulary) with random weights, one sequence per step, gradient checkpointing, AdamW,
bf16 autocast. By default 8 of its 40 layers, so that all four runs fit in the GPU time budget; the
per-layer figures carry to 40 layers (the JSON says how it was run and extrapolates the 40-layer peak).

Measured per run (median of the timed steps, each synchronised): tokens/s, and peak memory above the
memory held before the step (weights, LoRA, optimizer state): the activation memory the issue's
targets are about. Runs: ours LoRA, HF+PEFT LoRA, ours QLoRA (NF4 base), HF+PEFT QLoRA (bitsandbytes'
Linear4bit, when bitsandbytes has a CUDA build here). Physical limit: the matmul FLOP roofline at the
measured bf16 rate.

Longest sequence (issue 16's 8x target): ours with --offload-activations and the tiled MLP at two lengths
(--long-seq and twice it), with 1 and 2 layers per checkpoint, and HF+PEFT at half and all of --long-seq:
activation bytes = fixed + per-token x tokens through each pair. For the full 40 layers on this GPU
(memory the process can have, less the 40-layer weights and LoRA state, less SAFETY_GIB) and this host
(the offload's budget: available host memory less a tenth), `longest_sequence()` finds the length and the
split of layer inputs between host and GPU, and says which memory binds; HF+PEFT keeps every layer's
input on the GPU. Then one step of ours at that length (the 1 or 2 layers of one checkpoint, beside a
ballast for what the other layers hold) checks it, when its estimated time fits --budget-s.

    python benchmarks/finetune.py                       # GPU: JSON to $OUT/finetune.json or benchmarks/results/
    python benchmarks/finetune.py --layers 40 --skip-qlora-hf --skip-long
    python benchmarks/finetune.py --quick --out /tmp/f.json   # CPU smoke test, tiny shape
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SMALL = dict(dim=5120, n_layers=40, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=32768, vocab_size=131072)
QUICK = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=1024)
H200_BF16_TFLOPS = 790.0  # dense bf16 matmul rate measured on the H200 in this workplace (8192^3)
GIB = 2**30
SAFETY_GIB = 1.0  # GPU memory left unplanned in the longest-sequence figures (allocator slack), ours and PEFT's


def model_config(shape: dict, max_positions: int = 262144):
    from devstral.config import ModelConfig

    return ModelConfig(arch="mistral", rope_theta=1e9, max_position_embeddings=max_positions, norm_eps=1e-5, **shape)


def _reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # pinned host blocks freed by an offload go back to the OS, so that the next run's host budget sees them
        empty_host = getattr(torch._C, "_host_emptyCache", None) or getattr(torch._C, "_accelerator_emptyHostCache", None)
        if empty_host is not None:
            empty_host()


def _autocast(device: torch.device):
    from contextlib import nullcontext

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def timed(step, device: torch.device, warmup: int, steps: int) -> dict:
    """Median step time and the peak memory above what was held before the timed steps."""
    losses = [step() for _ in range(warmup)]
    _reset(device)
    held = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"step_s_median": statistics.median(times), "step_s_all": times, "losses": losses}
    if device.type == "cuda":
        out |= {"held_gib": held / GIB, "peak_gib": torch.cuda.max_memory_allocated() / GIB,
                "activation_peak_gib": (torch.cuda.max_memory_allocated() - held) / GIB}
    return out


def _build_ours(cfg, device, dtype, qlora: bool):
    from devstral.model.nf4 import NF4Linear
    from devstral.model.rope import Rotary
    from devstral.model.transformer import Transformer

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built straight in bf16
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(default)
    model.rotary = Rotary(cfg).to(device)
    if qlora:  # as the trainer does: each layer linear to NF4 with double quantization
        for block in model.model.layers:
            for parent in (block.self_attn, block.mlp):
                for name, m in list(parent.named_children()):
                    if isinstance(m, torch.nn.Linear):
                        setattr(parent, name, NF4Linear(m.weight.detach(), double_quant=True))
                        del m
        gc.collect()
    return model


def bench_ours(shape: dict, seq: int, r: int, device, dtype, warmup: int, steps: int, *, qlora=False,
               offload=False, lora_bf16=False, mlp_tile: int | None = None, checkpoint_layers: int = 1,
               hold_gib: float | None = None) -> dict:
    """One configuration of our trainer's step. `mlp_tile` and `checkpoint_layers` as --mlp-tile and
    --checkpoint-layers; `hold_gib`: a ballast makes the memory held before the step this much (the check
    that a predicted length fits beside what the full model would hold)."""
    from devstral.kernels.varlen_attention import Documents
    from devstral.model.lora import inject_lora, parse_targets, trainable_parameters
    from devstral.train.batching import Batch
    from devstral.train.loss import summed_loss

    cfg = model_config(shape, max(262144, seq))
    _reset(device)
    model = _build_ours(cfg, device, dtype, qlora)
    inject_lora(model, parse_targets("all-linear"), r=r, alpha=r, seed=0)
    model.gradient_checkpointing = True
    model.tile_mlp(mlp_tile)
    model.checkpoint_layers = checkpoint_layers
    if offload:
        from devstral.train.offload import ActivationOffload

        model.activation_offload = ActivationOffload(device)
    params = trainable_parameters(model)
    for p in params:
        p.requires_grad_(True)
    masters = None
    if lora_bf16:  # as the trainer does on CUDA (--lora-dtype auto): bf16 LoRA, fp32 masters in the optimizer
        from devstral.train.master_weights import MasterWeights

        masters = MasterWeights(params, torch.bfloat16)
    updated = masters.masters if masters is not None else params
    opt = torch.optim.AdamW(updated, lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(3, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1)).to(device)
    batch = Batch(tokens, tokens.clone(), torch.arange(seq, device=device)[None], None, Documents((seq,)))
    model.train()

    def step() -> float:
        with _autocast(device):
            loss, n = summed_loss(model, batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(updated, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if masters is not None:
            masters.push()
        return float(loss.detach()) / n

    ballast = None
    if hold_gib is not None and device.type == "cuda":  # (this slice's optimizer state, made in the step, is
        _reset(device)                                     # already in hold_gib: counted twice, on the safe side)
        extra = int(hold_gib * GIB) - torch.cuda.memory_allocated()
        ballast = torch.empty(max(0, extra), dtype=torch.uint8, device=device)
        warmup = 0
    out = timed(step, device, warmup, steps)
    del ballast
    out |= {"tokens_per_s": seq / out["step_s_median"], "trainable_params": sum(p.numel() for p in params),
            "layer_weight_gib": _module_gib(model.model.layers[0]) - _lora_gib(model.model.layers[0]),
            "mlp_tile": mlp_tile, "checkpoint_layers": checkpoint_layers}
    if model.activation_offload is not None:
        out |= {"offload_host_gib": model.activation_offload.host_bytes / GIB,
                "offloaded_inputs": model.activation_offload.offloaded, "kept_on_gpu": model.activation_offload.kept}
    return out


def _module_gib(m: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())) / GIB


def _lora_gib(m: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for n, p in m.named_parameters() if "lora_" in n) / GIB


def _hf_to_4bit(model) -> None:
    """Every decoder-layer nn.Linear to bitsandbytes' Linear4bit (NF4, double quantization, bf16 compute), as
    from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...)) would."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, m in list(parent.named_children()):
                if isinstance(m, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=True, quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True).to(m.weight.device)
                    setattr(parent, name, q)
    gc.collect()


def bench_hf(shape: dict, seq: int, r: int, device, dtype, warmup: int, steps: int, *, qlora=False) -> dict:
    import peft
    import transformers

    cfg = model_config(shape)
    hf_cfg = transformers.MistralConfig(**{k: v for k, v in cfg.to_hf().items()
                                           if k not in ("architectures", "model_type", "torch_dtype")})
    _reset(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.MistralForCausalLM._from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    if qlora:
        _hf_to_4bit(model)
    lcfg = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(3, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1)).to(device)
    model.train()

    def step() -> float:
        with _autocast(device):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    out = timed(step, device, warmup, steps)
    out |= {"tokens_per_s": seq / out["step_s_median"], "trainable_params": sum(p.numel() for p in params)}
    return out


def _guarded(fn, *args, **kwargs) -> dict:
    try:
        return fn(*args, **kwargs)
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}
    except ImportError as e:
        return {"error": f"not installed: {e}"}
    except (RuntimeError, AttributeError, TypeError) as e:  # e.g. a bitsandbytes build without CUDA kernels
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def flop_roofline(shape: dict, seq: int, device: torch.device) -> dict:
    """FLOPs per trained token with frozen base weights and checkpointing: forward (2N), recomputed
    forward (2N) and input gradients (2N), plus causal attention (3 passes of 2 x 2 x seq x dim / 2 per
    layer, as forward+recompute+2x backward ~ 4 forward-equivalents: counted as 3 + backward's 2)."""
    cfg = model_config(shape)
    matmul = 6 * cfg.n_params
    attention = (2 + 2 + 4) * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim / 2
    per_token = matmul + attention
    out = {"flop_per_token": per_token, "assumed_peak_tflops": H200_BF16_TFLOPS}
    if device.type == "cuda":
        out["roofline_tokens_per_s"] = H200_BF16_TFLOPS * 1e12 / per_token
    return out


def fit_per_token(runs: dict, names: list[tuple[str, int]]) -> dict | None:
    """Activation peak = fixed + per_token x tokens, through the runs at two lengths (bytes)."""
    (n1, t1), (n2, t2) = names
    r1, r2 = runs.get(n1, {}), runs.get(n2, {})
    if "activation_peak_gib" not in r1 or "activation_peak_gib" not in r2:
        return None
    a1, a2 = r1["activation_peak_gib"] * GIB, r2["activation_peak_gib"] * GIB
    per_token = (a2 - a1) / (t2 - t1)
    return {"per_token_bytes": per_token, "fixed_bytes": a1 - per_token * t1, "lengths": [t1, t2],
            "step_s": [r1["step_s_median"], r2["step_s_median"]]}


def step_seconds(fit: dict, layers_run: int, layers: int, tokens: int) -> float:
    """A step's time at `tokens` for `layers` layers, from the two measured lengths: a t + b t^2 per layer
    (projections and attention), the measured step being `layers_run` layers."""
    (t1, t2), (s1, s2) = fit["lengths"], fit["step_s"]
    b = max(0.0, (s2 / t2 - s1 / t1) / (t2 - t1))
    a = max(0.0, s1 / t1 - b * t1)
    return (a * tokens + b * tokens * tokens) * max(layers, 1) / layers_run


def longest(result: dict, runs: dict, shape: dict, long_runs: dict, peft_long: list, lora_bf16: bool, args,
            t_start: float) -> dict:
    """The longest sequence one step of the full 40-layer model trains on this GPU (and this host), ours and
    HF+PEFT's, from the per-token activation bytes measured at two lengths; then, time allowing, one step of
    ours at that length, with a ballast standing for what the other layers would hold, as a check."""
    from devstral.train.offload import longest_sequence

    layers = shape["n_layers"]
    lora = runs.get("devstral_lora", {})
    if "held_gib" not in lora:
        return {}
    mem = result["long_memory"]
    per_param = (2 + 4 + 8 + 4) if lora_bf16 else (4 + 8 + 4)  # weight (+ fp32 master), Adam moments, master grad
    per_layer = lora["layer_weight_gib"] * GIB + lora["trainable_params"] / layers * per_param
    weights_40 = lora["held_gib"] * GIB + (40 - layers) * per_layer
    gpu_free = mem["gpu_usable_gib"] * GIB - weights_40 - SAFETY_GIB * GIB
    host = int(mem["host_budget_gib"] * GIB)
    layer_input = shape["dim"] * 2  # bf16 bytes per token of one checkpoint
    out: dict = {"weights_40_layers_gib": weights_40 / GIB, "gpu_free_for_activations_gib": gpu_free / GIB,
                 "host_budget_gib": host / GIB, "safety_gib": SAFETY_GIB}
    plans = {}
    for group, names in long_runs.items():
        fit = fit_per_token(runs, names)
        if fit is None:
            continue
        plan = longest_sequence(gpu_free=gpu_free, host_budget=host, fixed=fit["fixed_bytes"],
                                per_token=fit["per_token_bytes"], checkpoints=-(-40 // group),
                                checkpoint_per_token=layer_input)
        plans[group] = {**fit, "per_token_kb": fit["per_token_bytes"] / 1e3, "fixed_gib": fit["fixed_bytes"] / GIB,
                        **plan, "gpu_gib": plan["gpu_bytes"] / GIB, "host_gib": plan["host_bytes"] / GIB}
    out["ours_by_layers_per_checkpoint"] = plans
    untiled = runs.get("devstral_lora_long_untiled", {})
    if "activation_peak_gib" in untiled:
        out["untiled_kb_per_token_at_long_seq"] = untiled["activation_peak_gib"] * GIB / args.long_seq / 1e3
    peft_fit = fit_per_token(runs, peft_long) if len(peft_long) == 2 else None
    if peft_fit is not None:  # HF keeps every layer's checkpoint on the GPU: 32 more layers, 32 more per token
        per_token = peft_fit["per_token_bytes"] + (40 - layers) * layer_input
        out["peft"] = {**peft_fit, "per_token_kb_40_layers": per_token / 1e3,
                       "tokens": int(max(0.0, gpu_free - peft_fit["fixed_bytes"]) / per_token), "binding": "gpu"}
    if not plans:
        return {"longest": out}
    group = max(plans, key=lambda g: plans[g]["tokens"])
    best = plans[group]
    summary = {"longest": out, "longest_seq_ours_40_layers": best["tokens"],
               "longest_seq_ours_layers_per_checkpoint": group, "longest_seq_binding": best["binding"],
               "longest_seq_peft_40_layers": out.get("peft", {}).get("tokens")}
    if summary["longest_seq_peft_40_layers"]:
        summary["longest_seq_ratio"] = best["tokens"] / summary["longest_seq_peft_40_layers"]
    # the check: one step of `group` layers (one checkpoint's recompute) at the predicted length, beside a
    # ballast for what the other layers would hold; the longest prediction whose step fits the time budget
    left = args.budget_s - (time.perf_counter() - t_start)
    check: dict = {}
    for g in sorted(plans, key=lambda g: -plans[g]["tokens"]):
        plan = plans[g]
        tokens = plan["tokens"] // 64 * 64
        estimate = step_seconds(plan, layers, g, tokens) * 1.3
        check = {"layers_per_checkpoint": g, "headline": g == group, "tokens": tokens, "layers": g,
                 "held_gib": (weights_40 + plan["gpu_checkpoints"] * layer_input * tokens) / GIB,
                 "estimated_s": estimate}
        if args.skip_check or estimate > left:
            check["skipped"] = "--skip-check" if args.skip_check else f"estimated {estimate:.0f} s > {left:.0f} s left"
            continue
        device = torch.device("cuda")
        r = _guarded(bench_ours, dict(shape, n_layers=g), tokens, args.r, device, torch.bfloat16, 0, 1,
                     offload=True, lora_bf16=lora_bf16, mlp_tile=_mlp_tile(), checkpoint_layers=g,
                     hold_gib=check["held_gib"])
        try:
            _reset(device)
        except RuntimeError as e:  # a CUDA error in the step stays sticky: record it, the JSON is still written
            r.setdefault("error", f"after the step: {str(e).splitlines()[0][:300]}")
        check |= {"fits": "error" not in r, **{k: r[k] for k in ("error", "peak_gib", "activation_peak_gib",
                                                                 "step_s_median", "offload_host_gib") if k in r}}
        check["gpu_usable_gib"] = result["long_memory"]["gpu_usable_gib"]
        break
    summary["longest"]["check"] = check
    print(f"longest: ours {best['tokens']} tokens ({group} layer(s)/checkpoint, {best['binding']} binds), "
          f"PEFT {summary['longest_seq_peft_40_layers']}; check: {check}", file=sys.stderr)
    return summary


def _mlp_tile() -> int:
    from devstral.train.config import MLP_TILE

    return MLP_TILE


def machine(device: torch.device) -> dict:
    out = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / GIB, "sms": props.multi_processor_count,
                "cuda": torch.version.cuda}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default $OUT/finetune.json or "
                                                           "benchmarks/results/finetune_<gpu>.json)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 8 of the 40)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per step (default 2048)")
    ap.add_argument("--long-seq", type=int, default=16384, help="the long-sequence runs' length")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-qlora-hf", action="store_true")
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--skip-check", action="store_true", help="no step at the predicted longest length")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="the check step runs only when its estimated time fits what is left of this")
    ap.add_argument("--lora-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                    help="our LoRA weights: auto = bf16 with fp32 masters on CUDA (the trainer's default), fp32 on CPU")
    ap.add_argument("--quick", action="store_true", help="tiny shape on CPU, a smoke test of this script")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    t_start = time.perf_counter()
    if args.quick:
        device, dtype, shape = torch.device("cpu"), torch.float32, dict(QUICK)
        seq, steps, warmup, long_seq = args.seq or 64, args.steps or 2, args.warmup or 1, 128
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device (use --quick for the CPU smoke test)")
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, dict(SMALL, n_layers=8)
        seq, steps, warmup, long_seq = args.seq or 2048, args.steps or 5, args.warmup or 2, args.long_seq
    if args.layers:
        shape["n_layers"] = args.layers
    out_path = args.out or (Path(os.environ["OUT"]) / "finetune.json" if os.environ.get("OUT") else
                            Path(__file__).parent / "results" / f"finetune_{'cpu' if args.quick else 'gpu'}.json")
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "peft", "bitsandbytes", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    result: dict = {
        "benchmark": "finetune_lora_qlora",
        "workload": {**shape, "full_model_layers": 40, "seq_len": seq, "batch": 1, "lora_r": args.r,
                     "target": "all-linear", "grad_checkpointing": True, "dtype": str(dtype).removeprefix("torch."),
                     "weights": "random", "timed_steps": steps, "warmup_steps": warmup,
                     "note": f"{shape['n_layers']} of Devstral-Small's 40 layers at its full width; "
                             "activation memory = peak minus the memory held before the step"},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "machine": machine(device), "versions": versions, "quick": args.quick,
    }
    runs = result["runs"] = {}

    def run(name, fn, *a, **kw):
        runs[name] = _guarded(fn, *a, **kw)
        _reset(device)
        r = runs[name]
        print(f"{name}: " + (r["error"] if "error" in r else
                             f"{r['tokens_per_s']:.0f} tok/s, activations {r.get('activation_peak_gib', 0):.2f} GiB"),
              file=sys.stderr)

    from devstral.kernels.train_backends import liger_available, table

    lora_bf16 = args.lora_dtype == "bf16" or (args.lora_dtype == "auto" and device.type == "cuda")
    result["workload"]["lora_dtype"] = "bf16 (fp32 masters)" if lora_bf16 else "fp32"
    result["train_kernels"] = {op: impl if impl == "ours" or liger_available() else "ours"
                               for op, impl in table().items()} if device.type == "cuda" else "cpu reference"
    run("devstral_lora", bench_ours, shape, seq, args.r, device, dtype, warmup, steps, lora_bf16=lora_bf16)
    if not args.skip_hf:
        run("hf_peft_lora", bench_hf, shape, seq, args.r, device, dtype, warmup, steps)
    run("devstral_qlora", bench_ours, shape, seq, args.r, device, dtype, warmup, steps, qlora=True,
        lora_bf16=lora_bf16)
    if not args.skip_hf and not args.skip_qlora_hf and device.type == "cuda":
        run("hf_peft_qlora", bench_hf, shape, seq, args.r, device, dtype, warmup, steps, qlora=True)
    long_runs: dict[int, list[tuple[str, int]]] = {}
    peft_long: list[tuple[str, int]] = []
    if not args.skip_long:
        from devstral.train.config import MLP_TILE
        from devstral.train.offload import host_budget, host_memory_available

        _reset(device)
        # what the 40-layer extrapolation may use: the GPU as this process can have it, and the host budget the
        # offload would take (measured now, with no model of the long runs pinned yet)
        gpu_usable = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() if device.type == "cuda" else 0
        host_available = host_memory_available()
        result["long_memory"] = {"gpu_usable_gib": gpu_usable / GIB, "host_available_gib":
                                 None if host_available is None else host_available / GIB,
                                 "host_budget_gib": host_budget(host_available) / GIB}
        tile = 32 if args.quick else MLP_TILE
        for group in (1, 2):
            long_runs[group] = []
            for n in (long_seq, 2 * long_seq):
                name = f"devstral_lora_long_g{group}_{n}"
                run(name, bench_ours, shape, n, args.r, device, dtype, 1, 2, offload=True, lora_bf16=lora_bf16,
                    mlp_tile=tile, checkpoint_layers=group)
                long_runs[group].append((name, n))
        # as before this issue (offloaded, untiled): the per-token figure the tiling cuts
        run("devstral_lora_long_untiled", bench_ours, shape, long_seq, args.r, device, dtype, 1, 1, offload=True,
            lora_bf16=lora_bf16)
        if not args.skip_hf:
            for n in (long_seq // 2, long_seq):
                run(f"hf_peft_lora_long_{n}", bench_hf, shape, n, args.r, device, dtype, 1, 1)
                peft_long.append((f"hf_peft_lora_long_{n}", n))

    summary = result["summary"] = {}

    def ratio(a, b, key):
        ra, rb = runs.get(a, {}), runs.get(b, {})
        if key in ra and key in rb and rb[key]:
            return ra[key] / rb[key]
        return None

    summary["lora_speedup_vs_peft"] = ratio("devstral_lora", "hf_peft_lora", "tokens_per_s")
    summary["lora_activation_vs_peft"] = ratio("devstral_lora", "hf_peft_lora", "activation_peak_gib")
    summary["qlora_speed_vs_our_lora"] = ratio("devstral_qlora", "devstral_lora", "tokens_per_s")
    summary["qlora_speedup_vs_peft_qlora"] = ratio("devstral_qlora", "hf_peft_qlora", "tokens_per_s")
    summary["qlora_activation_vs_peft_qlora"] = ratio("devstral_qlora", "hf_peft_qlora", "activation_peak_gib")
    q = runs.get("devstral_qlora", {})
    layers = shape["n_layers"]
    if "peak_gib" in q:  # the 40-layer QLoRA peak: this run's peak plus the other layers' NF4 weights
        summary["qlora_40_layer_peak_gib_extrapolated"] = q["peak_gib"] + (40 - layers) * q["layer_weight_gib"]
    if device.type == "cuda" and long_runs:
        summary |= longest(result, runs, shape, long_runs, peft_long, lora_bf16, args, t_start)

    roof = flop_roofline(shape, seq, device)
    result["roofline"] = roof
    if "roofline_tokens_per_s" in roof:
        for name in ("devstral_lora", "hf_peft_lora"):
            if "tokens_per_s" in runs.get(name, {}):
                summary[f"{name}_fraction_of_flop_roofline"] = runs[name]["tokens_per_s"] / roof["roofline_tokens_per_s"]
    result["wall_s"] = time.perf_counter() - t_start
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_path)
    print(json.dumps(summary, indent=2), file=sys.stderr)
    print(f"wrote {out_path} in {result['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
