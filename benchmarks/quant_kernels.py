"""Quantized-weight kernels on one GPU: correctness, speed against the roofline, and the tuned table.

For each weight type (GGUF Q4_K, Q6_K, Q8_0, Q5_K; NF4; FP8) and Devstral Small's matrix shapes, it
runs a few candidate launch configurations of every kernel path (CUDA-core GEMV for a few rows,
tensor-core tile GEMM, dequantize + cuBLAS) over a range of batch sizes M, checks every output
against the exactly dequantized weight times the activations (fp32), times it inside a CUDA graph
(replicas of the weight cycle so that small matrices do not sit in L2), and reports:

* per row: microseconds, bytes and flops moved, the roofline time (max of bytes / measured copy
  bandwidth and flops / measured bf16 cuBLAS peak) and the fraction of it reached;
* the best configuration per (type, shape, M), the M where each path stops winning, and the
  "tuned" object that kernels/gguf_config.py reads (copy it to src/devstral/kernels/tuned/<gpu>.json);
* a weights-only decode estimate for a 40-layer Devstral Small Q4_K_M / Q8_0 (tok/s, M = 1).

Compilation is spread over --compile-workers processes first (they run each candidate once and
fill Triton's on-disk cache); --budget-s stops the sweep early and still writes what it has.
No network. JSON goes to $OUT/quant_kernels.json when OUT is set, else benchmarks/results/.

    python benchmarks/quant_kernels.py [--quick] [--types Q4_K,Q6_K] [--budget-s 210]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from devstral.kernels import (  # noqa: E402
    fp8_kernels,
    gguf_dequant,
    gguf_gemm,
    gguf_gemv,
    gguf_idot,
    gguf_linear,
    nf4_kernels,
)
from devstral.kernels.gguf_config import GEMV_NS, IDOT_NS, IDOT_TYPES, idot_bm, split_k  # noqa: E402
from devstral.kernels.gguf_pack import pack  # noqa: E402
from devstral.model.nf4 import quantize_nf4  # noqa: E402
from devstral.quant import QType  # noqa: E402
from devstral.quant.layout import block_info, row_bytes  # noqa: E402

SHAPES = {"attn_q": (4096, 5120), "attn_kv": (1024, 5120), "attn_o": (5120, 4096),
          "ffn_gate_up": (32768, 5120), "ffn_down": (5120, 32768), "output": (131072, 5120)}
GGUF_TYPES = ["Q4_K", "Q6_K", "Q8_0", "Q5_K"]
TYPE_SHAPES = {"Q5_K": ["attn_q", "ffn_gate_up", "ffn_down"]}
BIG_M_SHAPES = ["attn_q", "ffn_gate_up", "ffn_down"]  # the output head never sees a big batch
GEMV_MS = [1, 2, 3, 4]
IDOT_MS = [1, 2, 3, 4, 8]
BIG_MS = [4, 8, 16, 64, 256, 1024, 4096]
F16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}
L2_FLUSH_BYTES = 256 << 20  # replicas of a weight until they span this: no L2 hits across calls
CUDA = torch.device("cuda")


# --------------------------------------------------------------------------------------- measuring

def time_graph(fn, calls: int, replays: int = 5) -> float:
    """Median microseconds per call of `fn(i)` (i = 0..calls-1) captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(calls, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    del graph
    return statistics.median(times)


def calls_for(one_call_us: float, replicas: int) -> int:
    """Enough calls for ~2 ms per replay, a whole number of passes over the replicas."""
    passes = max(1, round(2000 / max(one_call_us, 1.0) / replicas))
    return max(replicas, min(1024 // replicas * replicas, passes * replicas))


def eager_us(fn) -> float:
    fn(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(3):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / 3


def measure_peaks() -> dict:
    bufs = [torch.empty(1 << 30, dtype=torch.uint8, device=CUDA) for _ in range(2)]
    us = time_graph(lambda i: bufs[1].copy_(bufs[0]), 8)
    copy_gbps = 2 * bufs[0].numel() / us / 1e3
    bufs.clear()
    a = torch.randn(8192, 8192, device=CUDA, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=CUDA, dtype=torch.bfloat16)
    us = time_graph(lambda i: a @ b, 10)
    return {"copy_GBps": round(copy_gbps, 1), "bf16_tflops": round(2 * 8192 ** 3 / us / 1e6, 1)}


# --------------------------------------------------------------------------------------- weights

def random_gguf(qtype: str, n: int, k: int, seed: int) -> torch.Tensor:
    """Random valid blocks (any bit pattern is valid) with finite fp16 scales, made on the GPU."""
    qt = QType[qtype]
    bs, ts = block_info(qt)
    g = torch.Generator(device=CUDA).manual_seed(seed)
    raw = torch.randint(0, 256, (n * k // bs, ts), dtype=torch.uint8, device=CUDA, generator=g)
    for off in F16_FIELDS[qtype]:
        d = (torch.rand(raw.shape[0], device=CUDA, generator=g) * 0.004 + 5e-4).to(torch.float16)
        raw[:, off:off + 2] = d.view(torch.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


@dataclass
class Group:
    fmt: str  # Q4_K ... | NF4 | FP8
    shape: str
    n: int
    k: int
    weights: list = field(default_factory=list)  # replicas
    file_bytes: int = 0
    dense: torch.Tensor | None = None  # the exact dequantized weight, fp32 (for references)

    @property
    def key(self) -> str:
        return f"{self.fmt}/{self.shape}"

    def build(self, replicas: bool) -> None:
        if self.weights:
            return
        n, k = self.n, self.k
        if self.fmt in GGUF_TYPES:
            raw = random_gguf(self.fmt, n, k, seed=zlib.crc32(self.key.encode()))
            self.file_bytes = n * row_bytes(QType[self.fmt], k)
            first = pack(raw, QType[self.fmt], n, k)
            del raw
            self.weights = [first]
        elif self.fmt == "NF4":
            w = torch.randn(n, k, device=CUDA) * 0.02
            first = quantize_nf4(w, double_quant=True)
            self.file_bytes = first.nbytes()
            self.weights = [first]
        else:
            w = torch.randn(n, k, device=CUDA) * 0.02
            first = fp8_kernels.quantize_rowwise(w)
            self.file_bytes = first[0].numel() + 4 * n
            self.weights = [first]
        if replicas:
            count = max(1, min(64, -(-L2_FLUSH_BYTES // max(self.file_bytes, 1))))
            self.weights += [_clone(first) for _ in range(count - 1)]

    def reference_weight(self) -> torch.Tensor:
        if self.dense is None:
            w = self.weights[0]
            if self.fmt in GGUF_TYPES:
                self.dense = gguf_dequant.dequantize(w, dtype=torch.float32)
            elif self.fmt == "NF4":
                self.dense = nf4_kernels.dequantize(w, torch.float32)
            else:
                self.dense = fp8_kernels.dequantize(w[0], w[1], torch.float32)
        return self.dense

    def release(self) -> None:
        self.weights, self.dense = [], None
        torch.cuda.empty_cache()


def _clone(w):
    if isinstance(w, tuple):
        return tuple(t.clone() for t in w)
    if hasattr(w, "rebind"):
        return w.rebind(w.buf.clone())
    from devstral.model.nf4 import NF4Tensor

    return NF4Tensor(w.packed.clone(), w.shape, None if w.absmax is None else w.absmax.clone(),
                     None if w.absmax_q is None else w.absmax_q.clone(), w.absmax_scale.clone(), w.absmax_offset)


# --------------------------------------------------------------------------------------- candidates

@dataclass(frozen=True)
class Cand:
    kind: str  # gemv | gemm | dequant_cublas | bf16_cublas | nf4_gemv | nf4_dequant_cublas | fp8_gemv | fp8_scaled_mm
    m: int
    cfg: tuple = ()

    def config(self) -> dict:
        return dict(self.cfg)


def _cfg(**kw) -> tuple:
    return tuple(sorted(kw.items()))


def candidates(g: Group, quick: bool, sms: int) -> list[Cand]:
    out: list[Cand] = []
    n, k = g.n, g.k
    if g.fmt in GGUF_TYPES:
        sb = 16 if g.fmt == "Q6_K" else 32
        ns = GEMV_NS[g.fmt]
        shapes1 = [(64, 4)] if quick else [(32, 4), (64, 4), (128, 4), (64, 8)]
        for m in GEMV_MS:
            bm = 1 if m == 1 else (2 if m == 2 else 4)
            for bn, nw in (shapes1 if m == 1 else [(32, 4)]):
                base = split_k(-(-n // bn) * -(-m // bm), k // (sb * ns), sms)
                splits = sorted({base, min(16, base * 2), max(1, base // 2)}) if m == 1 and not quick else [base]
                for s in splits:
                    out.append(Cand("gemv", m, _cfg(bn=bn, ns=ns, bm=bm, split_k=s, num_warps=nw)))
        if g.fmt in IDOT_TYPES:
            ns1 = IDOT_NS[g.fmt]
            for m in IDOT_MS:
                bm = idot_bm(m)
                if m == 1:
                    opts = [(64, ns1, 4)] if quick else [(32, ns1, 4), (64, ns1, 4), (64, ns1 // 2, 4), (128, ns1 // 2, 4),
                                                         (128, ns1, 8)]
                else:
                    opts = [(64 if bm <= 2 else 32, max(1, ns1 // (1 if bm <= 2 else 2)), 4)]
                    if not quick:
                        opts.append((32 if bm <= 2 else 16, max(1, ns1 // (1 if bm <= 2 else 2)), 4))
                for bn, ns_, nw in opts:
                    base = split_k(-(-n // bn), k // (sb * ns_), sms)
                    splits = sorted({base, min(16, base * 2), max(1, base // 2)}) if m == 1 and not quick else [base]
                    for s_ in splits:
                        out.append(Cand("idot", m, _cfg(bn=bn, ns=ns_, bm=bm, split_k=s_, num_warps=nw)))
        if g.shape in BIG_M_SHAPES:
            for m in BIG_MS:
                bm = 16 if m <= 16 else 64 if m <= 64 else 128
                nsub = 8 if g.fmt == "Q6_K" else 4
                tiles = -(-n // 128) * -(-m // bm)
                s = split_k(tiles, k // (sb * nsub), sms)
                opts = [dict(bn=128, bm=bm, nsub=nsub, num_warps=4 if bm < 128 else 8, num_stages=3 if bm <= 64 else 2)]
                if not quick:
                    opts.append(dict(bn=64 if bm <= 64 else 128, bm=bm, nsub=max(2, nsub // 2),
                                     num_warps=4 if bm <= 64 else 8, num_stages=2 if bm <= 64 else 3))
                for o in opts:
                    out.append(Cand("gemm", m, _cfg(split_k=s, **o)))
                out.append(Cand("dequant_cublas", m))
    elif g.fmt == "NF4":
        for m in GEMV_MS:
            bm = 1 if m == 1 else (2 if m == 2 else 4)
            for bn, ns in ([(32, 4)] if quick or m > 1 else [(32, 4), (64, 4), (32, 8)]):
                s = split_k(-(-n // bn), k // (64 * ns), sms)
                out.append(Cand("nf4_gemv", m, _cfg(bn=bn, ns=ns, bm=bm, split_k=s, num_warps=4)))
        for m in (16, 256, 4096):
            out.append(Cand("nf4_dequant_cublas", m))
    else:
        for m in GEMV_MS:
            bm = 1 if m == 1 else (2 if m == 2 else 4)
            opts = [(16, 512 // bm)] if quick or m > 1 else [(16, 512), (32, 256), (8, 1024)]
            for bn, bk in opts:
                s = split_k(-(-n // bn), k // bk, sms)
                out.append(Cand("fp8_gemv", m, _cfg(bn=bn, bk=bk, bm=bm, split_k=s, num_warps=4)))
        for m in (8, 16, 64, 256, 1024, 4096):
            out.append(Cand("fp8_scaled_mm", m))
    return out


def runner(g: Group, c: Cand, x: torch.Tensor, out: torch.Tensor):
    """fn(i): one call on weight replica i % R."""
    cfg, ws = c.config(), g.weights
    r = len(ws)
    if c.kind == "gemv":
        return lambda i: gguf_gemv.gemv(x, ws[i % r], None, out, **cfg)
    if c.kind == "idot":
        return lambda i: gguf_idot.gemv(x, ws[i % r], None, out, **cfg)
    if c.kind == "gemm":
        return lambda i: gguf_gemm.gemm(x, ws[i % r], None, out, **cfg)
    if c.kind == "dequant_cublas":
        return lambda i: gguf_linear.dequant_matmul(x, ws[i % r], None, out)
    if c.kind == "nf4_gemv":
        return lambda i: nf4_kernels.gemv(x, ws[i % r], None, out, **cfg)
    if c.kind == "nf4_dequant_cublas":
        return lambda i: torch.mm(x, nf4_kernels.dequantize(ws[i % r], x.dtype).t(), out=out)
    if c.kind == "fp8_gemv":
        return lambda i: fp8_kernels.gemv(x, ws[i % r][0], ws[i % r][1], None, out, **cfg)
    if c.kind == "fp8_scaled_mm":
        return lambda i: out.copy_(fp8_kernels.scaled_mm(x, ws[i % r][0], ws[i % r][1], None))
    raise ValueError(c.kind)


def bytes_flops(g: Group, c: Cand) -> tuple[int, int]:
    m, n, k = c.m, g.n, g.k
    w = g.file_bytes
    if c.kind in ("dequant_cublas", "nf4_dequant_cublas"):
        w += 2 * 2 * n * k  # the bf16 copy is written, then read by cuBLAS
    return w + 2 * m * k + 2 * m * n, 2 * m * n * k


# --------------------------------------------------------------------------------------- sweeps

def run(args, groups: list[Group], peaks: dict, sms: int, dry: bool, shard: tuple[int, int], t0: float) -> list[dict]:
    rows, index = [], 0
    for g in groups:
        cands = candidates(g, args.quick, sms)
        mine = [c for j, c in enumerate(cands) if (index + j) % shard[1] == shard[0]]
        index += len(cands)
        if not mine:
            continue
        if not dry and time.time() - t0 > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s reached: skipping {g.key} and later groups", flush=True)
            break
        g.build(replicas=not dry)
        xs, refs = {}, {}
        for c in mine:
            if c.m not in xs:
                xs[c.m] = torch.randn(c.m, g.k, device=CUDA, dtype=torch.bfloat16)
            x = xs[c.m]
            out = torch.empty(c.m, g.n, device=CUDA, dtype=torch.bfloat16)
            fn = runner(g, c, x, out)
            try:
                fn(0)
            except Exception as e:  # a config that does not compile or launch is reported, not fatal
                rows.append(dict(kind=c.kind, fmt=g.fmt, shape=g.shape, n=g.n, k=g.k, m=c.m, config=c.config(),
                                 error=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            if dry:
                continue
            if c.m not in refs:
                refs[c.m] = x.float() @ g.reference_weight().t()
            ref = refs[c.m]
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            # fp8_scaled_mm and idot also quantize the activations (to fp8 and int8)
            tol = 0.05 if c.kind == "fp8_scaled_mm" else 1.5e-2 if c.kind == "idot" else 5e-3
            one = eager_us(fn)
            us = time_graph(fn, calls_for(one, len(g.weights)))
            nbytes, flops = bytes_flops(g, c)
            roof_us = max(nbytes / peaks["copy_GBps"] / 1e3, flops / peaks["bf16_tflops"] / 1e6)
            rows.append(dict(kind=c.kind, fmt=g.fmt, shape=g.shape, n=g.n, k=g.k, m=c.m, config=c.config(),
                             us=round(us, 2), GBps=round(nbytes / us / 1e3, 1), TFLOPs=round(flops / us / 1e6, 2),
                             bytes=nbytes, flops=flops, roof_us=round(roof_us, 2),
                             pct_of_roof=round(100 * roof_us / us, 1), rel_err=rel, ok=rel < tol))
            print(f"{g.key:22s} {c.kind:18s} M={c.m:<5d} {us:9.1f} us {nbytes / us / 1e3:7.0f} GB/s "
                  f"{100 * roof_us / us:5.1f}% roof  err {rel:.1e} {'' if rel < tol else 'WRONG'} {c.config()}",
                  flush=True)
        if not dry and g.shape in BIG_M_SHAPES and g.fmt in GGUF_TYPES:
            rows += bf16_baseline(g, peaks, xs)
        g.release()
    return rows


_BASELINE_DONE: set[str] = set()


def bf16_baseline(g: Group, peaks: dict, xs: dict) -> list[dict]:
    """cuBLAS on the bf16 weight, once per shape: what the quantized paths are compared with."""
    if g.shape in _BASELINE_DONE:
        return []
    _BASELINE_DONE.add(g.shape)
    w = torch.randn(g.n, g.k, device=CUDA, dtype=torch.bfloat16)
    count = max(1, min(8, -(-L2_FLUSH_BYTES // (2 * w.numel()))))
    reps = [w] + [w.clone() for _ in range(count - 1)]
    rows = []
    for m in (1, 16, 1024, 4096):
        x = torch.randn(m, g.k, device=CUDA, dtype=torch.bfloat16)
        out = torch.empty(m, g.n, device=CUDA, dtype=torch.bfloat16)
        fn = lambda i, x=x, out=out: torch.mm(x, reps[i % len(reps)].t(), out=out)  # noqa: E731
        us = time_graph(fn, calls_for(eager_us(fn), len(reps)))
        nbytes, flops = 2 * g.n * g.k + 2 * m * (g.k + g.n), 2 * m * g.n * g.k
        roof_us = max(nbytes / peaks["copy_GBps"] / 1e3, flops / peaks["bf16_tflops"] / 1e6)
        rows.append(dict(kind="bf16_cublas", fmt="BF16", shape=g.shape, n=g.n, k=g.k, m=m, config={}, us=round(us, 2),
                         GBps=round(nbytes / us / 1e3, 1), TFLOPs=round(flops / us / 1e6, 2), bytes=nbytes,
                         flops=flops, roof_us=round(roof_us, 2), pct_of_roof=round(100 * roof_us / us, 1), ok=True))
    return rows


# --------------------------------------------------------------------------------------- summaries

def best_rows(rows: list[dict]) -> dict:
    best: dict = {}
    for r in rows:
        if "us" not in r or not r.get("ok"):
            continue
        key = (r["fmt"], r["shape"], r["m"], r["kind"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    return best


def thresholds_and_tuned(rows: list[dict], device: str) -> dict:
    best = best_rows(rows)
    # capability and SM count: a GPU without its own table takes one of the same (gguf_config.sibling_table)
    tuned: dict = {"device": device, "capability": list(torch.cuda.get_device_capability()),
                   "sms": torch.cuda.get_device_properties(0).multi_processor_count, "thresholds": {}, "kinds": {},
                   "gguf_gemv": {}, "gguf_idot": {}, "gguf_gemm": {}, "nf4_gemv": {}, "fp8_gemv": {}}
    for (fmt, _shape, m, kind), r in best.items():
        cfg = r["config"]
        if kind == "gemv":
            tuned["gguf_gemv"][f"{fmt}|{cfg['bm']}|{r['n']}|{r['k']}"] = cfg
        elif kind == "idot":
            key = f"{fmt}|{cfg['bm']}|{r['n']}|{r['k']}"
            prev = tuned["gguf_idot"].get(key)  # bucket bm serves several M: keep the largest M's config
            if prev is None or m >= prev.get("_m", 0):
                tuned["gguf_idot"][key] = {**cfg, "_m": m}
        elif kind == "gemm":
            key = f"{fmt}|{cfg['bm']}|{r['n']}|{r['k']}"
            # a bm bucket serves several M: keep the config measured at the bucket's largest M
            prev = tuned["gguf_gemm"].get(key)
            if prev is None or m >= prev.get("_m", 0):
                tuned["gguf_gemm"][key] = {**cfg, "_m": m}
        elif kind == "nf4_gemv":
            tuned["nf4_gemv"][f"NF4|{cfg['bm']}|{r['n']}|{r['k']}"] = cfg
        elif kind == "fp8_gemv":
            tuned["fp8_gemv"][f"FP8|{cfg['bm']}|{r['n']}|{r['k']}"] = cfg
    for cfg in [*tuned["gguf_gemm"].values(), *tuned["gguf_idot"].values()]:
        cfg.pop("_m", None)
    for fmt in {k[0] for k in best}:
        per_m: dict[int, dict[str, float]] = {}
        for (f, shape, m, kind), r in best.items():
            if f == fmt and shape in BIG_M_SHAPES:
                per_m.setdefault(m, {}).setdefault(kind, 0.0)
                per_m[m][kind] += r["us"]
        if fmt in GGUF_TYPES:
            # the fastest path per M, over the shapes where every path was measured at that M
            for m, t in per_m.items():
                shapes = {kind: {sh for (f, sh, mm, kk) in best if f == fmt and mm == m and kk == kind
                                 and sh in BIG_M_SHAPES} for kind in t}
                full = [kind for kind in t if shapes[kind] == set(BIG_M_SHAPES)]
                if full:
                    tuned["kinds"].setdefault(fmt, {})[str(m)] = min(full, key=lambda kind: t[kind])
            gemv_max = 1
            for m in sorted(per_m):
                t = per_m[m]
                if "gemv" in t and all(t["gemv"] <= v for kk, v in t.items() if kk != "gemv"):
                    gemv_max = m
                elif m > 1:
                    break
            gemm_max = gemv_max
            for m in sorted(mm for mm in per_m if mm > gemv_max):  # up to the first M where cuBLAS wins
                t = per_m[m]
                if "gemm" in t and t["gemm"] <= t.get("dequant_cublas", float("inf")):
                    gemm_max = m
                else:
                    break
            tuned["thresholds"][fmt] = {"gemv_max_m": gemv_max, "gemm_max_m": gemm_max}
            if fmt in IDOT_TYPES:  # idot serves every M up to the first where another path beats it
                idot_max = 0
                for m in sorted(per_m):
                    t = per_m[m]
                    if "idot" in t and all(t["idot"] <= v for kk, v in t.items() if kk != "idot"):
                        idot_max = m
                    elif "idot" in t:
                        break
                tuned["thresholds"][fmt]["idot_max_m"] = idot_max
    return tuned


def decode_estimate(rows: list[dict], layers: int = 40) -> dict:
    """Weights-only time per token at M = 1 from the best GEMVs (no attention, norms or launches)."""
    best = best_rows(rows)

    def t(fmt: str, shape: str) -> float | None:
        times = [best[key]["us"] for kind in ("gemv", "idot") if (key := (fmt, shape, 1, kind)) in best]
        return min(times) if times else None

    out = {}
    # Q4_K_M as llama.cpp mixes it (and as ../shared/peers/mk_devstral_shape_gguf.py writes it):
    # attn_v and ffn_down in Q6_K for half the layers (first and last eighth, every third between)
    more = sum(1 for i in range(layers) if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2)
    parts = {
        "Q4_K_M": [(layers, "Q4_K", "attn_q"), (layers, "Q4_K", "attn_kv"), (layers - more, "Q4_K", "attn_kv"),
                   (more, "Q6_K", "attn_kv"), (layers, "Q4_K", "attn_o"), (2 * layers, "Q4_K", "ffn_gate_up"),
                   (layers - more, "Q4_K", "ffn_down"), (more, "Q6_K", "ffn_down"), (1, "Q6_K", "output")],
        "Q8_0": [(layers, "Q8_0", "attn_q"), (2 * layers, "Q8_0", "attn_kv"), (layers, "Q8_0", "attn_o"),
                 (2 * layers, "Q8_0", "ffn_gate_up"), (layers, "Q8_0", "ffn_down"), (1, "Q8_0", "output")],
    }
    for name, items in parts.items():
        times = [(count, t(fmt, shape)) for count, fmt, shape in items]
        if all(v is not None for _, v in times):
            us = sum(count * v for count, v in times)
            out[name] = {"us_per_token": round(us, 1), "tok_per_s": round(1e6 / us, 1)}
    return out


# --------------------------------------------------------------------------------------- main

def make_groups(args) -> list[Group]:
    groups = []
    types = [t for t in args.types.split(",") if t]
    for fmt in types:
        shapes = TYPE_SHAPES.get(fmt, list(SHAPES)) if fmt in GGUF_TYPES else ["attn_q", "ffn_gate_up", "ffn_down"]
        for s in shapes:
            groups.append(Group(fmt, s, *SHAPES[s]))
    return groups


def warm_compile(args, workers: int) -> float:
    """Run every candidate once in `workers` processes: Triton's disk cache then serves the sweep."""
    t = time.time()
    cmd = [sys.executable, __file__, "--types", args.types, "--dry-run"] + (["--quick"] if args.quick else [])
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/{workers}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(workers)]
    deadline = t + max(30.0, args.budget_s / 2)
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            err = "timed out"
        if p.returncode:
            print(f"compile worker failed (the sweep compiles what is missing): {err[-500:]}", flush=True)
    return time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(GGUF_TYPES + ["NF4", "FP8"]))
    ap.add_argument("--quick", action="store_true", help="one config per kernel, fewer shapes")
    ap.add_argument("--budget-s", type=float, default=190.0, help="stop sweeping after this many seconds")
    ap.add_argument("--compile-workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)))
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    t0 = time.time()
    sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    shard = tuple(int(v) for v in args.shard.split("/"))
    groups = make_groups(args)
    if args.dry_run:
        run(args, groups, {}, sms, True, shard, t0)
        return
    compile_s = warm_compile(args, args.compile_workers) if args.compile_workers > 1 else 0.0
    peaks = measure_peaks()
    print(f"{torch.cuda.get_device_name(CUDA)}: copy {peaks['copy_GBps']:.0f} GB/s (read + write), bf16 "
          f"{peaks['bf16_tflops']:.0f} TFLOP/s; compile warm-up {compile_s:.0f} s", flush=True)
    rows = run(args, groups, peaks, sms, False, (0, 1), t0)
    device = torch.cuda.get_device_name(CUDA)
    import triton

    result = {
        "benchmark": "quant_kernels", "device": device, "sms": sms, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "peaks": peaks, "elapsed_s": round(time.time() - t0, 1),
        "compile_warmup_s": round(compile_s, 1), "quick": args.quick,
        "wrong": [r for r in rows if "us" in r and not r["ok"]], "errors": [r for r in rows if "error" in r],
        "decode_estimate": decode_estimate(rows), "tuned": thresholds_and_tuned(rows, device),
        "best": [r for r in best_rows(rows).values()], "rows": rows,
    }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "quant_kernels.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    print(json.dumps({"decode_estimate": result["decode_estimate"], "thresholds": result["tuned"]["thresholds"],
                      "wrong": len(result["wrong"]), "errors": len(result["errors"]),
                      "elapsed_s": result["elapsed_s"]}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
