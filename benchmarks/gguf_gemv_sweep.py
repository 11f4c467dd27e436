"""Decode GEMV sweep for GGUF weights (Q4_K, Q5_K, Q6_K, Q8_0) at Devstral Small's shapes and Mixtral's
dense ones, M in {1, 2, 4, 8}.

For each (type, shape, M) it times every candidate -- the streaming GEMV (kernels/gguf_gemv_wide.py)
over tile shapes, split-K counts and (at one row) pipeline depths, with float activations, with int8
ones quantized in its threads ("wide_i8") or once beforehand ("wide_xq"), then the float GEMV and the
integer-dot GEMV at their current tuned configs -- checks each output against the exactly dequantized weight times x (fp32), and
reports microseconds, effective GB/s (bytes of quantized weights read / time) and % of the measured
copy bandwidth (the physical limit). Winners become the "gguf_decode" table that
kernels/gguf_config.py reads; the merged tuned table is written next to the JSON
(tuned_nvidia_h200.json: copy it to src/devstral/kernels/tuned/nvidia_h200.json). A weights-only decode estimate for
Devstral Small Q4_K_M and Q8_0 is compared with llama.cpp's measured decode on the same GPU
(benchmarks/results/llamacpp_h200.json) and with the bandwidth limit.

Timing: CUDA events around each call, replayed from a CUDA graph as the engine runs decode (--eager:
plain calls, which charge a two-launch candidate the host's latency between its launches), L2 flushed
before each (a 256 MiB read), median of --reps (>= 20). A matrix under 64 MiB is timed as 8 calls on
distinct copies in one graph, per call (a lone replay's own cost would swamp a 6-9 us GEMV).
--after-us U times each call of a matrix under 64 MiB at one row after a U-microsecond kernel launched
before it in the same graph, as the engine's small GEMVs follow a latency-bound kernel (the attention,
a norm) under programmatic dependent launch: a GEMV that issues all its weight loads before it waits
(one K-tile a program, gguf_gemv_wide.one_tile) gets them in flight meanwhile, which a lone call cannot
show (H200: o_proj one tile a program took 4.2 us a call in the engine against 7.75, though the lone
sweep ranked it below); its time is then the run's minus the busy kernels' alone, per call, and an xq
kind's activations are quantized beforehand and offered, as the RMSNorm does.
--tma-only times the TMA GEMV (kernels/gguf_gemv_tma.py; its configs are also in the full sweep at one row:
split-K and stream-K, the K-quants' also with their super-block scales read as words of two, Q4_K's also with its
scales and mins in one box) against the tuned table's entry.
--wider-tiles adds tiles of twice the sub-blocks a row (they won Q4_K gate/up and ffn_down and Q6_K
ffn_down on the H200); --wider-tiles 2,4 adds four times too. --only limits the run to type:shape pairs. Triton compiles in --compile-workers
processes first (Triton's disk cache then serves the sweep); --budget-s bounds the whole run. JSON:
$OUT/gguf_gemv_sweep.json when OUT is set, else benchmarks/results/.

    python benchmarks/gguf_gemv_sweep.py [--budget-s 150] [--reps 25]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from devstral.kernels import (  # noqa: E402
    gguf_config,
    gguf_dequant,
    gguf_gemv,
    gguf_gemv_tma,
    gguf_gemv_wide,
    gguf_idot,
    gguf_xq,
    pdl,
)
from devstral.kernels.gguf_decode import qt_code  # noqa: E402
from devstral.kernels.gguf_pack import pack  # noqa: E402
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait  # noqa: E402
from devstral.quant import QType  # noqa: E402
from devstral.quant.layout import block_info  # noqa: E402

# the matmuls of a decode step as the engine runs them: q/k/v fused into one weight when they share a
# type, else q/k fused and v alone; gate/up fused (model/transformer.fused_projection)
SHAPES = {"attn_qkv": (6144, 5120), "attn_qk": (5120, 5120), "attn_kv": (1024, 5120), "attn_o": (5120, 4096),
          "ffn_gate_up": (65536, 5120), "ffn_down": (5120, 32768), "output": (131072, 5120),
          # Mixtral 8x7B's dense matrices (its experts run kernels/moe_gemv.py): q and o, k and v fused,
          # the head (a llama.cpp Q4_K_M keeps attn_output in Q5_K and attn_k/attn_v in Q8_0 there)
          "mixtral_attn_q": (4096, 4096), "mixtral_attn_o": (4096, 4096), "mixtral_attn_kv": (2048, 4096),
          "mixtral_output": (32000, 4096)}
# what a Q4_K_M file holds: Q4_K everywhere but attn_v / ffn_down in about half the layers / the head (Q6_K)
TYPE_SHAPES = {"Q4_K": ["attn_qkv", "attn_qk", "attn_o", "ffn_gate_up", "ffn_down", "mixtral_attn_q"],
               "Q6_K": ["attn_kv", "ffn_down", "output", "mixtral_output"],
               "Q8_0": ["attn_qkv", "attn_o", "ffn_gate_up", "ffn_down", "output", "mixtral_attn_kv"],
               # a Q5_K_M file: Q5_K everywhere but the Q6_K layers (Mixtral's Q4_K_M keeps attn_output in Q5_K)
               "Q5_K": ["mixtral_attn_o", "attn_qkv", "attn_o", "ffn_gate_up", "ffn_down"]}
MS = (1, 2, 4, 8)
# streaming GEMV row tiles (BN, num_warps) per activation-row tile BM: 8 or 4 rows per thread at BM = 1,
# 4 or 2 with more activation rows (8 spill registers there: SASS counted offline)
WIDE_TILES = {1: ((128, 4), (256, 8), (64, 4)), 2: ((64, 4), (128, 8), (32, 2)), 4: ((64, 4), (32, 4), (64, 8))}
# the same GEMV with int8 activations (dp4a) keeps fewer registers per row: 16 rows a thread fit at BM = 1
WIDE_I8_TILES = {1: ((128, 4), (256, 4), (256, 8)), 2: ((64, 4), (128, 4), (128, 8)), 4: ((64, 4), (32, 4), (128, 8))}
# with the activations quantized beforehand (gguf_xq.py: fewer registers, no per-thread quantization to amortize)
WIDE_XQ_TILES = {1: ((64, 4), (128, 4), (256, 4)), 2: ((64, 4), (128, 4), (128, 8)), 4: ((64, 4), (32, 4), (128, 8))}
I8_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0")
# software-pipelined variants (num_stages > 1: tiles through shared memory by cp.async, no register
# prefetch, 78-146 registers where the register-prefetch loop takes 123-238: counted offline) at one
# activation row, where decode spends its time; their tiles (BN, num_warps)
PIPE_STAGES = (3, 4)
# --wider-tiles F,..: also F times the sub-blocks per row and tile (a warp then reads 256-512 contiguous
# bytes of a row per load, not 128), at 1/F the rows
WIDER_TILES: tuple[int, ...] = ()
PIPE_TILES = ((64, 4), (128, 4), (128, 8), (256, 8))
# small matrices (q/k/v, o: K <= 8192) at one activation row: a pipeline as deep as the program's tiles,
# so that every load of a program is issued at once. Their time is mostly DRAM round trips (launch, the
# first tile, each later tile of a register-prefetch loop, split-K's two), not bytes: 12-14 us for
# 4-18 MB whatever the tile (ncu: 11-30% of DRAM bandwidth, 0.7-0.9 waves).
DEEP_TILES = ((16, 4), (32, 4), (64, 4))
DEEP_MAX_K = 8192
# stream-K at one activation row (gguf_gemv_wide.gemv(stream=...)): tiles (BN, NS, num_warps) and programs
# per SM. A split-K grid rarely fills whole waves (ffn_down: 40 row tiles x 7 = 280 programs for 264
# slots, ncu: 1.06 waves); stream-K's grid is whole waves by construction.
STREAM_TILES = ((128, 16, 4), (128, 8, 4), (64, 16, 4), (256, 8, 4))
STREAM_PER_SM = (1, 2, 3, 4)
F16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}
FLUSH_BYTES = 256 << 20
RUN, RUN_BYTES = 8, 64 << 20  # matrices under RUN_BYTES are timed as RUN back-to-back calls (see sweep())
CUDA = torch.device("cuda")
PEER = Path(__file__).parent / "results" / "llamacpp_h200.json"


def random_gguf(qtype: str, n: int, k: int, seed: int) -> torch.Tensor:
    """Random valid blocks (any bit pattern is valid) with finite fp16 scales, made on the GPU."""
    bs, ts = block_info(QType[qtype])
    g = torch.Generator(device=CUDA).manual_seed(seed)
    raw = torch.randint(0, 256, (n * k // bs, ts), dtype=torch.uint8, device=CUDA, generator=g)
    for off in F16_FIELDS[qtype]:
        d = (torch.rand(raw.shape[0], device=CUDA, generator=g) * 0.004 + 5e-4).to(torch.float16)
        raw[:, off:off + 2] = d.view(torch.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


STREAM_ONLY = False  # --stream-only: the stream-K configs against the tuned table's current entry
TMA_ONLY = False  # --tma-only: the TMA GEMV's configs against the tuned table's current entry
# the TMA GEMV (kernels/gguf_gemv_tma.py) at one activation row: tiles (BN, NS, num_warps) where the weight's rows
# allow TMA boxes (gguf_gemv_tma.fits), pipeline depths; shared memory is the stages' tiles (Q4_K at BN 128 NS 16:
# 36 KB a stage), so deeper pipelines go with smaller tiles to keep 2-3 programs an SM
TMA_TILES = ((64, 16, 4), (128, 16, 4), (64, 32, 4), (32, 32, 4), (128, 8, 4), (64, 8, 4), (128, 16, 8))
TMA_STAGES = (2, 3, 4)
# deeper pipelines for the tiles of the first session's winners (Q4_K gate/up: 64 x 16 at 4 stages, the deepest tried)
TMA_DEEP = {(64, 16, 4): (5, 6), (32, 32, 4): (5,)}
# TMA stream-K (whole waves; a row tile's programs add their shares in order): tiles and programs per SM
TMA_STREAM_TILES = ((64, 16, 4), (32, 32, 4), (128, 16, 4), (64, 8, 4))
TMA_STREAM_PER_SM = (1, 2, 3, 4)
# --maxnreg R,..: each TMA config again under those register caps (gguf_gemv_tma.gemv's maxnreg), the stream-K tiles
# also at TMA_STREAM_PER_SM_CAPPED programs an SM, which only a cap lets an SM hold at once
MAXNREG: tuple[int, ...] = ()
TMA_STREAM_PER_SM_CAPPED = (5, 6, 7, 8)
AFTER_US = 0.0  # --after-us: small matrices at one row timed after a busy kernel of that many microseconds


@triton.jit
def _busy_kernel(ns, PDL: tl.constexpr):
    """One program standing for the latency-bound kernel a small GEMV follows in the decode chain: it lets
    its dependent start at once, as those kernels do, then spins for `ns` nanoseconds."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    t0 = globaltimer()
    t = t0
    while t - t0 < ns:
        t = globaltimer()


