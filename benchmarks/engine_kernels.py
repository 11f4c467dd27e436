"""The engine's Triton kernels on one GPU, at Devstral-Small shapes: a few candidate configs per
kernel and shape, each checked against its reference, timed, and set against its roofline.

    python benchmarks/engine_kernels.py                 # writes $OUT/ (or benchmarks/results/):
                                                        #   engine_kernels_<gpu>.json, gemv_tuned.json
    python benchmarks/engine_kernels.py --smoke         # tiny shapes on the CPU (Triton's interpreter):
                                                        #   checks this script, times nothing real
    python benchmarks/engine_kernels.py --sections decode_attention   # attention only (~3 minutes):
                                                        #   engine_kernels_<gpu>_decode_attention.json

Timing: each candidate is launched `reps` times inside one CUDA graph (no launch overhead between
kernels, as in the engine's captured decode step) and the graph is replayed a few times; the median
per launch counts. Inputs smaller than 3x the L2 cache are cycled over several copies so that every
launch reads from HBM, as it does in a 40-layer model. Roofline: the bytes a kernel must move (read
plus write) over the copy bandwidth measured in the same run (device-to-device copy, read + write).

GEMV: cuBLAS (F.linear) and every candidate at M = 1, 2, 4, 8, 16; the winner per shape and M goes
into gemv_tuned.json (null where cuBLAS wins or no candidate beats it by 3%): the shipped table with
this GPU's entry replaced. Copy it over src/devstral/kernels/gemv_tuned.json to make
`kernels.gemv.linear` use the kernel on this GPU model.

Runs in about 5 minutes on an H200 (the decode attention alone, every KV kind, about 3), compiles
included: a time budget per section skips the remaining candidates of a section that overruns, and
says so in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from devstral.kernels.gemv import TUNED_TABLE  # noqa: E402
from devstral.kernels.gemv_triton import GemvConfig, linear_triton  # noqa: E402
from devstral.kernels.kv_format import QUANT_KINDS, KVLayer, storage  # noqa: E402
from devstral.kernels.kv_store import store_kv_ref  # noqa: E402
from devstral.kernels.kv_store_triton import store_kv_triton  # noqa: E402
from devstral.kernels.paged_attention import decode_attention_ref  # noqa: E402
from devstral.kernels.paged_attention_triton import DecodeConfig, decode_attention_triton, planned_splits  # noqa: E402
from devstral.kernels.rms_norm import add_rms_norm_ref, rms_norm_ref  # noqa: E402
from devstral.kernels.rms_norm_triton import add_rms_norm_triton, rms_norm_triton  # noqa: E402
from devstral.kernels.rope import apply_rope_ref  # noqa: E402
from devstral.kernels.rope_triton import apply_rope_triton  # noqa: E402
from devstral.kernels.silu_mul import silu_mul_ref  # noqa: E402
from devstral.kernels.silu_mul_triton import silu_mul_triton  # noqa: E402

DECODE_KINDS = ("bf16", "fp8", "q8_0", "q4_0")
# Devstral Small (24B): dim 5120, 32 query heads over 8 kv heads of 128, FFN 32768, vocab 131072
FULL = dict(dim=5120, n_heads=32, n_kv_heads=8, head_dim=128, ffn=32768, vocab=131072, page=16,
            gemv_shapes=[(5120, 65536), (32768, 5120), (5120, 6144), (4096, 5120), (5120, 131072)],  # by bytes/token
            gemv_m=[1, 2, 4, 8, 16], rows=[1, 64, 8192], store_tokens=[64, 8192],
            # every KV kind at B=1 ctx 32768 and 512 and B=16 ctx 8192 (compared per byte), then bf16 extras
            decode_cases=[(batch, ctx, kind) for batch, ctx in ((1, 32768), (1, 512), (16, 8192))
                          for kind in DECODE_KINDS] + [(64, 2048, "bf16"), (1, 131072, "bf16")],
            max_context=131072)
SMOKE = dict(dim=96, n_heads=4, n_kv_heads=2, head_dim=32, ffn=160, vocab=200, page=16,
             gemv_shapes=[(96, 80), (160, 48)], gemv_m=[1, 4], rows=[1, 3], store_tokens=[5],
             decode_cases=[(2, 40, "bf16"), (1, 70, "q4_0"), (2, 50, "q8_0"), (1, 33, "fp8")], max_context=128)
BUDGET_S = {"elementwise": 25, "kv_store": 15, "decode_attention": 200, "gemv": 55}  # compiles included
SECTIONS = ("elementwise", "kv_store", "decode_attention", "gemv")
SPEEDUP_MARGIN = 0.97  # a Triton GEMV must beat cuBLAS by 3% to be chosen


class Bench:
    def __init__(self, device: torch.device, smoke: bool):
        self.device, self.smoke = device, smoke
        self.copy_bw = self._copy_bandwidth()
        self.l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 1 << 20
        self.started = time.perf_counter()

    def _copy_bandwidth(self) -> float:
        """Bytes read + written per second by an SM kernel streaming 2 GiB (torch.neg over fp32 views), the kind
        of work the kernels measured against it do. Not `y.copy_(x)`: captured in a CUDA graph a device copy
        becomes a memcpy node, handled unlike the eager copy (pytorch/pytorch#191284); on the H200 it gave
        2.70-2.77 TB/s where eager copies and streaming kernels reach 4.1-4.2 (gpu_engine.py,
        gguf_gemv_sweep.py), so every kernel's fraction of it read about 1.5x too high."""
        if self.device.type != "cuda":
            return 1e9
        x = torch.empty(2 << 30, dtype=torch.uint8, device=self.device).view(torch.float32)
        y = torch.empty_like(x)
        return 2 * (2 << 30) / self.time([lambda: torch.neg(x, out=y)], est_s=2 * (2 << 30) / 4e12)

    def copies(self, nbytes: int) -> int:
        """How many copies of an input make a cycle that does not fit in L2."""
        if self.device.type != "cuda":
            return 1
        return max(1, min(64, math.ceil(3 * self.l2 / max(1, nbytes))))

    def time(self, calls: list, est_s: float) -> float:
        """Seconds per call: `calls` cycled `reps` times in one CUDA graph, replayed 5 times (median)."""
        if self.device.type != "cuda":
            t = time.perf_counter()
            for c in calls:
                c()
            return (time.perf_counter() - t) / len(calls)
        reps = max(len(calls), min(400, int(3e-3 / max(est_s, 1e-7))))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                calls[i % len(calls)]()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(5):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / reps)
        del graph
        return statistics.median(times)

    def entry(self, name: str, seconds: float, nbytes: int, **extra) -> dict:
        return {"name": name, "us": round(seconds * 1e6, 3), "bytes": nbytes,
                "tb_s": round(nbytes / seconds / 1e12, 4),
                "fraction_of_copy_bw": round(nbytes / seconds / self.copy_bw, 4), **extra}

    def over(self, section: str, section_start: float) -> bool:
        return not self.smoke and time.perf_counter() - section_start > BUDGET_S[section]


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref.float()).abs().max().item()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return max_err(out, ref) / max(ref.float().abs().max().item(), 1e-30)


