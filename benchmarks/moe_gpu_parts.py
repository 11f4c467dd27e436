"""The parts of a MoE decode step, for benchmarks/moe_gpu.py: the routed-expert kernels alone at the
Mixtral shape (per call, GB/s, % of copy, every launch config the tuner may pick), the router kernel
against the six-launch reference. Where one decode step of the whole model goes is step_profile.py's.
"""

from __future__ import annotations

import statistics
import time

import torch

TOKENS = (1, 2, 4, 8)
FLUSH_BYTES = 256 << 20  # > the H200's 60 MB L2: every timed call reads its weights from DRAM
COPIES = 4  # distinct weight stacks per timed graph, as a decode step's layers: no L2 reuse between calls


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


def expert_kernels(s: dict, device: torch.device, copy_gb_s: float, reps: int = 25,
                   tokens: tuple[int, ...] = TOKENS) -> dict:
    """Time moe_gemv's gate_up (Q4_K) and down (Q4_K and Q6_K: Q4_K_M gives some layers Q6_K) at the
    shape's sizes for `tokens` (1, 2, 4 and 8) over every candidate config; the fastest goes into
    moe_gemv.TUNED (so the end-to-end run uses it) and into the result. Bytes per call are those of the
    distinct experts the routing picked; the dense streaming GEMV over the same bytes is the yardstick.
    An xq config's call includes its activation quantization launch (gguf_xq.py), so its time does too; a cat
    gate_up config's (moe_gemv.concatenates) includes a silu_mul launch.

    Timing as gguf_gemv_sweep.py times the dense GEMV, which is how the engine runs decode: COPIES calls
    on distinct weight stacks captured in one CUDA graph, the graph replayed after an L2 flush, per call.
    (Eager calls timed by events charge each call the host's launch latency: 75-100 us measured for a
    kernel the engine's profile puts at 33-57 us, which made the earlier tuning pick at random.)"""
    from devstral.kernels import gguf_linear, moe_gemv
    from devstral.kernels.gguf_config import sm_count
    from devstral.kernels.silu_mul import silu_mul
    from gguf_gemv_sweep import time_us

    t_start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(1)
    e, k, d, h = s["experts"], s["top_k"], s["dim"], s["hidden"]
    sms = sm_count(device)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    stacks = [{"gate_up": (random_stack("Q4_K", e * h, d, device, gen), random_stack("Q4_K", e * h, d, device, gen)),
               "down_Q4_K": random_stack("Q4_K", e * d, h, device, gen),
               "down_Q6_K": random_stack("Q6_K", e * d, h, device, gen)} for _ in range(COPIES)]
    out: dict = {"timing": f"CUDA events per CUDA-graph replay of {COPIES} calls on distinct weight stacks, L2 "
                           f"flushed before each replay, per call, median of {reps}",
                 "shape": {"experts": e, "top_k": k, "dim": d, "hidden": h}, "sms": sms}
    for t in tokens:
        ids = torch.stack([torch.randperm(e, device=device, generator=gen)[:k] for _ in range(t)])
        wts = torch.softmax(torch.randn(t, k, device=device, generator=gen), dim=-1)
        distinct = int(ids.unique().numel())
        x = (torch.randn(t, d, device=device, generator=gen) * 0.5).to(torch.bfloat16)
        hid = torch.empty(t * k, h, dtype=torch.bfloat16, device=device)
        pre = torch.empty(t * k, 2 * h, dtype=torch.bfloat16, device=device)  # a cat config's [gate | up] rows
        y = torch.empty(t, d, dtype=torch.bfloat16, device=device)
        row: dict = {"distinct_experts": distinct}
        for kind in ("gate_up", "down_Q4_K", "down_Q6_K"):
            w0 = stacks[0][kind]
            if kind == "gate_up":
                nbytes = 2 * distinct * _expert_bytes(w0[0], h)
                rows, qtype = t * k, "Q4_K"

                def call(cfg, w, x=x, hid=hid, pre=pre, ids=ids):
                    if moe_gemv.concatenates(cfg, w[0], w[1]):
                        # charged the SwiGLU as one silu_mul launch: what it costs where down is not xq (an
                        # xq down's quantization applies it in the launch it has anyway)
                        moe_gemv.gate_up(x, w[0], w[1], pre, ids, n=h, top_k=k, sms=sms, config=cfg)
                        silu_mul(pre[:, :h], pre[:, h:])
                    else:
                        moe_gemv.gate_up(x, w[0], w[1], hid, ids, n=h, top_k=k, sms=sms, config=cfg)
            else:
                nbytes = distinct * _expert_bytes(w0, d)
                rows, qtype = t, w0.qtype.name

                def call(cfg, w, hid=hid, y=y, ids=ids, wts=wts, x=x):  # x: the layer's residual
                    moe_gemv.down(hid, w, y, ids, wts, n=d, top_k=k, sms=sms, config=cfg, residual=x)
            base = "gate_up" if kind == "gate_up" else "down"
            n, kk = (h, d) if base == "gate_up" else (d, h)
            planned = moe_gemv.plan(base, qtype, rows, n, kk, k, sms, device)
            configs = moe_gemv.candidates(base, qtype)
            if planned not in configs:
                configs = [planned, *configs]
            timed = []
            for cfg in configs:
                def run(cfg=cfg, kind=kind, call=call, stacks=stacks):
                    for c in stacks:
                        call(cfg, c[kind])
                try:
                    us = time_us(run, flush, reps) / COPIES
                except Exception as err:  # a config the GPU refuses (registers, shared memory) is reported
                    timed.append({**cfg, "error": f"{type(err).__name__}: {str(err)[:200]}"})
                    continue
                timed.append({**cfg, "us": round(us, 2)})
            ok = [r for r in timed if "us" in r]
            best = min(ok, key=lambda r: r["us"])
            plan_us = next((r["us"] for r in ok if {**r, "us": None} == {**planned, "us": None}), None)
            limit_us = nbytes / (copy_gb_s * 1e3)
            row[kind] = {"bytes": nbytes, "plan": planned, "plan_us": plan_us,
                         "best": {key: v for key, v in best.items() if key != "us"}, "us": best["us"],
                         "GB_s": round(nbytes / best["us"] / 1e3, 1),
                         "pct_of_copy": round(100 * limit_us / best["us"], 1),
                         "copy_limit_us": round(limit_us, 2), "all": timed}
            moe_gemv.TUNED[f"{base}|{qtype}|{rows}|{n}|{kk}"] = row[kind]["best"]
            print(f"moe {kind} tokens={t}: {best['us']:.2f} us ({row[kind]['pct_of_copy']:.0f}% of copy) "
                  f"{row[kind]['best']}", flush=True)
        out[f"tokens_{t}"] = row
    del stacks
    # the yardstick: the dense decode GEMV (gguf_linear's plan) over as many Q4_K bytes as one token's
    # gate + up (2 experts x 2 projections of [hidden, dim]), timed the same way
    dense = [random_stack("Q4_K", 2 * k * h, d, device, gen) for _ in range(COPIES)]
    x1 = (torch.randn(1, d, device=device, generator=gen) * 0.5).to(torch.bfloat16)

    def dense_run():
        for w in dense:
            gguf_linear.linear(x1, w)
    us = time_us(dense_run, flush, reps) / COPIES
    out["dense_wide_gemv_same_bytes"] = {"n": 2 * k * h, "k": d, "us": round(us, 2),
                                         "GB_s": round(dense[0].nbytes() / us / 1e3, 1),
                                         "pct_of_copy": round(100 * dense[0].nbytes() / (copy_gb_s * 1e3) / us, 1)}
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
