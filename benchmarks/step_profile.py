"""Where one batch-1 decode step goes, for benchmarks/gpu_engine.py (dense GGUF) and moe_gpu.py (MoE).

Kernels by kind (count and GPU time per step from torch.profiler, as the difference of a 1 + steps token
generation and a 1-token one on the same prompt, so the prefill cancels), the bytes each part of the model
reads per step from the GGUF's tensors, and the step's wall time against its GPU busy time: the
difference is launch gaps and the host's own work per step.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch

KINDS = (  # kernel name fragment -> part of the step (first match wins)
    ("_gguf_gate_up_kernel", "experts_gate_up"), ("_gguf_down_kernel", "experts_down"),
    ("_router_kernel", "router"), ("_wide_kernel", "dense_gemv"), ("_pair_kernel", "dense_gemv"),
    ("_gemv_kernel", "dense_gemv"), ("_tma_kernel", "dense_gemv"),
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


def _kernels(engine, run, prompt_ids: list[int], new_tokens: int) -> tuple[dict, float, dict, list, list, list]:
    """{kernel name: [count, GPU us, exclusive us]} over one generation, its decode wall time (s), the
    same by launch grid, every kernel's (name, grid, start us, end us) in launch order, every copy's
    and memset's (name, start us, end us), and the last step boundaries' work (_trace)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r = run(engine, [prompt_ids], new_tokens)
        torch.cuda.synchronize()
    by_name, by_grid, timeline, copies, boundaries = _trace(prof)
    return by_name, r["decode_s"], by_grid, timeline, copies, boundaries


GRID_KINDS = ("dense_gemv", "experts_gate_up", "experts_down", "attention")