# ---------------------------------------------------------------- elementwise
def bench_elementwise(b: Bench, s: dict) -> list[dict]:
    out, t0 = [], time.perf_counter()
    for rows in s["rows"]:
        if b.over("elementwise", t0):
            out.append({"name": f"elementwise rows={rows}", "skipped": "time budget"})
            continue
        out += _norms(b, s, rows) + _silu(b, s, rows) + _rope(b, s, rows)
    return out


def _candidates(b: Bench, name: str, cands: dict, n: int, nbytes: int, ref: torch.Tensor, exact: bool = False):
    """Time each candidate fn(i) over n input copies; check fn(0) against ref."""
    out = []
    for label, fn in cands.items():
        first = fn(0)
        err = rel_err(first[0] if isinstance(first, tuple) else first, ref)
        sec = b.time([lambda i=i, fn=fn: fn(i) for i in range(n)], nbytes / 3e12)
        out.append(b.entry(name, sec, nbytes, config=label, rel_err=err, ok=err == 0.0 if exact else err < 1e-2))
    return out


def _norms(b: Bench, s: dict, rows: int) -> list[dict]:
    dev, dt, dim = b.device, torch.bfloat16, s["dim"]
    w = torch.randn(dim, device=dev, dtype=dt)
    n = b.copies(4 * rows * dim)
    xs = [torch.randn(rows, dim, device=dev, dtype=dt) for _ in range(n)]
    ds = [torch.randn(rows, dim, device=dev, dtype=dt) for _ in range(n)]
    norm = {"reference": lambda i: rms_norm_ref(xs[i], w, 1e-5)}
    add = {"reference": lambda i: add_rms_norm_ref(xs[i], ds[i], w, 1e-5)}
    for nw in (4, 8, 16):
        norm[f"triton w{nw}"] = lambda i, nw=nw: rms_norm_triton(xs[i], w, 1e-5, num_warps=nw)
        add[f"triton w{nw}"] = lambda i, nw=nw: add_rms_norm_triton(xs[i], ds[i], w, 1e-5, num_warps=nw)
    # RMSNorm reads x and writes y; add + RMSNorm reads x and delta, writes y and the residual
    return (_candidates(b, f"rms_norm rows={rows} dim={dim}", norm, n, 2 * rows * dim * 2,
                        rms_norm_ref(xs[0], w, 1e-5))
            + _candidates(b, f"add_rms_norm rows={rows} dim={dim}", add, n, 4 * rows * dim * 2,
                          add_rms_norm_ref(xs[0], ds[0], w, 1e-5)[0]))


