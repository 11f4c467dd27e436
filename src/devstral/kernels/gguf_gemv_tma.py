"""Decode GEMV whose weight tiles arrive by bulk tensor copies (TMA) into a multi-stage shared-memory pipeline.

Why: Nsight Compute on the H200 (docs/architecture.md, `ncu_gguf_gemv_h200_s15.txt`) shows the streaming GEMV
(gguf_gemv_wide.py) latency-bound on its big matrices: a scheduler issues 0.32-0.41 instructions a cycle, has no
eligible warp 59-68% of cycles, and half of each warp's stall is waiting for global loads. Its register-prefetch loop
keeps one tile ahead in 228-234 registers, two programs an SM; its cp.async pipeline (num_stages > 1) lost on the
K-quants because their one-byte scales cannot go by cp.async and stay synchronous loads in every iteration.

Here every field whose rows allow it -- the quant words, Q6_K's high bits, the sub-block scales and mins, Q8_0's
scales -- is a TMA tensor (`TensorDescriptor`: 16-byte aligned rows, a box of at least 16 bytes a row), so one
thread's instruction moves a whole [BN, tile] box into shared memory and Triton's pipeliner keeps num_stages - 1
tiles in flight per program without registers. Only the K-quants' fp16 super-block scales (K / 128 bytes a row:
not 16-byte aligned at K = 5120) stay plain loads, four bytes a row a tile. The arithmetic is the streaming GEMV's
xq row dot (gguf_gemv_wide.row_dot_xq on activations quantized once by gguf_xq.py), split-K with its deterministic
epilogue (gguf_splitk.py) or stream-K as the streaming GEMV's (whole waves; a row tile's programs add their shares
in order). One activation row (decode at batch 1). Under dependent launch it waits before its first load: the
pipeline's prologue reads activations too.

Not chosen by any rule: the tuned table names it ("wide_tma") where benchmarks/gguf_gemv_sweep.py measured it
fastest for a shape. On the H200 that is the big matrices but Q4_K gate/up and Q8_0 ffn_down (Q6_K output 133 us
against the register loop's 165, 99% of the copy bandwidth); the small ones lose the register loop's head start
under dependent launch. `reference` is gguf_gemv_wide.reference (the same arithmetic).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from devstral.kernels import gguf_xq, pdl
from devstral.kernels.gguf_decode import GEOMETRY, qt_code
from devstral.kernels.gguf_gemv_wide import (
    fixed_buffers,
    row_dot_xq,
    stream_programs,
    stream_shares,
    tile_scales,
)
from devstral.kernels.gguf_pack import PackedGGUF
from devstral.kernels.gguf_splitk import counters, store_output, store_share, usable_split, workspace
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait

TMA_MIN_BOX_BYTES = 16  # a box row (and every row stride) is a multiple of 16 bytes
# launch-config keys only this kernel takes: dropped where the register-loop GEMV runs a "wide_tma" entry instead
TMA_ONLY_KEYS = ("num_stages", "pairs", "maxnreg")


@triton.jit
def _sub_block_scales(ptr, rows, row_ok, s_d, t, K, BN: tl.constexpr, NS: tl.constexpr, NSB: tl.constexpr,
                      PAIRS: tl.constexpr):
    """The NSB fp16 super-block scales of tile t of each row (K / 128 bytes a row: not a TMA field), masked past K,
    repeated for each of their sub-blocks: [BN, NS]. PAIRS: ptr and s_d address the scales as 4-byte words of two
    (an even count a row, an even NSB): cp.async copies four bytes or more, so only then does the pipeline prefetch
    them with the tile; two-byte loads stay synchronous, a DRAM round trip in every iteration."""
    if PAIRS:
        wi = t * (NSB // 2) + tl.arange(0, NSB // 2)[None, :]
        w = tl.load(ptr + rows[:, None] * s_d + wi, mask=row_ok & (wi * 512 < K), other=0)
        lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        v = tl.reshape(tl.join(lo, hi), (BN, NSB))  # word i holds scales 2i (low half) and 2i + 1
    else:
        sb = t * NSB + tl.arange(0, NSB)[None, :]
        v = tl.load(ptr + rows[:, None] * s_d + sb, mask=row_ok & (sb * 256 < K), other=0.0)
    return tl.reshape(tl.broadcast_to(v[:, :, None], (BN, NSB, NS // NSB)), (BN, NS))


@triton.jit
def _sub_block_mins(mn_desc, r0, t, BN: tl.constexpr, NS: tl.constexpr):
    """Q4_K's mn plane for tile t as gguf_gemv_wide._scales takes it: 16-bit words of four sub-blocks' nibbles,
    [BN, NS // 4]. The box is max(NS // 4, 8) words a row (a TMA box row is 16 bytes at least). At NS = 16 a tile has
    8 bytes of them: the box starts on a 16-byte boundary (Triton's interpreter requires it of a box's start; on the
    GPU two tiles then read one box) and holds tiles 2i and 2i + 1, of which this tile's half is kept."""
    if NS // 4 < 8:
        tl.static_assert(NS == 16, "Q4_K TMA tiles of 16 sub-blocks or more (the scales' box is NS bytes a row)")
        pair = tl.permute(tl.reshape(mn_desc.load([r0, (t // 2) * 8]), (BN, 2, NS // 4)), (0, 2, 1))
        even, odd = tl.split(pair)
        h = tl.where(t % 2 == 0, even, odd)
    else:
        h = mn_desc.load([r0, t * (NS // 4)])
    return h.to(tl.uint16, bitcast=True)


@triton.jit
def _row_tile(xq_ptr, q_desc, qh_desc, sc_desc, mn_desc, d_ptr, dm_ptr, r0, t_lo, t_hi, N, K, s_d,
              QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr,
              NSB: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, PAIRS: tl.constexpr):
    """Rows r0..r0+BN-1 summed over K-tiles t_lo..t_hi-1 through the TMA pipeline: [BN, 1]."""
    rows = r0 + tl.arange(0, BN)
    row_ok = rows[:, None] < N
    acc = tl.zeros((BN, NS), dtype=tl.float32)
    for t in tl.range(t_lo, t_hi, num_stages=STAGES):
        words = q_desc.load([r0, t * NS * WPS])  # [BN, NS * WPS]; rows past N come as zeros
        if QT == 2:
            hi = qh_desc.load([r0, t * NS * WPS]).to(tl.int32)
        else:
            hi = words
        if QT == 3:
            d = sc_desc.load([r0, t * NS])  # Q8_0's fp16 scale per block of 32 is a TMA field
            sc = d
            dm = d
            mn = d
        else:
            if QT == 2:
                sc = sc_desc.load([r0, t * NS])
                mn = sc
            else:  # Q4_K: int32 words of four sub-blocks' sc bytes, and their mn nibbles
                sc = sc_desc.load([r0, t * (NS // 4)])
                mn = _sub_block_mins(mn_desc, r0, t, BN, NS)
            d = _sub_block_scales(d_ptr, rows, row_ok, s_d, t, K, BN, NS, NSB, PAIRS)
            if QT == 2:
                dm = d
            else:
                dm = _sub_block_scales(dm_ptr, rows, row_ok, s_d, t, K, BN, NS, NSB, PAIRS)
        c1, c0 = tile_scales(d, sc, dm, mn, QT, BN, NS)
        acc += row_dot_xq(tl.reshape(words, (BN, NS, WPS)), tl.reshape(hi, (BN, NS, WPS)), xq_ptr, t, r0 >= 0, K, c1,
                          c0, QT, SB, NS, WPS, EVEN_K, ASM)
    return tl.sum(acc, axis=1)[:, None]


@triton.jit
def _tma_kernel(xq_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, q_desc, qh_desc, sc_desc, mn_desc, d_ptr, dm_ptr,
                N, K, s_d, SPLIT_K,
                QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr,
                NSB: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr,
                ASM: tl.constexpr, PDL: tl.constexpr, STREAM: tl.constexpr, PAIRS: tl.constexpr,
                FIXED: tl.constexpr = False):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(K // SB, NS)
    if PDL:  # the pipeline's prologue loads activations: wait for the kernel that wrote them first
        gdc_wait()
    if STREAM:
        # stream-K (as gguf_gemv_wide's): G programs, a whole number per SM, share the (row tile, K-tile) units in
        # row-tile order, an equal contiguous run each; a row tile held by several is summed by the last of them
        G = tl.num_programs(0)
        units = tl.cdiv(N, BN) * n_tiles
        u_lo = (pid * units) // G
        u_hi = ((pid + 1) * units) // G
        for r in range(u_lo // n_tiles, tl.cdiv(u_hi, n_tiles)):
            res = _row_tile(xq_ptr, q_desc, qh_desc, sc_desc, mn_desc, d_ptr, dm_ptr, r * BN,
                            tl.maximum(u_lo - r * n_tiles, 0), tl.minimum(u_hi - r * n_tiles, n_tiles), N, K, s_d,
                            QT, SB, WPS, BN, NS, NSB, EVEN_K, STAGES, ASM, PAIRS)
            g0 = ((r * n_tiles + 1) * G - 1) // units  # the programs sharing row tile r: first and last
            g1 = ((r + 1) * n_tiles * G - 1) // units
            store_share(res, r * BN + tl.arange(0, BN), tl.arange(0, 1), N, 1, out_ptr, 0, bias_ptr, ws_ptr, cnt_ptr,
                        r, pid - g0, g1 - g0 + 1, HAS_BIAS, FIXED)
        if PDL:
            gdc_launch_dependents()
    else:
        pid_k = tl.program_id(1)
        per_split = tl.cdiv(n_tiles, SPLIT_K)
        t_lo = pid_k * per_split
        res = _row_tile(xq_ptr, q_desc, qh_desc, sc_desc, mn_desc, d_ptr, dm_ptr, pid * BN, t_lo,
                        tl.minimum(t_lo + per_split, n_tiles), N, K, s_d, QT, SB, WPS, BN, NS, NSB, EVEN_K, STAGES, ASM,
                        PAIRS)
        if PDL:
            gdc_launch_dependents()
        store_output(res, pid * BN + tl.arange(0, BN), tl.arange(0, 1), N, 1, out_ptr, 0, bias_ptr, ws_ptr, cnt_ptr,
                     pid, pid_k, SPLIT_K, HAS_BIAS, SPLIT, FIXED)


@functools.cache
def fits(qtype: str, k: int, bn: int, ns: int) -> bool:
    """Whether a [*, k] weight of this type can be read as TMA tiles of bn rows and ns sub-blocks: Q4_K, Q6_K or
    Q8_0, every TMA field's row (k over its weights an element) and box row a multiple of 16 bytes (Q4_K: K a
    multiple of 1024 for its mins plane, K / 64 bytes a row; 16 sub-blocks a tile or more for its scales' box), boxes
    of at most 256 elements a side, and the K-quants' tiles whole super-blocks (their fp16 scales' plain loads)."""
    from devstral.kernels.gguf_pack import FORMATS
    from devstral.quant import QType

    if qtype not in ("Q4_K", "Q6_K", "Q8_0"):
        return False
    qt = qt_code(QType[qtype])
    sb, wps, _ = GEOMETRY[qt]
    if bn > 256 or ns * wps > 256 or (qt != 3 and (ns * sb) % 256):
        return False
    per = {name: (dt, weights) for name, dt, weights in FORMATS[QType[qtype]].fields}
    for name, (_, cols) in _box_shapes(qt, bn, ns).items():
        dt, weights = per[name]
        size = torch.empty((), dtype=dt).element_size()
        view = _WORD_VIEWS.get((qt, name))
        if view is not None:  # read as wider words: as many more weights an element
            weights *= torch.empty((), dtype=view).element_size() // size
            size = torch.empty((), dtype=view).element_size()
        if k % weights or ((k // weights) * size) % 16 or (cols * size) % TMA_MIN_BOX_BYTES:
            return False
    return True


def supports(p: PackedGGUF, bn: int, ns: int) -> bool:
    """fits() for this weight, and its TMA fields 16-byte aligned where they start (a row slice may not be)."""
    return fits(p.qtype.name, p.k, bn, ns) and all(p[name].data_ptr() % 16 == 0
                                                    for name in _box_shapes(qt_code(p.qtype), bn, ns))


# Q4_K's sc and mn planes (QT code 0) go by TMA as words, as gguf_gemv_wide._scales decodes them: int32 words of four
# sub-blocks' sc bytes, 16-bit words of their four mn nibbles
_WORD_VIEWS = {(0, "sc"): torch.int32, (0, "mn"): torch.int16}


def _tma_array(p: PackedGGUF, name: str) -> torch.Tensor:
    view = _WORD_VIEWS.get((qt_code(p.qtype), name))
    return p[name] if view is None else p[name].view(view)


def usable(p: PackedGGUF, bn: int, ns: int, device: torch.device) -> bool:
    """supports(), on a device with TMA (sm_90 and later), or under Triton's interpreter (the CPU tests)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return supports(p, bn, ns)
    return device.type == "cuda" and _has_tma(device) and supports(p, bn, ns)


@functools.cache
def _has_tma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _box_shapes(qt: int, bn: int, ns: int) -> dict[str, tuple[int, int]]:
    """The TMA fields of a type (QT code) and their [rows, elements] box for one tile."""
    wps = GEOMETRY[qt][1]
    if qt == 3:
        return {"q": (bn, ns * wps), "d": (bn, ns)}
    if qt == 2:
        return {"q": (bn, ns * wps), "sc": (bn, ns), "qh": (bn, ns * wps)}
    # Q4_K: words (_WORD_VIEWS); the mins plane's ns / 2 bytes a tile in a box of 16 bytes at least (_sub_block_mins)
    return {"q": (bn, ns * wps), "sc": (bn, ns // 4), "mn": (bn, max(ns // 4, TMA_MIN_BOX_BYTES // 2))}


def descriptors(p: PackedGGUF, bn: int, ns: int) -> dict[str, TensorDescriptor]:
    """The weight's TMA descriptors for one tile shape, made once and kept on the weight itself (host objects that
    hold its arrays: kept anywhere else they would keep an unloaded model's GPU memory alive)."""
    cache = p.__dict__.setdefault("_tma_descriptors", {})
    hit = cache.get((bn, ns))
    if hit is None:
        hit = cache[(bn, ns)] = {name: _descriptor(_tma_array(p, name), box)
                                 for name, box in _box_shapes(qt_code(p.qtype), bn, ns).items()}
    return hit


def _descriptor(a: torch.Tensor, box: tuple[int, int]) -> TensorDescriptor:
    return TensorDescriptor(a, list(a.shape), list(a.stride()), list(box))


def gemv(x: torch.Tensor, p: PackedGGUF, bias: torch.Tensor | None, out: torch.Tensor, *, bn: int, ns: int,
         split_k: int = 1, num_stages: int = 3, num_warps: int = 4, glu: bool = False, bm: int = 1,
         stream: int = 0, pairs: bool = False, maxnreg: int | None = None,
         fixed_zero: torch.Tensor | None = None) -> torch.Tensor:
    """out[1, N] = x[1, K] @ W^T (+ bias) with int8 activations (gguf_xq.quantize, the SwiGLU folded in with glu).
    stream > 0: stream-K (stream programs per SM share the row-tile x K-tile units) instead of split_k.
    pairs: the K-quants' super-block scales read as 4-byte words of two where the weight allows, so that the pipeline
    prefetches them (_sub_block_scales); off unless a tuned entry asks. maxnreg: ptxas's register cap a thread (a
    compile option, so its own compilation): the programs an SM can hold are set by registers first (65536 an SM;
    Q6_K 32 x 32 stream-K takes 123 a thread uncapped, four programs of 128 threads, and 80 capped without spilling,
    six), so a tuned entry may trade them for occupancy.
    bm is accepted for the tuned table's entries, which all carry it; only one activation row is served.
    fixed_zero: as gguf_gemv_wide.gemv's (int64 fixed-point out, the other buffer zeroed)."""
    if x.shape[0] != 1 or bm != 1:
        raise ValueError(f"the TMA GEMV serves one activation row, got {x.shape[0]}")
    if not supports(p, bn, ns):
        raise ValueError(f"no TMA tiles of {bn} rows x {ns} sub-blocks for {p.qtype.name} {p.n}x{p.k}")
    qt = qt_code(p.qtype)
    sb, wps, _ = GEOMETRY[qt]
    xq = gguf_xq.quantize(x, gguf_xq.layout_for(qt), glu=glu)
    tiles = triton.cdiv(p.n, bn)
    n_tiles = triton.cdiv(p.k // sb, ns)
    use_stream = False
    if stream:
        g = stream_programs(stream, tiles * n_tiles, x.device)
        shares = stream_shares(tiles * n_tiles, g, n_tiles)
        use_stream = usable_split(shares, tiles, 1, p.n) == shares  # else the split-K launch below
    if use_stream:
        grid, split_k, ws = (g, 1), 1, workspace(shares, 1, p.n, x.device)
    else:
        split_k = usable_split(split_k, tiles, 1, p.n)
        grid, ws = (tiles, split_k), workspace(split_k, 1, p.n, x.device)
    if fixed_zero is not None:
        ws = fixed_buffers(out, fixed_zero, bias, 1, p.n)
    desc = descriptors(p, bn, ns)
    q_desc = desc["q"]
    nsb = ns if qt == 3 else ns * sb // 256
    d_ptr, dm_ptr, pairs = _super_block_scales(p, nsb, pairs)
    sc_desc = desc["d"] if qt == 3 else desc["sc"]
    on = pdl.enabled(x.device)
    _tma_kernel[grid](
        xq, out, bias if bias is not None else out, ws, counters(x.device),
        q_desc, desc.get("qh", q_desc), sc_desc, desc.get("mn", q_desc), d_ptr, dm_ptr,
        p.n, p.k, d_ptr.stride(0), split_k,
        QT=qt, SB=sb, WPS=wps, BN=bn, NS=ns, NSB=nsb, SPLIT=split_k > 1, HAS_BIAS=bias is not None,
        EVEN_K=p.k % (ns * sb) == 0, STAGES=num_stages, ASM=os.environ.get("TRITON_INTERPRET") != "1", PDL=on,
        STREAM=use_stream, PAIRS=pairs, FIXED=fixed_zero is not None, num_warps=num_warps, num_stages=num_stages,
        launch_pdl=on,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    return out


def _super_block_scales(p: PackedGGUF, nsb: int, pairs: bool = True) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The K-quants' fp16 super-block scales (d, dmin: d again for Q6_K) as the kernel reads them: as int32 words of
    two where asked (pairs) and a row holds an even number, a tile an even number (nsb) and the arrays start and stride
    on 4 bytes (_sub_block_scales' PAIRS), else as they are. Q8_0's come by TMA: q stands in."""
    d = p.get("d")
    if d is None or p.qtype.name == "Q8_0":
        return p["q"], p["q"], False
    dm = p.get("dmin") if p.get("dmin") is not None else d
    arrays = (d, dm)
    if pairs and nsb % 2 == 0 and (p.k // 256) % 2 == 0 and all(a.stride(0) % 2 == 0 and a.data_ptr() % 4 == 0 for a in arrays):
        return d.view(torch.int32), dm.view(torch.int32), True
    return d, dm, False