def busy(ns: int) -> None:
    on = pdl.enabled(CUDA)
    _busy_kernel[(1,)](ns, PDL=on, launch_pdl=on)


def stream_candidates(qtype: str, m: int, n: int, k: int) -> list[tuple[str, dict]]:
    """Stream-K configs, and (to beat) the entry the tuned table holds now for the shape."""
    kinds = gguf_config.WIDE_INT8_KINDS if qtype in I8_TYPES else ("wide",)
    out = [(kind, dict(bn=bn, ns=tns, bm=1, num_warps=w, stream=ps)) for kind in kinds for bn, tns, w in STREAM_TILES
           for ps in STREAM_PER_SM if bn <= n]
    hit = gguf_config.decode_entry(gguf_config.table_for(CUDA), qtype, m, n, k)
    if hit:
        out.append((hit["kind"], {key: v for key, v in hit.items() if key != "kind"}))
    return out


def tma_candidates(qtype: str, m: int, n: int, k: int, sms: int, with_entry: bool) -> list[tuple[str, dict]]:
    """TMA GEMV configs at one activation row (with_entry: and, to beat, the tuned table's entry for the shape)."""
    if m != 1:
        return []
    sb = 16 if qtype == "Q6_K" else 32
    out = []
    for bn, tns, w in TMA_TILES:
        if bn > n or not gguf_gemv_tma.fits(qtype, k, bn, tns):
            continue
        steps = -(-k // (sb * tns))
        for s in split_candidates(-(-n // bn), steps, sms, m):
            out += [("wide_tma", dict(bn=bn, ns=tns, bm=1, split_k=s, num_warps=w, num_stages=st))
                    for st in TMA_STAGES + TMA_DEEP.get((bn, tns, w), ())
                    if -(-steps // s) >= st - 1]  # no deeper than the program's K-tiles
        if (bn, tns, w) in TMA_STREAM_TILES:
            out += [("wide_tma", dict(bn=bn, ns=tns, bm=1, num_warps=w, num_stages=st, stream=ps))
                    for ps in TMA_STREAM_PER_SM for st in TMA_STAGES]
    capped = []
    if MAXNREG:  # every config so far under each cap, and stream-K at the occupancies only a cap allows
        denser = [("wide_tma", dict(bn=bn, ns=tns, bm=1, num_warps=w, num_stages=st, stream=ps))
                  for bn, tns, w in TMA_STREAM_TILES if bn <= n and gguf_gemv_tma.fits(qtype, k, bn, tns)
                  for ps in TMA_STREAM_PER_SM_CAPPED for st in TMA_STAGES[:2]]
        capped = [(kind, dict(cfg, maxnreg=r)) for kind, cfg in out + denser for r in MAXNREG]
    if qtype != "Q8_0":  # each K-quant config again with its super-block scales as words of two (gguf_gemv_tma: pairs)
        out += [(kind, dict(cfg, pairs=True)) for kind, cfg in out]
    # the capped configs plain, and Q4_K's also with its super-block scales as words of two
    out += capped + ([(kind, dict(cfg, pairs=True)) for kind, cfg in capped] if qtype == "Q4_K" else [])
    if with_entry:
        hit = gguf_config.decode_entry(gguf_config.table_for(CUDA), qtype, m, n, k)
        if hit:
            out.append((hit["kind"], {key: v for key, v in hit.items() if key != "kind"}))
    return out


def candidates(qtype: str, m: int, n: int, k: int, sms: int) -> list[tuple[str, dict]]:
    if STREAM_ONLY:
        return stream_candidates(qtype, m, n, k) if m == 1 else []
    if TMA_ONLY:
        return tma_candidates(qtype, m, n, k, sms, with_entry=True)
    out = []
    ns = 8
    bm = gguf_gemv_wide.bm_for(m)
    sb = 16 if qtype == "Q6_K" else 32
    for kind, tile_set in (("wide", WIDE_TILES), ("wide_i8", WIDE_I8_TILES), ("wide_xq", WIDE_XQ_TILES)):
        if kind in gguf_config.WIDE_INT8_KINDS and qtype not in I8_TYPES:
            continue
        # Q6_K sub-blocks are 16 weights: 16 of them make a row's tile one 128-byte line, as 8 do for the others
        tile_set_ns = (ns, 16) if qtype == "Q6_K" and kind != "wide" else (ns,)
        for tile_ns in sorted(set(tile_set_ns) | {f * v for v in tile_set_ns for f in WIDER_TILES}):
            shapes = [(bn, warps, 1) for bn, warps in tile_set[bm]]
            if m == 1:
                shapes += [(bn, warps, st) for bn, warps in PIPE_TILES for st in PIPE_STAGES]
            for bn, warps, stages in shapes:
                if tile_ns == 16 and bn < 64:
                    continue
                bn_t = bn // (tile_ns // ns)  # the same words per thread
                tiles = -(-n // bn_t) * -(-m // bm)
                steps = k // (sb * tile_ns)
                for s in split_candidates(tiles, steps, sms, m if kind != "wide" else 0):
                    if stages > 1 and steps // s < stages:
                        continue  # fewer tiles per program than the pipeline is deep
                    cfg = dict(bn=bn_t, ns=tile_ns, bm=bm, split_k=s, num_warps=warps)
                    out.append((kind, cfg if stages == 1 else dict(cfg, num_stages=stages)))
        if m == 1 and k <= DEEP_MAX_K and kind != "wide":
            out += deep_candidates(kind, n, k, sb)
        if m == 1 and kind != "wide":
            out += [(kind, dict(bn=bn, ns=tns, bm=1, num_warps=w, stream=ps)) for bn, tns, w in STREAM_TILES
                    for ps in STREAM_PER_SM if bn <= n]
    out += tma_candidates(qtype, m, n, k, sms, with_entry=False)
    table = gguf_config.table_for(CUDA)
    gbm = gguf_config.gemv_bm(m)
    hit = table.get("gguf_gemv", {}).get(f"{qtype}|{gbm}|{n}|{k}")
    if hit is None:
        tiles = -(-n // 64) * -(-m // gbm)
        hit = dict(bn=64 if gbm == 1 else 32, ns=gguf_config.GEMV_NS[qtype], bm=gbm,
                   split_k=gguf_config.split_k(tiles, k // (sb * gguf_config.GEMV_NS[qtype]), sms), num_warps=4)
    out.append(("gemv", dict(hit, bm=gbm)))
    if qtype not in gguf_config.IDOT_TYPES:
        return out
    ibm = gguf_config.idot_bm(m)
    hit = table.get("gguf_idot", {}).get(f"{qtype}|{ibm}|{n}|{k}")
    if hit is None:
        tiles = -(-n // 32)
        ins = gguf_config.IDOT_NS[qtype]
        hit = dict(bn=64 if ibm <= 2 else 32, ns=ins, bm=ibm, split_k=gguf_config.split_k(tiles, k // (sb * ins), sms),
                   num_warps=4)
    out.append(("idot", dict(hit, bm=ibm)))
    return out


def deep_candidates(kind: str, n: int, k: int, sb: int) -> list[tuple[str, dict]]:
    """Configs whose pipeline holds all of a program's tiles (see DEEP_TILES)."""
    out = []
    for tile_ns in (16, 32):
        steps = k // (sb * tile_ns)
        for bn, warps in DEEP_TILES:
            for s in (1, 2, 4):
                per = -(-steps // s)
                if 2 <= per <= 12 and bn <= n:
                    out.append((kind, dict(bn=bn, ns=tile_ns, bm=1, split_k=s, num_warps=warps, num_stages=per + 1)))
    return out


def split_candidates(tiles: int, k_steps: int, sms: int, m: int) -> list[int]:
    """split-K counts to time: the rule's (about two programs per SM) halved and doubled, and at one
    activation row also counts that make the grid close to whole waves of 2-4 resident programs per
    SM (a grid of 1.6 waves leaves 40% of the SMs idle in its second wave: measured with ncu on the
    Q6_K ffn_down at split 32)."""
    s0 = gguf_config.split_k(tiles, k_steps, sms)
    cands = {max(1, s0 // 2), s0, min(32, s0 * 2)}
    if m == 1 and k_steps <= 48 and tiles * k_steps <= 4 * sms:
        cands.add(k_steps)  # one K-tile a program: its weights all loaded before the dependent launch's wait
        for per_sm in (2, 3, 4, 6):
            # rounded down too: one program more than the slots makes a second wave of one program
            for s in {round(per_sm * sms / tiles), per_sm * sms // tiles}:
                if 1 <= s <= 48 and k_steps // s >= 2:
                    cands.add(s)
    return sorted(cands)


KERNELS = {"wide": gguf_gemv_wide.gemv, "wide_i8": functools.partial(gguf_gemv_wide.gemv, int8=True),
           # timed with its quantization launch (gguf_xq.quantize), as the model runs it
           "wide_xq": functools.partial(gguf_gemv_wide.gemv, int8=True, xq=True),
           "gemv": gguf_gemv.gemv, "idot": gguf_idot.gemv, "wide_tma": gguf_gemv_tma.gemv}


def groups() -> list[tuple[str, str]]:
    return [(t, s) for t, shapes in TYPE_SHAPES.items() for s in shapes]


def measure_copy() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s), median of 10."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=CUDA)
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del a, b
    return 2 * (1 << 30) / (statistics.median(times[2:]) * 1e-3) / 1e9


def time_us(fn, flush: torch.Tensor, reps: int, graph: bool = True) -> float:
    """Median microseconds of fn() over reps calls, each after an L2 flush, each timed by CUDA events.

    graph: fn is captured once into a CUDA graph and the graph replayed, as the engine runs decode, so
    a candidate of two launches (wide_xq: quantize, then GEMV) is not charged the host's launch latency
    between them. A capture that fails falls back to eager calls."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    fn()
    run = fn
    if graph:
        try:
            # capture by hand on a side stream: torch.cuda.graph() also runs gc.collect() and
            # empty_cache() on entry, which over a thousand candidates costs tens of seconds
            g, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                g.capture_begin()
                try:
                    fn()
                finally:
                    g.capture_end()
            torch.cuda.current_stream().wait_stream(side)
            run = g.replay
        except RuntimeError:
            torch.cuda.synchronize()
            run = fn
    for i in range(reps):
        # a read, not a write: a written buffer leaves L2 full of dirty lines whose write-back the
        # measured kernel would pay (up to 50 MB: ~12 us at 4 TB/s). In the engine L2 holds clean lines.
        flush.max()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1000 for s, e in zip(starts, ends, strict=True))


def compile_key(qtype: str, m: int, n: int, k: int, kind: str, cfg: dict) -> tuple:
    """What makes Triton compile anew: the constexprs, and the integer arguments it specializes
    (equal to 1, divisible by 16: M, and K's multiples through the row strides)."""
    return (kind, qtype, m == 1, cfg["bm"], cfg["bn"], cfg["ns"], cfg.get("num_warps", 4), cfg.get("num_stages", 1),
            cfg.get("split_k", 1) > 1, cfg.get("stream", 0) > 0, cfg.get("pairs", False),
            cfg.get("maxnreg"),
            k % 4096, n % 256)


def sweep(args, work: list[tuple[str, str]], sms: int, dry: bool, t0: float, copy_gbps: float,
          shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Time every candidate (dry: run each compile key of this shard once, to fill Triton's cache)."""
    rows, seen = [], {}
    flush = None if dry else torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=CUDA)
    for gi, (qtype, shape) in enumerate(work):
        if not dry and time.time() - t0 > args.budget_s - 8:
            print(f"budget of {args.budget_s:.0f} s reached: {qtype} {shape} and later skipped", flush=True)
            break
        n, k = SHAPES[shape]
        if dry:
            mine = []
            for m in MS:
                for kind, cfg in candidates(qtype, m, n, k, sms):
                    key = compile_key(qtype, m, n, k, kind, cfg)
                    if key not in seen:
                        seen[key] = len(seen)
                        if seen[key] % shard[1] == shard[0]:
                            mine.append((m, kind, cfg))
            if not mine:
                continue
        raw = random_gguf(qtype, n, k, seed=gi)
        p = pack(raw, QType[qtype], n, k)
        wbytes = p.nbytes()
        del raw
        # a small matrix is timed as a run of calls on distinct copies in one graph, as the engine runs it
        # between other kernels: one graph replay alone costs a few us of its own, which a 6-9 us GEMV
        # (q/k/v, o) would be charged in full (the copies are read once each: no L2 reuse within a run)
        copies = [p] + ([] if dry or wbytes >= RUN_BYTES else
                        [pack(random_gguf(qtype, n, k, seed=1000 * gi + c), QType[qtype], n, k) for c in range(1, RUN)])
        dense = None if dry else gguf_dequant.dequantize(p, dtype=torch.float32)  # exact
        after = not dry and AFTER_US > 0 and wbytes < RUN_BYTES  # timed after a busy kernel (--after-us)
        ns = int(AFTER_US * 1000)
        def busy_run(ns=ns, calls=len(copies)):
            for _ in range(calls):
                busy(ns)

        base_us = time_us(busy_run, flush, args.reps) if after else 0.0
        for m in MS:
            x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
            ref = None if dry else x.float() @ dense.t()
            if after and m == 1:  # an xq kind's activations as the RMSNorm before it leaves them
                layout = gguf_xq.layout_for(qt_code(p.qtype))
                gguf_xq.offer(x, {layout: gguf_xq.quantize(x, layout)})
            for kind, cfg in candidates(qtype, m, n, k, sms):
                if dry and (m, kind, cfg) not in mine:
                    continue
                out = torch.empty(m, n, device=CUDA, dtype=torch.bfloat16)
                fn = lambda kind=kind, cfg=cfg, out=out, x=x, w=p: KERNELS[kind](x, w, None, out, **cfg)  # noqa: E731

                def run(kind=kind, cfg=cfg, out=out, x=x, ws=copies, lead=after and m == 1, ns=ns):
                    for w in ws:
                        if lead:
                            busy(ns)
                        KERNELS[kind](x, w, None, out, **cfg)
                row = dict(fmt=qtype, shape=shape, n=n, k=k, m=m, kind=kind, config=cfg)
                try:
                    fn()
                    if dry:
                        continue
                    torch.cuda.synchronize()
                    rel = float((out.float() - ref).norm() / ref.norm())
                    us = time_us(run, flush, args.reps, graph=not args.eager)
                    us = (us - (base_us if after and m == 1 else 0.0)) / len(copies)
                    if after and m == 1:
                        row["after_us"] = AFTER_US
                except Exception as e:  # a config the GPU refuses (registers, shared memory) is reported
                    if dry:
                        continue
                    rows.append(dict(row, error=f"{type(e).__name__}: {str(e)[:200]}"))
                    continue
                gbps = wbytes / us / 1e3
                ok = rel < (2e-2 if kind in gguf_config.INT8_KINDS else 6e-3)  # bf16 output; int8 activations
                rows.append(dict(row, us=round(us, 2), GBps=round(gbps, 1), pct_of_copy=round(100 * gbps / copy_gbps, 1),
                                 weight_bytes=wbytes, rel_err=rel, ok=ok))
        if not dry:
            best = [r for r in rows if r["fmt"] == qtype and r["shape"] == shape and r.get("ok")]
            for m in MS:
                b = min((r for r in best if r["m"] == m), key=lambda r: r["us"], default=None)
                if b:
                    print(f"{qtype} {shape:12s} M={m}: {b['kind']:5s} {b['us']:8.2f} us {b['GBps']:7.0f} GB/s "
                          f"({b['pct_of_copy']:.0f}% of copy) {b['config']}", flush=True)
        del p, dense, copies
        torch.cuda.empty_cache()
    return rows


def winners(rows: list[dict]) -> dict:
    best = {}
    for r in rows:
        if not r.get("ok"):
            continue
        key = f"{r['fmt']}|{r['m']}|{r['n']}|{r['k']}"
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    return best


def measured_kinds(rows: list[dict], table: dict) -> dict:
    """The tuned table's per-type "kinds" (the path for shapes without a "gguf_decode" entry) at M = 1,
    2, 4: the GEMV kind with the least time summed over the swept shapes, each at its best config.
    Other M keep what benchmarks/quant_kernels.py measured (it also times the GEMM paths)."""
    kinds = {t: dict(v) for t, v in table.get("kinds", {}).items()}
    for qtype in TYPE_SHAPES:
        for m in (1, 2, 4):
            per = {}
            for r in rows:
                # the TMA GEMV is taken per shape only (its tiles must fit the shape's rows: gguf_gemv_tma.fits)
                if r.get("ok") and r["fmt"] == qtype and r["m"] == m and r["kind"] != "wide_tma":
                    shape = per.setdefault(r["kind"], {})
                    shape[r["shape"]] = min(shape.get(r["shape"], float("inf")), r["us"])
            full = [k for k, v in per.items() if len(v) == len(TYPE_SHAPES[qtype])]
            streaming = ("gemv", "idot", "wide", *gguf_config.WIDE_INT8_KINDS)
            if full and kinds.get(qtype, {}).get(str(m), "gemv") in streaming:
                kinds.setdefault(qtype, {})[str(m)] = min(full, key=lambda k: sum(per[k].values()))
    return kinds


def summary(rows: list[dict], best: dict) -> dict:
    """Per (type, shape, M): the winner against the float GEMV and the integer-dot GEMV as configured before."""
    out = {}
    for key, b in best.items():
        same = [r for r in rows if r.get("ok") and f"{r['fmt']}|{r['m']}|{r['n']}|{r['k']}" == key]
        old = {kind: min((r["us"] for r in same if r["kind"] == kind), default=None) for kind in ("gemv", "idot")}
        prev = min((v for v in old.values() if v is not None), default=None)
        out[f"{b['fmt']}|{b['shape']}|{b['m']}"] = dict(
            kind=b["kind"], us=b["us"], GBps=b["GBps"], pct_of_copy=b["pct_of_copy"], config=b["config"],
            previous_us=prev, speedup_vs_previous=round(prev / b["us"], 2) if prev else None)
    return out


def decode_estimate(best: dict, copy_gbps: float, layers: int = 40) -> dict:
    """Weights-only time per token at M = 1 from the winners, next to llama.cpp and the bandwidth limit."""
    def t(fmt, shape):
        n, k = SHAPES[shape]
        b = best.get(f"{fmt}|1|{n}|{k}")
        return None if b is None else (b["us"], b["weight_bytes"])

    mixes = {
        # Q4_K_M (llama.cpp's rule): q, k, o, gate, up Q4_K; v Q6_K; ffn_down Q6_K in about half the layers
        "Q4_K_M": [("Q4_K", "attn_qkv", 0.5), ("Q4_K", "attn_qk", 0.5), ("Q6_K", "attn_kv", 0.5),
                   ("Q4_K", "attn_o", 1), ("Q4_K", "ffn_gate_up", 1), ("Q4_K", "ffn_down", 0.5),
                   ("Q6_K", "ffn_down", 0.5)],
        "Q8_0": [("Q8_0", "attn_qkv", 1), ("Q8_0", "attn_o", 1), ("Q8_0", "ffn_gate_up", 1), ("Q8_0", "ffn_down", 1)],
    }
    heads = {"Q4_K_M": ("Q6_K", "output"), "Q8_0": ("Q8_0", "output")}
    peer = {}
    if PEER.is_file():
        for name, f in json.loads(PEER.read_text()).get("files", {}).items():
            tg = [r["avg_ts"] for r in f.get("rows", []) if r.get("n_gen") and not r.get("n_depth")]
            if tg:
                peer[name] = round(tg[0], 1)
    est = {}
    for name, mix in mixes.items():
        parts = [(t(f, s), c) for f, s, c in mix] + [(t(*heads[name]), 1 / layers)]
        if any(p is None for p, _ in parts):
            continue
        us = layers * sum(p[0] * c for p, c in parts)
        nbytes = layers * sum(p[1] * c for p, c in parts)
        est[name] = {"weights_us_per_token": round(us, 1), "tok_per_s": round(1e6 / us, 1),
                     "bandwidth_limit_tok_per_s": round(copy_gbps * 1e9 / nbytes, 1),
                     "llamacpp_tok_per_s": peer.get(name),
                     "vs_llamacpp": round(1e6 / us / peer[name], 2) if peer.get(name) else None}
    return est


def warm_compile(args, workers: int) -> float:
    t = time.time()
    cmd = [sys.executable, __file__, "--dry-run", "--ms", args.ms, "--only", args.only,
           f"--wider-tiles={args.wider_tiles}", *(["--stream-only"] if args.stream_only else []),
           *(["--tma-only"] if args.tma_only else []), f"--maxnreg={args.maxnreg}"]
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/{workers}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(workers)]
    deadline = t + args.budget_s * 0.5
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            err = "timed out"
        if p.returncode:
            print(f"compile worker failed (the sweep compiles what is missing): {err[-400:]}", flush=True)
    return time.time() - t


def main() -> None:
    global MS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--ms", default="1,2,4,8", help="activation rows to measure, comma-separated")
    ap.add_argument("--only", default="", help="type:shape pairs to measure, comma-separated (default: all)")
    ap.add_argument("--wider-tiles", nargs="?", const="2", default="",
                    help="also time tiles of F times the sub-blocks per row (factors, comma-separated; bare: 2)")
    ap.add_argument("--eager", action="store_true", help="time eager calls, not CUDA-graph replays")
    ap.add_argument("--compile-workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--stream-only", action="store_true",
                    help="time only the stream-K configs, against the tuned table's current entry per shape")
    ap.add_argument("--tma-only", action="store_true",
                    help="time only the TMA GEMV's configs (one row), against the tuned table's current entry per shape")
    ap.add_argument("--maxnreg", default="", help="TMA configs also under these register caps, comma-separated")
    ap.add_argument("--after-us", type=float, default=0.0,
                    help="time matrices under 64 MiB at one row after a busy kernel of this many us (see above)")
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    args.reps = max(20, args.reps)
    MS = tuple(int(v) for v in args.ms.split(","))
    global WIDER_TILES, STREAM_ONLY, TMA_ONLY, AFTER_US, MAXNREG
    MAXNREG = tuple(int(v) for v in args.maxnreg.split(",") if v)
    WIDER_TILES = tuple(int(v) for v in args.wider_tiles.split(",") if v)
    STREAM_ONLY = args.stream_only
    TMA_ONLY = args.tma_only
    AFTER_US = args.after_us
    only = {tuple(v.split(":")) for v in args.only.split(",") if v}
    work = [g for g in groups() if not only or g in only]
    t0 = time.time()
    sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    if args.dry_run:  # a compile worker: run its share of the groups once
        i, n = (int(v) for v in args.shard.split("/"))
        sweep(args, work, sms, True, t0, 1.0, (i, n))
        return
    compile_s = warm_compile(args, args.compile_workers) if args.compile_workers > 1 else 0.0
    copy_gbps = measure_copy()
    print(f"{torch.cuda.get_device_name(CUDA)}: copy {copy_gbps:.0f} GB/s (read + write); compile {compile_s:.0f} s",
          flush=True)
    rows = sweep(args, work, sms, False, t0, copy_gbps)
    best = winners(rows)
    device = torch.cuda.get_device_name(CUDA)
    # the table this GPU runs now: its own, or a sibling's (same capability and SM count), whose entries the new
    # table keeps where this run measured nothing
    table = gguf_config.table_for(CUDA)
    own = {"device": device, "capability": list(torch.cuda.get_device_capability(CUDA)), "sms": sms}
    if table.get("device", device) != device:
        own["inherited_from"] = table["device"]
    # shapes measured here replace their entries; others (unfused q, gate, up: LoRA-wrapped or other
    # models) keep the earlier measurement
    decode = {**table.get("gguf_decode", {}),
              **{key: dict(kind=r["kind"], **r["config"]) for key, r in best.items()}}
    result = {
        "benchmark": "gguf_gemv_sweep", "device": device, "sms": sms, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "copy_GBps": round(copy_gbps, 1), "reps": args.reps,
        "timing": ("CUDA events per call" if args.eager else "CUDA events per CUDA-graph replay of the call")
                  + ", L2 flushed before each, median"
                  + (f"; matrices under 64 MiB at one row after a {AFTER_US} us busy kernel (its time taken off)"
                     if AFTER_US else ""), "compile_s": round(compile_s, 1),
        "elapsed_s": round(time.time() - t0, 1),
        "decode_estimate": decode_estimate(best, copy_gbps), "summary": summary(rows, best),
        "wrong": [r for r in rows if "us" in r and not r["ok"]], "errors": [r for r in rows if "error" in r],
        "tuned": {"gguf_decode": decode}, "rows": rows,
    }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, body in ((out_dir / "gguf_gemv_sweep.json", result),
                       (out_dir / f"tuned_{gguf_config._slug(device)}.json",
                        {**table, **own, "kinds": measured_kinds(rows, table), "gguf_decode": decode})):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(body, indent=1))
        tmp.replace(path)
        print(f"wrote {path}")
    print(json.dumps({"decode_estimate": result["decode_estimate"], "wrong": len(result["wrong"]),
                      "errors": len(result["errors"]), "elapsed_s": result["elapsed_s"]}, indent=1))


if __name__ == "__main__":
    main()