def _silu(b: Bench, s: dict, rows: int) -> list[dict]:
    """silu(gate) * up on the two halves of a fused gate/up output: reads 2, writes 1."""
    dev, ffn = b.device, s["ffn"]
    n = b.copies(6 * rows * ffn)
    gus = [torch.randn(rows, 2 * ffn, device=dev, dtype=torch.bfloat16) for _ in range(n)]
    cands = {"reference": lambda i: silu_mul_ref(*gus[i].chunk(2, -1))}
    for block, nw in ((1024, 4), (2048, 4), (4096, 8)):
        cands[f"triton b{block} w{nw}"] = lambda i, block=block, nw=nw: silu_mul_triton(
            *gus[i].chunk(2, -1), block=block, num_warps=nw)
    return _candidates(b, f"silu_mul rows={rows} ffn={ffn}", cands, n, 3 * rows * ffn * 2,
                       silu_mul_ref(*gus[0].chunk(2, -1)))


def _rope(b: Bench, s: dict, rows: int) -> list[dict]:
    """RoPE on q/k views of a fused qkv output: reads q, k, cos, sin; writes q, k (bit-exact)."""
    dev, dt, H, Hkv, D = b.device, torch.bfloat16, s["n_heads"], s["n_kv_heads"], s["head_dim"]
    n = b.copies(4 * rows * (H + 2 * Hkv) * D)
    qkvs = [torch.randn(1, rows, (H + 2 * Hkv) * D, device=dev, dtype=dt) for _ in range(n)]
    cos = torch.randn(1, rows, D, device=dev, dtype=dt)
    sin = torch.randn(1, rows, D, device=dev, dtype=dt)

    def qk(i):
        x = qkvs[i]
        return x[..., :H * D].view(1, rows, H, D), x[..., H * D:(H + Hkv) * D].view(1, rows, Hkv, D)

    cands = {"reference": lambda i: apply_rope_ref(*qk(i), cos, sin),
             "triton": lambda i: apply_rope_triton(*qk(i), cos, sin)}
    nbytes = 2 * rows * (H + Hkv) * D * 2 + 2 * rows * D * 2
    return _candidates(b, f"rope tokens={rows} heads={H}/{Hkv}", cands, n, nbytes,
                       apply_rope_ref(*qk(0), cos, sin)[0], exact=True)


