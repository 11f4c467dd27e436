"""Planar GGUF weight -> bf16/fp16/fp32 on the GPU, bit-identical to quant.dequantize().

Two uses: large batches (dequantize a band of rows into a reused scratch buffer, then cuBLAS), and
token-embedding lookups (only the rows asked for, gathered by index). Each program writes BN rows x
NSUB sub-blocks; reads ~0.56 byte per weight and writes 2, so it runs at copy speed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels.gguf_decode import GEOMETRY, ONE_F32_BITS, qt_code, subblock_values
from devstral.kernels.gguf_gemv import field_args
from devstral.kernels.gguf_pack import PackedGGUF


@triton.jit
def _dequant_kernel(out_ptr, idx_ptr, q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                    R, row0, K, s_out, s_q, s_qh, s_sc, s_d, one,
                    QT: tl.constexpr, SB: tl.constexpr, WPS: tl.constexpr, BN: tl.constexpr,
                    NSUB: tl.constexpr, GATHER: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    i = pid_n * BN + tl.arange(0, BN)
    i_ok = i < R
    if GATHER:
        n = tl.load(idx_ptr + i, mask=i_ok, other=0)
    else:
        n = row0 + i
    n = n[:, None]
    ok = i_ok[:, None]
    r = tl.arange(0, SB)[None, :]
    out = out_ptr + i[:, None].to(tl.int64) * s_out + r
    n_sub = K // SB
    for u in tl.static_range(NSUB):
        j = pid_k * NSUB + u
        if j < n_sub:
            val = subblock_values(q_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, n, j, r, ok,
                                  s_q, s_qh, s_sc, s_d, one, QT, SB, WPS, True)
            tl.store(out + j * SB, val.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize(p: PackedGGUF, *, rows: torch.Tensor | None = None, start: int = 0, stop: int | None = None,
               dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
               bn: int = 16, nsub: int = 8, num_warps: int = 4) -> torch.Tensor:
    """Rows start..stop of the weight (or the rows listed in `rows`), as [R, K] of `dtype`."""
    if rows is not None:
        n_rows = rows.numel()
    else:
        stop = p.n if stop is None else stop
        n_rows = stop - start
    if out is None:
        out = torch.empty(n_rows, p.k, dtype=dtype, device=p.device)
    qt = qt_code(p.qtype)
    sb, wps, _ = GEOMETRY[qt]
    if n_rows == 0:
        return out
    fields, (s_q, s_qh, s_sc, s_d) = field_args(p)
    grid = (triton.cdiv(n_rows, bn), triton.cdiv(p.k // sb, nsub))
    _dequant_kernel[grid](out, rows.reshape(-1) if rows is not None else out, *fields,
                          n_rows, start, p.k, out.stride(0), s_q, s_qh, s_sc, s_d, ONE_F32_BITS.value,
                          QT=qt, SB=sb, WPS=wps, BN=bn, NSUB=nsub, GATHER=rows is not None, num_warps=num_warps)
    return out
