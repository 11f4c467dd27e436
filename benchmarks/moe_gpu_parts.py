"""The parts of a MoE decode step, for benchmarks/moe_gpu.py: the routed-expert kernels alone at the
Mixtral shape (per call, GB/s, % of copy, every launch config the tuner may pick), the router kernel
against the six-launch reference, and where one decode step of the whole model goes (kernels by kind:
count and GPU time from the profiler, bytes from the GGUF's tensors).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

TOKENS = (1, 2, 4, 8)
FLUSH_BYTES = 256 << 20  # > the H200's 60 MB L2: every timed call reads its weights from DRAM


def random_stack(qtype: str, rows: int, k: int, device: torch.device, gen: torch.Generator):
    """A planar GGUF weight of random valid fields (fp16 scales small, so outputs stay finite)."""
    from devstral.kernels.gguf_pack import PackedGGUF
    from devstral.quant import QType

    p = PackedGGUF.empty(QType[qtype], rows, k, device)
    p.buf.copy_(torch.randint(0, 256, p.buf.shape, dtype=torch.uint8, device=device, generator=gen))
    for name in ("d", "dmin"):
        if p.get(name) is not None:
            p[name].fill_(2e-4)
    if qtype in ("Q4_K", "Q5_K"):  # 6-bit sub-block scales and mins
        p["sc"].bitwise_and_(63)
        p["mn"].bitwise_and_(63)
    return p


def _expert_bytes(p, n: int) -> int:
    """Bytes of one expert's n rows of a planar stack (all its fields)."""
    return p.nbytes() * n // p.n


def _time(fn, flush: torch.Tensor, reps: int) -> float:
    """Median us of fn() with L2 flushed before each call (CUDA events around the call alone)."""
    fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def expert_kernels(s: dict, device: torch.device, copy_gb_s: float, reps: int = 15) -> dict:
    """Time moe_gemv's gate_up (Q4_K) and down (Q4_K and Q6_K: Q4_K_M gives some layers Q6_K) at the
    shape's sizes for 1, 2, 4 and 8 tokens over every candidate config; the fastest goes into
    moe_gemv.TUNED (so the end-to-end run uses it) and into the result. Bytes per call are those of the
    distinct experts the routing picked; the dense streaming GEMV over the same bytes is the yardstick."""
    from devstral.kernels import gguf_linear, moe_gemv
    from devstral.kernels.gguf_config import sm_count

    t_start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(1)
    e, k, d, h = s["experts"], s["top_k"], s["dim"], s["hidden"]
    sms = sm_count(device)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    weights = {"gate_up": (random_stack("Q4_K", e * h, d, device, gen), random_stack("Q4_K", e * h, d, device, gen)),
               "down_Q4_K": random_stack("Q4_K", e * d, h, device, gen),
               "down_Q6_K": random_stack("Q6_K", e * d, h, device, gen)}
    out: dict = {"timing": f"CUDA events around one call, L2 flushed before each, median of {reps}",
                 "shape": {"experts": e, "top_k": k, "dim": d, "hidden": h}, "sms": sms}
    for t in TOKENS:
        ids = torch.stack([torch.randperm(e, device=device, generator=gen)[:k] for _ in range(t)])
        wts = torch.softmax(torch.randn(t, k, device=device, generator=gen), dim=-1)
        distinct = int(ids.unique().numel())
        x = (torch.randn(t, d, device=device, generator=gen) * 0.5).to(torch.bfloat16)
        hid = torch.empty(t * k, h, dtype=torch.bfloat16, device=device)
        y = torch.empty(t, d, dtype=torch.bfloat16, device=device)
        row: dict = {"distinct_experts": distinct}
        for kind in ("gate_up", "down_Q4_K", "down_Q6_K"):
            w = weights[kind]
            if kind == "gate_up":
                nbytes = 2 * distinct * _expert_bytes(w[0], h)
                rows, qtype = t * k, "Q4_K"

                def call(cfg, w=w, x=x, hid=hid, ids=ids):
                    moe_gemv.gate_up(x, w[0], w[1], hid, ids, n=h, top_k=k, sms=sms, config=cfg)
            else:
                nbytes = distinct * _expert_bytes(w, d)
                rows, qtype = t, w.qtype.name

                def call(cfg, w=w, hid=hid, y=y, ids=ids, wts=wts, x=x):  # x: the layer's residual
                    moe_gemv.down(hid, w, y, ids, wts, n=d, top_k=k, sms=sms, config=cfg, residual=x)
            base = "gate_up" if kind == "gate_up" else "down"
            n, kk = (h, d) if base == "gate_up" else (d, h)
            planned = moe_gemv.plan(base, qtype, rows, n, kk, k, sms, device)
            configs = moe_gemv.candidates(base, qtype)
            if planned not in configs:
                configs = [planned, *configs]
            timed = []
            for cfg in configs:
                us = _time(lambda cfg=cfg: call(cfg), flush, reps)
                timed.append({**cfg, "us": round(us, 2)})
            best = min(timed, key=lambda r: r["us"])
            plan_us = next(r["us"] for r in timed if {**r, "us": None} == {**planned, "us": None})
            limit_us = nbytes / (copy_gb_s * 1e3)
            row[kind] = {"bytes": nbytes, "plan": planned, "plan_us": plan_us,
                         "best": {key: v for key, v in best.items() if key != "us"}, "us": best["us"],
                         "GB_s": round(nbytes / best["us"] / 1e3, 1),
                         "pct_of_copy": round(100 * limit_us / best["us"], 1),
                         "copy_limit_us": round(limit_us, 2), "all": timed}
            moe_gemv.TUNED[f"{base}|{qtype}|{rows}|{n}|{kk}"] = row[kind]["best"]
        out[f"tokens_{t}"] = row
    # the yardstick: the dense decode GEMV (gguf_linear's plan) over as many Q4_K bytes as one token's
    # gate + up (2 experts x 2 projections of [hidden, dim])
    dense = random_stack("Q4_K", 2 * k * h, d, device, gen)
    x1 = (torch.randn(1, d, device=device, generator=gen) * 0.5).to(torch.bfloat16)
    us = _time(lambda: gguf_linear.linear(x1, dense), flush, reps)
    out["dense_wide_gemv_same_bytes"] = {"n": 2 * k * h, "k": d, "us": round(us, 2),
                                         "GB_s": round(dense.nbytes() / us / 1e3, 1),
                                         "pct_of_copy": round(100 * dense.nbytes() / (copy_gb_s * 1e3) / us, 1)}
    out["tuned"] = dict(moe_gemv.TUNED)
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    return out


