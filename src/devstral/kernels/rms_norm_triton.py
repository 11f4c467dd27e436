"""RMSNorm and residual-add + RMSNorm in one pass per row (Triton). Semantics: `rms_norm.py`.

One program per row holds the whole row in registers: read x (and delta) once, write the normed row
(and the residual) once. Bytes per row: 2-byte dtypes, dim d: 4d for the norm, 8d for add + norm.
The residual is rounded to its dtype before it is normed, and the normed row is cast to that dtype
before the weight multiplies it, exactly as the reference does.

At decode sizes the kernel can also write the normed row as the int8 GEMVs' activations (`xq`: one or two
of gguf_xq's layouts, packed by gguf_xq's own pack_blocks from the row as stored, so the same bits as
gguf_xq.quantize of it) and offer them to gguf_xq.quantize, which then skips its launch: the norms before
q/k/v and before gate/up (or the experts) spare one launch each (two for a paired Q4_K q/k and Q6_K v),
about 100 per Devstral Q4_K_M decode step with the output head's. Then several programs share a row, each
summing the whole row's squares and finishing 16 blocks of 32 of it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from devstral.kernels import gguf_xq, pdl, stamps
from devstral.kernels.fixed_point import from_fixed
from devstral.kernels.gguf_config import DECODE_MS
from devstral.kernels.gguf_xq import pack_blocks
from devstral.kernels.interpret_triton import kernels_for
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait

MAX_DIM = 32768  # a row in registers; wider rows take the reference
XQ_MAX_ROWS = DECODE_MS[-1]  # the rows the decode GEMVs serve


@triton.jit
def _row_and_blocks(row_ptr, cols, mask, at, ok, XQ: tl.constexpr):
    """A row's values at cols, and with XQ also the program's blocks of 32 of it (else the row again)."""
    full = tl.load(row_ptr + cols, mask=mask, other=0.0)
    blocks = full
    if XQ:
        blocks = tl.load(row_ptr + at, mask=ok[:, None], other=0.0)
    return full, blocks


@triton.jit
def _rms_norm_kernel(x_ptr, x_row_stride, delta_ptr, delta_row_stride, w_ptr, out_ptr, res_ptr, xq_ptr, xq_second,
                     n_cols, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                     XQ_A: tl.constexpr = -1, XQ_B: tl.constexpr = -1, XB: tl.constexpr = 16,
                     X_SETTLED: tl.constexpr = False, stamps_ptr=None, STAMPS: tl.constexpr = False,
                     DELTA_FIXED: tl.constexpr = False):
    if STAMPS:  # kernels/stamps.py
        t_start = stamps.now()
    if PDL:  # kernels/pdl.py: the GEMV after may start loading its weights
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    # Every load goes out before the row's sum of squares: the sum's cross-warp step is a barrier that later
    # loads do not cross, so a load placed after it is a second L2 round trip on the decode step's chain.
    # Under dependent launch only what the kernel before may have written waits: the weight (never written)
    # always loads before the wait, and so does x when X_SETTLED (its writer finished before the kernel
    # before started, add_rms_norm_triton): at decode both are DRAM misses, off the chain this way.
    # Program (row, p) finishes blocks of 32 p * XB.. of the row from the mean square below (every program of the
    # row sums the same row alike, so gets the same bits): packing a whole row in one program tripled its
    # instructions (sm_90 SASS, 5120 wide, 16 warps), all on one SM. Without xq there is one program a row.
    b = tl.program_id(1) * XB + tl.arange(0, XB)
    ok = b < n_cols // 32
    at = b[:, None] * 32 + tl.arange(0, 32)[None, :]
    XQ: tl.constexpr = XQ_A >= 0
    if XQ:
        ws = tl.load(w_ptr + at, mask=ok[:, None], other=0.0)
    else:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if X_SETTLED:
        x, xs = _row_and_blocks(x_ptr + row * x_row_stride, cols, mask, at, ok, XQ)
    if PDL:
        gdc_wait()
    if STAMPS:
        t_waited = stamps.now()
    if not X_SETTLED:
        x, xs = _row_and_blocks(x_ptr + row * x_row_stride, cols, mask, at, ok, XQ)
    if HAS_DELTA:
        delta, ds = _row_and_blocks(delta_ptr + row * delta_row_stride, cols, mask, at, ok, XQ)
        if DELTA_FIXED:  # an int64 fixed-point GEMV output (kernels/fixed_point.py), as the GEMV would have stored it
            delta = from_fixed(delta, res_ptr.dtype.element_ty)
            ds = from_fixed(ds, res_ptr.dtype.element_ty)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(res_ptr.dtype.element_ty)
        if not XQ:
            tl.store(res_ptr + row * n_cols + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) / n_cols
    if STAMPS:
        t_work = stamps.after(mean_sq)
    if not XQ:
        h = (h * tl.rsqrt(mean_sq + eps)).to(x.dtype)
        y = w.to(tl.float32) * h.to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_DELTA:
            xs = (xs.to(tl.float32) + ds.to(tl.float32)).to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + row * n_cols + at, xs, mask=ok[:, None])
        hs = (xs.to(tl.float32) * tl.rsqrt(mean_sq + eps)).to(xs.dtype)
        ys = (ws.to(tl.float32) * hs.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * n_cols + at, ys, mask=ok[:, None])
        # the GEMV's activations from the row as stored: layout XQ_A at xq_ptr, XQ_B xq_second words further
        base = xq_ptr + row * (n_cols // 32 * 12) + b * 12
        pack_blocks(ys.to(tl.float32), base, ok, XQ_A, XB)
        if XQ_B >= 0:
            pack_blocks(ys.to(tl.float32), base + xq_second, ok, XQ_B, XB)
    if STAMPS:
        stamps.record(stamps_ptr, stamps.NORM, row * tl.num_programs(1) + tl.program_id(1), t_start, t_waited, t_work,
                      stamps.now())


def _rows(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])  # a view whenever the leading dims allow one


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 512))


def xq_rows(layouts: tuple[int, ...], rows: int, n: int) -> bool:
    """Whether a norm of `rows` rows of n writes the GEMV activations too: asked for, at decode sizes."""
    return bool(layouts) and 0 < rows <= XQ_MAX_ROWS and n % gguf_xq.BLOCK == 0 and n <= MAX_DIM


def _launch(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
            num_warps: int | None, xq: tuple[int, ...] = (), x_settled: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    fixed = delta is not None and delta.dtype == torch.int64  # kernels/fixed_point.py: the GEMV's output in x's dtype
    res_dtype = x.dtype if delta is None or fixed else torch.promote_types(x.dtype, delta.dtype)
    rows = x.numel() // n if n else 0
    layouts = tuple(dict.fromkeys(xq))[:2] if xq_rows(xq, rows, n) else ()
    # with xq, a normal tensor even in inference mode: its version counter tells gguf_xq of an in-place write
    with torch.inference_mode(False) if layouts else nullcontext():
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, res_dtype), device=x.device)
    xq_out = torch.empty(len(layouts), rows, n // gguf_xq.BLOCK, gguf_xq.WORDS, dtype=torch.int32,
                         device=x.device) if layouts else None
    res = torch.empty(x.shape, dtype=res_dtype, device=x.device) if delta is not None else None
    x2 = _rows(x)
    d2 = _rows(delta) if delta is not None else x2
    if x2.shape[0] == 0:
        return out, res
    block = triton.next_power_of_2(n)
    on = pdl.enabled(x.device)
    stamps_ptr, stamped = stamps.kernel_args(x.device, out)
    # with xq: 10 programs of 16 warps for Devstral's 5120; 4 or 8 warps and 8 or 32 blocks a program were
    # no faster in the engine (H200 Q4_K_M, benchmarks/results/decode_ab_onetile_h200.json)
    grid = (x2.shape[0], triton.cdiv(n // gguf_xq.BLOCK, gguf_xq.BLOCKS_PER_PROGRAM) if layouts else 1)
    kernels_for(x, __name__)._rms_norm_kernel[grid](
        x2, x2.stride(0), d2, d2.stride(0), weight.contiguous(), out, res if res is not None else out,
        xq_out if xq_out is not None else out, xq_out.stride(0) if xq_out is not None else 0, n, eps,
        HAS_DELTA=delta is not None, BLOCK=block, PDL=on, XQ_A=layouts[0] if layouts else -1,
        XQ_B=layouts[1] if len(layouts) > 1 else -1, XB=gguf_xq.BLOCKS_PER_PROGRAM,
        X_SETTLED=bool(on and x_settled and delta is not None), stamps_ptr=stamps_ptr, STAMPS=stamped,
        DELTA_FIXED=fixed, num_warps=num_warps or _num_warps(block), launch_pdl=on)
    if layouts:
        gguf_xq.offer(out.view(rows, n), dict(zip(layouts, xq_out, strict=True)))
    return out, res


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, *, num_warps: int | None = None,
                    xq: tuple[int, ...] = ()) -> torch.Tensor:
    """xq: gguf_xq layouts (at most two) the GEMVs after will quantize the output with; at decode sizes
    (xq_rows) the kernel writes them and offers them to gguf_xq.quantize."""
    if x.shape[-1] > MAX_DIM:
        from devstral.kernels.rms_norm import rms_norm_ref

        return rms_norm_ref(x, weight, eps)
    return _launch(x, None, weight, eps, num_warps, xq)[0]


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, *,
                        num_warps: int | None = None, xq: tuple[int, ...] = (),
                        x_settled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + delta), x + delta); xq as rms_norm_triton's. `x_settled`: the caller vouches that x's
    writer had finished before the kernel that wrote delta started -- a residual stream, written by the
    norm one or more GEMVs back -- so under dependent launch x loads before the wait (kernels/pdl.py) and
    only delta waits. A wrong promise is a race, hence opt-in."""
    if x.shape[-1] > MAX_DIM or delta.shape != x.shape:
        from devstral.kernels.fixed_point import from_fixed_ref
        from devstral.kernels.rms_norm import add_rms_norm_ref

        if delta.dtype == torch.int64:
            delta = from_fixed_ref(delta, x.dtype)
        return add_rms_norm_ref(x, delta, weight, eps)
    return _launch(x, delta, weight, eps, num_warps, xq, x_settled)