def _trace(prof) -> tuple[dict, dict, list, list, list]:
    """({kernel name: [count, GPU us, exclusive us]}, the same keyed by kernel and launch grid for the
    matmul and attention kernels, whose grid tells the matrices apart, the timeline: (name, grid,
    start us, end us) of every kernel by start, the copies and memsets: (name, start us, end us) by
    start -- not kernels, but the stream is not idle while they run -- and _boundaries() of the events).

    A programmatic dependent launch (kernels/pdl.py) starts before the kernel it depends on ends and then
    waits, so kernel durations overlap and their sum exceeds the GPU's busy time; a kernel's *exclusive*
    time counts only what no earlier kernel covers (its end minus the later of its start and the end of
    everything before it), so exclusive times add up to the busy time and charge the wait to the kernel
    waited for."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: float(e["ts"]))
    copies = sorted(((e.get("name", "")[:32], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
                     for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset")), key=lambda c: c[1])
    by_name: dict[str, list] = {}
    by_grid: dict[str, list] = {}
    timeline = []
    covered = float("-inf")
    for e in kernels:
        start, dur = float(e["ts"]), float(e.get("dur", 0.0))
        end = start + dur
        timeline.append((e.get("name", "")[:32], e.get("args", {}).get("grid"), start, end))
        own = max(0.0, end - max(start, covered))
        covered = max(covered, end)
        name = e.get("name", "")
        keys = [(by_name, name)]
        if _kind(name) in GRID_KINDS:
            args = e.get("args", {})
            keys.append((by_grid, f"{name[:40]} grid={args.get('grid')} regs={args.get('registers per thread')}"))
        for table, key in keys:
            a = table.setdefault(key, [0, 0.0, 0.0])
            a[0] += 1
            a[1] += dur
            a[2] += own
    return by_name, by_grid, timeline, copies, _boundaries(events)


def _boundaries(events: list, last: int = 3, graph_ops: int = 16) -> list:
    """What runs on the GPU between two CUDA graph replays, for the `last` such boundaries: every kernel,
    copy and memset launched on its own (a replay's kernels share its launch's correlation id, so ids with
    at least `graph_ops` operations are replays) as [name, duration us, gap before it us], and the span from
    the replay's last end to the next replay's first start. Empty when the trace has no correlation ids."""
    ops = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                  and "correlation" in e.get("args", {})), key=lambda e: float(e["ts"]))
    count: dict = {}
    for e in ops:
        count[e["args"]["correlation"]] = count.get(e["args"]["correlation"], 0) + 1
    out, replay, graph_end, pending, reach = [], None, 0.0, [], 0.0
    for e in ops:
        corr, start = e["args"]["correlation"], float(e["ts"])
        end = start + float(e.get("dur", 0.0))
        if count[corr] >= graph_ops:
            if replay is not None and corr != replay:  # the next replay starts: close the boundary
                out.append({"span_us": round(start - graph_end, 1), "last_gap_us": round(start - reach, 1),
                            "ops": pending})
                pending = []
            replay, graph_end = corr, max(graph_end, end) if corr == replay else end
            reach = graph_end
        elif replay is not None:
            pending.append([e.get("name", "")[:40], round(end - start, 1), round(start - reach, 1)])
            reach = max(reach, end)
    return out[-last:]


def _two_layers(timeline: list, per_step: int, per_layer: int) -> list:
    """Two middle layers of the last step, kernel by kernel: name, grid, start and end (us, from the
    first one's start), and the gap since the latest end before it (negative: it overlapped)."""
    step = timeline[-per_step:]
    window = step[per_step // 2: per_step // 2 + 2 * per_layer]
    if not window:
        return []
    t0, out, latest = window[0][2], [], window[0][2]
    for name, grid, start, end in window:
        out.append([name, grid, round(start - t0, 2), round(end - t0, 2), round(start - latest, 2)])
        latest = max(latest, end)
    return out


def _idle(timeline: list, per_step: int, steps: int, top: int = 8, copies: list | tuple = ()) -> dict:
    """Where the GPU idles in the last `steps` steps: every gap between a kernel's start and the latest end before
    it, per step, by the (kernel before, kernel after) names it sits between -- a step boundary (the sampling's
    last kernel, then the next step's first) tells the host's share from the gaps inside the captured graph.
    The part of a gap that a copy or memset covers (`copies`: (name, start, end)) is that copy's, not idle:
    copy_us_per_step, and by copy in copies_us_per_step."""
    window = timeline[-per_step * steps:] if per_step > 0 and steps > 0 else []
    if len(window) < 2:
        return {}
    in_window = [c for c in copies if c[2] > window[0][2] and c[1] < max(k[3] for k in window)]
    latest_end, latest_name = window[0][3], window[0][0]
    total, copied, by_pair, by_copy = 0.0, 0.0, {}, {}
    for name, _grid, start, end in window[1:]:
        gap = start - latest_end
        if gap > 0:
            covered = _covered(in_window, latest_end, start, by_copy)
            copied += covered
            total += gap - covered
            key = f"{latest_name} -> {name}"
            by_pair[key] = by_pair.get(key, 0.0) + gap - covered
        if end >= latest_end:
            latest_end, latest_name = end, name
    pairs = sorted(by_pair.items(), key=lambda kv: -kv[1])[:top]
    return {"idle_us_per_step": round(total / steps, 1),
            "largest_by_transition_us_per_step": [[k, round(v / steps, 1)] for k, v in pairs],
            "copy_us_per_step": round(copied / steps, 1),
            "copies_us_per_step": {k: round(v / steps, 1) for k, v in sorted(by_copy.items(), key=lambda kv: -kv[1])}}


def _covered(copies: list, lo: float, hi: float, by_copy: dict) -> float:
    """The time in [lo, hi) that the copies cover (their union), each copy's share added to by_copy by name."""
    total, reach = 0.0, lo
    for name, start, end in copies:
        a, b = max(start, reach), min(end, hi)
        if b > a:
            total += b - a
            by_copy[name] = by_copy.get(name, 0.0) + b - a
            reach = b
    return total


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


def other_prompt(prompt_ids: list[int]) -> list[int]:
    """A prompt of the same length and first token whose every token after it differs from `prompt_ids`', so
    no full block is shared (the prefix cache names a block by all the tokens up to its end): each id with its
    lowest bit flipped, which stays below an even vocabulary size (the benchmarks' ids are random, >= 1000)."""
    return prompt_ids[:1] + [t ^ 1 for t in prompt_ids[1:]]


def step_breakdown(engine, run, prompt_ids: list[int], layers: int, gguf_path: Path | None = None,
                   top_k: int = 1, experts: int = 1, steps: int = 16) -> dict:
    """One decode step (batch 1) by kind of kernel; `run(engine, prompts, new_tokens)` returns decode_s."""
    one, _, grid_one, _, _, _ = _kernels(engine, run, prompt_ids, 1)
    # The same length, other blocks: the prefill must not find the first generation's blocks in the prefix
    # cache, or its kernels no longer cancel (at a 512-token prompt they came to ~800 us a step, session 14)
    many, decode_s, grid_many, timeline, copies, boundaries = _kernels(engine, run, other_prompt(prompt_ids), 1 + steps)

    def per_step(key, totals, base) -> tuple[float, float, float]:
        c0, u0, x0 = base.get(key, (0, 0.0, 0.0))
        count, us, own = totals[key]
        return (count - c0) / steps, (us - u0) / steps, (own - x0) / steps

    parts: dict[str, dict] = {}
    names: dict[str, dict] = {}
    for name in many:
        dc, du, dx = per_step(name, many, one)
        if dc <= 0:
            continue
        kind = _kind(name)
        p = parts.setdefault(kind, {"launches": 0.0, "gpu_us": 0.0, "exclusive_us": 0.0})
        p["launches"] += dc
        p["gpu_us"] += du
        p["exclusive_us"] += dx
        names[name[:80]] = {"kind": kind, "launches": round(dc, 2), "gpu_us": round(du, 2),
                            "exclusive_us": round(dx, 2)}
    busy = sum(p["exclusive_us"] for p in parts.values())
    launches = sum(p["launches"] for p in parts.values())
    wall_us = decode_s / steps * 1e6
    for p in parts.values():
        p["launches"], p["gpu_us"], p["exclusive_us"] = (round(p["launches"], 2), round(p["gpu_us"], 1),
                                                        round(p["exclusive_us"], 1))
        p["share_of_busy"] = round(p["exclusive_us"] / busy, 3) if busy else None
    out = {"method": f"torch.profiler kernels of a 1+{steps}-token generation minus a 1-token one, per step "
                     "(profiled: the wall time includes the profiler's own cost); gpu_us: kernel durations, "
                     "which overlap under programmatic dependent launch; exclusive_us: the part no earlier "
                     "kernel covers (adds up to the busy time)",
           "launches_per_step": round(launches, 1), "launches_per_layer": round(launches / layers, 2),
           "gpu_busy_us_per_step": round(busy, 1),
           "kernel_durations_us_per_step": round(sum(p["gpu_us"] for p in parts.values()), 1),
           "wall_us_per_step_profiled": round(wall_us, 1)}
    if gguf_path is not None:
        out["bytes_per_step"] = _bytes(gguf_path, top_k, experts)
    out["parts"] = dict(sorted(parts.items(), key=lambda kv: -kv[1]["exclusive_us"]))
    out["kernels"] = dict(sorted(names.items(), key=lambda kv: -kv[1]["exclusive_us"]))
    grids = {}
    for key in grid_many:
        dc, du, dx = per_step(key, grid_many, grid_one)
        if dc > 0:
            grids[key] = {"launches": round(dc, 2), "gpu_us": round(du, 1), "exclusive_us": round(dx, 1),
                          "exclusive_us_per_launch": round(dx / dc, 2)}
    out["by_grid"] = dict(sorted(grids.items(), key=lambda kv: -kv[1]["exclusive_us"]))
    out["two_layers"] = _two_layers(timeline, round(launches), round(launches / layers))
    out["idle"] = _idle(timeline, round(launches), steps, copies=copies)
    out["between_replays"] = boundaries
    replay = graph_replay_us(engine)
    if replay is not None:
        out["graph_replay_us_per_step"] = replay
    return out


def graph_replay_us(engine, replays: int = 64) -> float | None:
    """GPU time of one batch-1 decode step alone: its captured graph replayed back to back (queued
    faster than it runs, so the GPU never waits on the host), median of 5 timings. The engine's decode
    time per token minus this is the host's share: building the step's inputs, sampling, reading the
    token back, the scheduler. The replays rewrite the last step's KV slot with the same values."""
    graphs = getattr(engine.runner, "graphs", None)
    if graphs is None or 1 not in graphs.graphs:
        return None
    graph = graphs.graphs[1][0]
    # a graph that advances its own inputs (DEVSTRAL_GRAPH_ADVANCE=1) moves them on at every replay: put them
    # back afterwards, and let the next launch take the copy path
    held = [t.clone() for t in (graphs.tokens, graphs.positions, graphs.slots, graphs.context)]
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / replays)
    with torch.inference_mode():  # the buffers were made under it (capture)
        for t, saved in zip((graphs.tokens, graphs.positions, graphs.slots, graphs.context), held, strict=True):
            t.copy_(saved)
    graphs.ahead = None
    return round(statistics.median(times), 1)