def router(s: dict, device: torch.device, layers: int) -> dict:
    """Per-layer cost of routing one token inside a CUDA graph (as the engine replays it): the one-launch
    kernel against MoE.route's matmul + softmax + top-k + renormalise, `layers` calls per graph."""
    from devstral.kernels.moe_router import route

    e, k, d = s["experts"], s["top_k"], s["dim"]
    w = (torch.randn(e, d, device=device) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, d, device=device).to(torch.bfloat16)

    def reference():
        probs = torch.softmax(torch.nn.functional.linear(x, w).float(), dim=-1)
        v, i = probs.topk(k, dim=-1)
        return i, v / v.sum(dim=-1, keepdim=True)

    res = {}
    for name, fn in (("fused_kernel", lambda: route(x, w, k)), ("torch_reference", reference)):
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(layers):
                fn()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / layers)
        res[name] = {"us_per_layer": round(statistics.median(times), 2)}
    return res


KINDS = (  # kernel name fragment -> part of the step (first match wins)
    ("_gguf_gate_up_kernel", "experts_gate_up"), ("_gguf_down_kernel", "experts_down"),
    ("_router_kernel", "router"), ("_wide_kernel", "dense_gemv"), ("_gemv_kernel", "dense_gemv"),
    ("_idot_kernel", "dense_gemv"), ("_decode_split_kernel", "attention"), ("_decode_merge_kernel", "attention"),
    ("_rms_norm_kernel", "norms"), ("_rope_kernel", "rope"), ("_store_kv_kernel", "kv_store"),
    ("_silu_mul_kernel", "silu_mul"), ("gemv", "cublas_gemv"), ("elementwise", "torch_elementwise"),
    ("reduce", "torch_reduce"), ("topk", "torch_topk"), ("sort", "torch_topk"),
)


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for frag, kind in KINDS if frag.lower() in low), "other")


def _kernels(engine, run, prompt_ids: list[int], new_tokens: int) -> tuple[dict, float]:
    """{kernel name: (count, GPU us)} over one generation, and its decode wall time (s)."""
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
    return acc, r["decode_s"]


def step_breakdown(engine, run, prompt_ids: list[int], gguf_path: Path, s: dict, steps: int = 16) -> dict:
    """One decode step (batch 1) by kind of kernel: launches and GPU us per step from the difference of
    two profiled generations (1 and 1 + steps new tokens, same prompt: the prefill cancels), bytes per
    step from the GGUF (experts: the top-k share), and the step's wall time against its GPU busy time
    (the rest is launch gaps and the host's per-step work)."""
    from devstral.formats.gguf_read import GGUFFile

    one, _ = _kernels(engine, run, prompt_ids, 1)
    many, decode_s = _kernels(engine, run, prompt_ids, 1 + steps)
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
    g = GGUFFile(gguf_path)
    nbytes = {"experts": 0, "attention_weights": 0, "router": 0, "output": 0, "norms": 0}
    for name in g.tensor_names:
        n = int(g.info(name).nbytes)
        if name == "token_embd.weight":
            continue
        if "_exps." in name:
            nbytes["experts"] += n * s["top_k"] // s["experts"]
        elif "attn_" in name and "norm" not in name:
            nbytes["attention_weights"] += n
        elif "gate_inp" in name:
            nbytes["router"] += n
        elif name == "output.weight":
            nbytes["output"] += n
        else:
            nbytes["norms"] += n
    busy = sum(p["gpu_us"] for p in parts.values())
    launches = sum(p["launches"] for p in parts.values())
    wall_us = decode_s / steps * 1e6
    for p in parts.values():
        p["launches"], p["gpu_us"] = round(p["launches"], 2), round(p["gpu_us"], 1)
        p["share_of_busy"] = round(p["gpu_us"] / busy, 3) if busy else None
    return {"method": f"torch.profiler kernels of a 1+{steps}-token generation minus a 1-token one, per step "
                      "(profiled: the wall time includes the profiler's own cost)",
            "launches_per_step": round(launches, 1), "launches_per_layer": round(launches / s["layers"], 2),
            "gpu_busy_us_per_step": round(busy, 1), "wall_us_per_step_profiled": round(wall_us, 1),
            "bytes_per_step": nbytes, "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1]["gpu_us"])),
            "kernels": dict(sorted(names.items(), key=lambda kv: -kv[1]["gpu_us"]))}
