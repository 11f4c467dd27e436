"""Where one batch-1 decode step goes, for benchmarks/gpu_engine.py (dense GGUF) and moe_gpu.py (MoE).

Kernels by kind (count and GPU time per step from torch.profiler, as the difference of a 1 + steps token
generation and a 1-token one on the same prompt, so the prefill cancels), the bytes each part of the model
reads per step from the GGUF's tensors, and the step's wall time against its GPU busy time: the
difference is launch gaps and the host's own work per step.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

KINDS = (  # kernel name fragment -> part of the step (first match wins)
    ("_gguf_gate_up_kernel", "experts_gate_up"), ("_gguf_down_kernel", "experts_down"),
    ("_router_kernel", "router"), ("_wide_kernel", "dense_gemv"), ("_gemv_kernel", "dense_gemv"),
    ("_idot_kernel", "dense_gemv"), ("_quantize_kernel", "activation_quant"),
    ("_decode_split_kernel", "attention"), ("_decode_merge_kernel", "attention"),
    ("_rms_norm_kernel", "norms"), ("_rope_store_kernel", "rope_kv_store"), ("_rope_kernel", "rope"),
    ("_store_kv_kernel", "kv_store"),
    ("_silu_mul_kernel", "silu_mul"), ("gemv", "cublas_gemv"), ("elementwise", "torch_elementwise"),
    ("reduce", "torch_reduce"), ("topk", "torch_topk"), ("sort", "torch_topk"),
)


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for frag, kind in KINDS if frag.lower() in low), "other")


def _kernels(engine, run, prompt_ids: list[int], new_tokens: int) -> tuple[dict, float, dict]:
    """{kernel name: (count, GPU us)} over one generation, its decode wall time (s), and _by_grid."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r = run(engine, [prompt_ids], new_tokens)
        torch.cuda.synchronize()
    acc: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            a = acc.setdefault(ev.name, [0, 0.0])
            a[0] += 1
            a[1] += ev.time_range.elapsed_us()
    return acc, r["decode_s"], _by_grid(prof)


GRID_KINDS = ("dense_gemv", "experts_gate_up", "experts_down", "attention")


def _by_grid(prof) -> dict:
    """{kernel @ grid: (count, GPU us)} for the matmul and attention kernels: the trace's launch grid
    tells the matrices apart (one config per shape), which the kernel name alone does not."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    acc: dict[str, list] = {}
    for e in events:
        if e.get("cat") != "kernel" or _kind(e.get("name", "")) not in GRID_KINDS:
            continue
        args = e.get("args", {})
        key = f"{e['name'][:40]} grid={args.get('grid')} regs={args.get('registers per thread')}"
        a = acc.setdefault(key, [0, 0.0])
        a[0] += 1
        a[1] += float(e.get("dur", 0.0))
    return acc


def _bytes(gguf_path: Path, top_k: int, experts: int) -> dict:
    """Bytes a decode step reads, by part (experts: the top-k share; no token embedding: a lookup)."""
    from devstral.formats.gguf_read import GGUFFile

    g = GGUFFile(gguf_path)
    nbytes = {"experts": 0, "ffn": 0, "attention_weights": 0, "router": 0, "output": 0, "norms": 0, "other": 0}
    for name in g.tensor_names:
        n = int(g.info(name).nbytes)
        if name == "token_embd.weight":
            continue
        if "_exps." in name:
            nbytes["experts"] += n * top_k // experts
        elif "norm" in name:
            nbytes["norms"] += n
        elif "attn_" in name:
            nbytes["attention_weights"] += n
        elif "gate_inp" in name:
            nbytes["router"] += n
        elif "ffn_" in name:
            nbytes["ffn"] += n
        elif name == "output.weight":
            nbytes["output"] += n
        else:
            nbytes["other"] += n
    return {k: v for k, v in nbytes.items() if v}


def step_breakdown(engine, run, prompt_ids: list[int], layers: int, gguf_path: Path | None = None,
                   top_k: int = 1, experts: int = 1, steps: int = 16) -> dict:
    """One decode step (batch 1) by kind of kernel; `run(engine, prompts, new_tokens)` returns decode_s."""
    one, _, grid_one = _kernels(engine, run, prompt_ids, 1)
    many, decode_s, grid_many = _kernels(engine, run, prompt_ids, 1 + steps)
    parts: dict[str, dict] = {}
    names: dict[str, dict] = {}
    for name, (count, us) in many.items():
        c0, u0 = one.get(name, (0, 0.0))
        dc, du = (count - c0) / steps, (us - u0) / steps
        if dc <= 0:
            continue
        kind = _kind(name)
        p = parts.setdefault(kind, {"launches": 0.0, "gpu_us": 0.0})
        p["launches"] += dc
        p["gpu_us"] += du
        names[name[:80]] = {"kind": kind, "launches": round(dc, 2), "gpu_us": round(du, 2)}
    busy = sum(p["gpu_us"] for p in parts.values())
    launches = sum(p["launches"] for p in parts.values())
    wall_us = decode_s / steps * 1e6
    for p in parts.values():
        p["launches"], p["gpu_us"] = round(p["launches"], 2), round(p["gpu_us"], 1)
        p["share_of_busy"] = round(p["gpu_us"] / busy, 3) if busy else None
    out = {"method": f"torch.profiler kernels of a 1+{steps}-token generation minus a 1-token one, per step "
                     "(profiled: the wall time includes the profiler's own cost)",
           "launches_per_step": round(launches, 1), "launches_per_layer": round(launches / layers, 2),
           "gpu_busy_us_per_step": round(busy, 1), "wall_us_per_step_profiled": round(wall_us, 1)}
    if gguf_path is not None:
        out["bytes_per_step"] = _bytes(gguf_path, top_k, experts)
    out["parts"] = dict(sorted(parts.items(), key=lambda kv: -kv[1]["gpu_us"]))
    out["kernels"] = dict(sorted(names.items(), key=lambda kv: -kv[1]["gpu_us"]))
    grids = {}
    for key, (count, us) in grid_many.items():
        c0, u0 = grid_one.get(key, (0, 0.0))
        dc, du = (count - c0) / steps, (us - u0) / steps
        if dc > 0:
            grids[key] = {"launches": round(dc, 2), "gpu_us": round(du, 1), "us_per_launch": round(du / dc, 2)}
    out["by_grid"] = dict(sorted(grids.items(), key=lambda kv: -kv[1]["gpu_us"]))
    return out