# ---------------------------------------------------------------- KV store
def layer_for(kind: str, num_blocks: int, page: int, Hkv: int, D: int, device) -> KVLayer:
    vdtype, nv, sdtype, ns = storage(kind, D)

    def alloc(n, dtype):
        return None if dtype is None else torch.zeros(num_blocks, page, Hkv, n, dtype=dtype, device=device)

    return KVLayer(alloc(nv, vdtype), alloc(nv, vdtype), alloc(ns, sdtype), alloc(ns, sdtype), kind)


def kv_bytes_per_token_head(kind: str, D: int) -> int:
    vdtype, nv, sdtype, ns = storage(kind, D)
    return nv * vdtype.itemsize + (ns * sdtype.itemsize if sdtype is not None else 0)


def bench_kv_store(b: Bench, s: dict) -> list[dict]:
    out, t0 = [], time.perf_counter()
    for n_tok in s["store_tokens"]:
        for kind in ("bf16", "fp8", "q8_0", "q4_0"):
            if b.over("kv_store", t0):
                out.append({"name": f"kv_store tokens={n_tok} {kind}", "skipped": "time budget"})
            else:
                out.append(_store(b, s, n_tok, kind))
    return out


def _store(b: Bench, s: dict, n_tok: int, kind: str) -> dict:
    """Reads k and v (bf16), writes them in the cache's kind."""
    dev, H, Hkv, D, page = b.device, s["n_heads"], s["n_kv_heads"], s["head_dim"], s["page"]
    qkv = torch.randn(n_tok, (H + 2 * Hkv) * D, device=dev, dtype=torch.bfloat16)
    k = qkv[:, H * D:(H + Hkv) * D].view(n_tok, Hkv, D)
    v = qkv[:, (H + Hkv) * D:].view(n_tok, Hkv, D)
    num_blocks = 4 * n_tok // page + 4
    slots = torch.randperm(num_blocks * page, device=dev)[:n_tok]
    ours, ref = (layer_for(kind, num_blocks, page, Hkv, D, dev) for _ in range(2))
    store_kv_triton(k, v, ours, slots)
    store_kv_ref(k, v, ref, slots)
    ok = all(torch.equal(a.view(torch.uint8), r.view(torch.uint8))
             for a, r in zip(ours[:4], ref[:4], strict=True) if a is not None)
    nbytes = n_tok * Hkv * 2 * (D * 2 + kv_bytes_per_token_head(kind, D))
    sec = b.time([lambda: store_kv_triton(k, v, ours, slots)], nbytes / 3e12)
    return b.entry(f"kv_store tokens={n_tok} {kind}", sec, nbytes, config="triton", ok=ok)


# ---------------------------------------------------------------- decode attention
def decode_candidates(kind: str) -> list[DecodeConfig]:
    """The default (splits merged in the launch, splits from the compiled kernel's occupancy) and the
    two-pass merge first, then the other orientation of the scores, smaller/larger tiles and, for the
    2-byte kinds, a single-buffered pipeline (smaller shared memory, more programs per SM)."""
    first = [DecodeConfig(fused_merge=True), DecodeConfig(fused_merge=False),
             DecodeConfig(tokens_major=kind not in QUANT_KINDS)]
    if kind in QUANT_KINDS:
        return first + [DecodeConfig(block_n=128), DecodeConfig(block_n=32)]
    return first + [DecodeConfig(block_n=32), DecodeConfig(num_stages=3), DecodeConfig(block_n=128, num_warps=8)]


def bench_decode(b: Bench, s: dict) -> list[dict]:
    """Every case's first two candidates (the default, splits merged in the launch, and the two-pass
    merge) before any case's others, so that the time budget never drops that comparison."""
    out, t0 = [], time.perf_counter()
    for first in (True, False):
        for batch, ctx, kind in s["decode_cases"]:
            candidates = decode_candidates(kind)
            out += _decode_case(b, s, batch, ctx, kind, t0, candidates[:2] if first else candidates[2:],
                                baseline=not first)
            if b.device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def _random_layer(kind: str, num_blocks: int, s: dict, device, g: torch.Generator) -> KVLayer:
    layer = layer_for(kind, num_blocks, s["page"], s["n_kv_heads"], s["head_dim"], device)
    for t in layer[:2]:
        if t.dtype == torch.float8_e4m3fn:  # random bytes would hold NaNs
            t.copy_(torch.randn(t.shape, device=device, generator=g, dtype=torch.bfloat16).to(t.dtype))
        elif t.is_floating_point():
            t.normal_(generator=g)
        else:
            t.view(torch.uint8).random_(0, 256, generator=g)
    for t in layer[2:4]:
        if t is not None:
            t.uniform_(0.005, 0.02, generator=g)
    return layer


def _decode_case(b: Bench, s: dict, batch: int, ctx: int, kind: str, t0: float, candidates: list[DecodeConfig],
                 baseline: bool) -> list[dict]:
    """Reads every key and value of the batch's contexts once, q and the output, and the partials
    (counted for every planned split: a short row writes fewer)."""
    dev, H, Hkv, D, page = b.device, s["n_heads"], s["n_kv_heads"], s["head_dim"], s["page"]
    name = f"decode B={batch} ctx={ctx} {kind}"
    kv_bytes = batch * ctx * 2 * Hkv * kv_bytes_per_token_head(kind, D)
    blocks_per_seq = -(-ctx // page)
    num_blocks = batch * blocks_per_seq + 1
    g = torch.Generator(device=dev).manual_seed(batch + ctx)
    # pages scattered at random, as a long-running prefix cache leaves them
    tables = torch.randperm(num_blocks - 1, device=dev, generator=g).view(batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    layers = [_random_layer(kind, num_blocks, s, dev, g) for _ in range(b.copies(kv_bytes))]
    q = torch.randn(batch, H + 2 * Hkv, D, device=dev, dtype=torch.bfloat16, generator=g)[:, :H]
    ref = decode_attention_ref(q, layers[0], tables, lens, D ** -0.5)
    out = []
    for cfg in candidates:
        if b.over("decode_attention", t0):
            out.append({"name": name, "config": repr(cfg), "skipped": "time budget"})
            continue

        def run(layer, cfg=cfg):
            return decode_attention_triton(q, layer, tables, lens, D ** -0.5, None, max_context=s["max_context"],
                                           config=cfg)

        err = rel_err(run(layers[0]), ref)
        splits = planned_splits(q, layers[0], tables, lens, None, max_context=s["max_context"], config=cfg)
        partials = 0 if splits == 1 else 2 * batch * H * splits * (D + 1) * 4  # written, then read
        nbytes = kv_bytes + 2 * batch * H * D * 2 + partials
        sec = b.time([lambda layer=layer, run=run: run(layer) for layer in layers], nbytes / 3e12)
        out.append(b.entry(name, sec, nbytes, config=repr(cfg), rel_err=err, ok=err < 3e-2, splits=splits,
                           kv_bytes=kv_bytes, kv_tb_s=round(kv_bytes / sec / 1e12, 4),
                           merge="one split" if splits == 1 else ("fused" if cfg.fused_merge else "two-pass")))
    if baseline and kind == "bf16" and dev.type == "cuda" and not b.over("decode_attention", t0):
        # baseline: SDPA (FlashAttention) decode over a contiguous [B, Hkv, ctx, D] cache
        kc = torch.randn(batch, Hkv, ctx, D, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        qh = q.reshape(batch, H, 1, D)
        nbytes = kv_bytes + 2 * batch * H * D * 2
        sec = b.time([lambda: F.scaled_dot_product_attention(qh, kc, vc, enable_gqa=True)], nbytes / 3e12)
        out.append(b.entry(name, sec, nbytes, config="sdpa contiguous (baseline)"))
    return out


# ---------------------------------------------------------------- GEMV
def gemv_candidates(k: int, n: int) -> list[GemvConfig]:
    # shared memory per program (sm_90a): 64x256 s4 160 KB (1 per SM), 64x128 s4 80 KB and 128x128 s3
    # 108 KB (2 per SM: one hides the other's prologue), 32x256 s4 72 KB (mma.sync instead of wgmma);
    # persistent=p: p programs per SM walk all tiles in one pipeline
    if n >= 32768:  # enough row tiles to fill the GPU without splitting K
        return [GemvConfig(64, 256, 1, 4, 4), GemvConfig(64, 128, 1, 4, 4), GemvConfig(128, 128, 1, 4, 3),
                GemvConfig(64, 128, 1, 4, 6), GemvConfig(128, 256, 1, 8, 3), GemvConfig(64, 256, 1, 4, 4, 1),
                GemvConfig(64, 128, 1, 4, 4, 2)]
    splits = (4, 8, 16) if k >= 16384 else (2, 4, 8)
    return ([GemvConfig(bn, bk, sk, 4, 4) for bn, bk in ((64, 256), (64, 128), (32, 256)) for sk in splits]
            + [GemvConfig(bn, bk, sk, 4, 4, p) for bn, bk, p in ((64, 256, 1), (64, 128, 2)) for sk in splits])


def bench_gemv(b: Bench, s: dict) -> tuple[list[dict], dict]:
    dev, dt, out, t0 = b.device, torch.bfloat16, [], time.perf_counter()
    policy: dict[str, dict[str, dict | None]] = {}
    for k, n in s["gemv_shapes"]:
        key = f"{k}x{n}"
        policy[key] = {}
        copies = b.copies(n * k * 2)
        ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
        for m in s["gemv_m"]:
            x = torch.randn(m, k, device=dev, dtype=dt)
            ref = F.linear(x, ws[0])
            nb = n * k * 2 + m * k * 2 + m * n * 2
            name = f"gemv {k}->{n} M={m}"
            cublas = b.time([lambda w=w, x=x: F.linear(x, w) for w in ws], nb / 3e12)
            out.append(b.entry(name, cublas, nb, config="cublas"))
            best = None
            for cfg in gemv_candidates(k, n):
                if b.over("gemv", t0):
                    out.append({"name": name, "config": str(cfg), "skipped": "time budget"})
                    continue
                err = rel_err(linear_triton(x, ws[0], cfg), ref)
                ok = err < 2 * 2 ** -8
                sec = b.time([lambda w=w, x=x, cfg=cfg: linear_triton(x, w, cfg) for w in ws], nb / 3e12)
                out.append(b.entry(name, sec, nb, config=str(cfg), rel_err=err, ok=ok,
                                   speedup_vs_cublas=round(cublas / sec, 3)))
                if ok and sec < SPEEDUP_MARGIN * cublas and (best is None or sec < best[0]):
                    best = (sec, cfg)
            policy[key][str(m)] = best[1]._asdict() if best else None
        del ws
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out, policy


def summary(rows: list[dict]) -> None:
    """One line per case: the best config that passed its check, against the baseline."""
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    for name, rs in by_name.items():
        timed = [r for r in rs if "us" in r]
        ours = [r for r in timed if r.get("ok", True) and r["config"] not in ("reference", "cublas")
                and "baseline" not in r["config"]]
        base = [r for r in timed if r["config"] in ("reference", "cublas") or "baseline" in r["config"]]
        bad = [r["config"] for r in timed if r.get("ok") is False]
        line = f"{name:44s}"
        if ours:
            best = min(ours, key=lambda r: r["us"])
            line += f" {best['us']:10.2f} us {best['tb_s']:6.3f} TB/s {100 * best['fraction_of_copy_bw']:5.1f}%  [{best['config']}]"
        if base:
            line += f"  | {base[0]['config']}: {base[0]['us']:.2f} us"
        if bad:
            line += f"  | FAILED CHECK: {bad}"
        print(line, flush=True)


def decode_comparisons(rows: list[dict]) -> dict:
    """Per decode case: the splits merged in the launch against the two-pass merge (the default), and
    each kind's best KV bytes per second against bf16's at the same batch and context."""
    timed = [r for r in rows if "us" in r and r.get("ok")]
    merge = []
    for name in dict.fromkeys(r["name"] for r in timed):
        fused = [r for r in timed if r["name"] == name and r["config"] == repr(DecodeConfig(fused_merge=True))]
        two = [r for r in timed if r["name"] == name and r["config"] == repr(DecodeConfig(fused_merge=False))]
        if fused and two and fused[0]["merge"] != "one split":
            merge.append({"name": name, "splits": fused[0]["splits"], "fused_us": fused[0]["us"],
                          "two_pass_us": two[0]["us"], "faster": "fused" if fused[0]["us"] < two[0]["us"] else "two-pass"})
    per_byte = []
    for name in dict.fromkeys(r["name"] for r in timed):
        case, kind = name.rsplit(" ", 1)
        bf16 = [r["kv_tb_s"] for r in timed if r["name"] == f"{case} bf16"]
        best = max(r["kv_tb_s"] for r in timed if r["name"] == name)
        if bf16 and max(bf16) > 0:
            per_byte.append({"name": name, "kv_tb_s": best, "vs_bf16": round(best / max(bf16), 3)})
    return {"fused_vs_two_pass": merge, "kv_bytes_per_second_vs_bf16": per_byte}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="comma-separated subset (e.g. decode_attention: every KV kind, merged in the launch "
                         "or in two passes, in about 3 minutes); written to engine_kernels_<gpu>_<sections>.json")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("engine_kernels.py needs a CUDA GPU (or --smoke)")
    dev = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE if args.smoke else FULL
    torch.manual_seed(0)
    b = Bench(dev, args.smoke)
    sections = args.sections.split(",")
    result: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__,
                     "python": platform.python_version()},
        "copy_bandwidth_tb_s": round(b.copy_bw / 1e12, 4), "l2_bytes": b.l2,
        "shapes": {k: v for k, v in shapes.items() if not isinstance(v, list)},
    }
    print(f"{result['device']}: copy bandwidth {b.copy_bw / 1e12:.3f} TB/s (read + write), L2 {b.l2 >> 20} MiB",
          flush=True)
    policy = None
    for section, fn in (("elementwise", bench_elementwise), ("kv_store", bench_kv_store),
                        ("decode_attention", bench_decode), ("gemv", bench_gemv)):
        if section not in sections:
            continue
        t = time.perf_counter()
        rows = fn(b, shapes)
        if section == "gemv":
            rows, policy = rows
        result[section] = rows
        print(f"-- {section} ({time.perf_counter() - t:.1f} s)", flush=True)
        summary(rows)
        if section == "decode_attention":
            result["decode_comparisons"] = decode_comparisons(rows)
            for m in result["decode_comparisons"]["fused_vs_two_pass"]:
                print(f"{m['name']:44s} merged in the launch {m['fused_us']:8.2f} us, two-pass {m['two_pass_us']:8.2f} us "
                      f"({m['splits']} splits): {m['faster']}", flush=True)
            for p in result["decode_comparisons"]["kv_bytes_per_second_vs_bf16"]:
                print(f"{p['name']:44s} KV {p['kv_tb_s']:6.3f} TB/s, {p['vs_bf16']:5.2f} x bf16's", flush=True)
    result["elapsed_s"] = round(time.perf_counter() - b.started, 1)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else result["device"].replace("NVIDIA ", "").replace(" ", "_").lower()
    if set(sections) != set(SECTIONS):  # a partial run never overwrites the full run's file
        tag += "_" + "_".join(sections)
    if policy is not None:
        result["gemv_policy"] = policy
        print("gemv_tuned.json:", json.dumps(policy), flush=True)
        if not args.smoke:  # the shipped table with this GPU's entry replaced: ready to copy over it
            table = json.loads(TUNED_TABLE.read_text(encoding="utf-8")) if TUNED_TABLE.exists() else {}
            table[result["device"]] = policy
            (out_dir / "gemv_tuned.json").write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    (out_dir / f"engine_kernels_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_dir} in {result['elapsed_s']} s", flush=True)


if __name__ == "__main__":
    main()
