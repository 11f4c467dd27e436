"""FP8 (e4m3) weights with one fp32 scale per output channel: quantize, GEMV, and the cuBLAS path.

W ~ scale[n] * W8[n, :], with scale = max|W[n, :]| / 448 (e4m3's largest finite value), so every
row uses the format's whole range. Small batches run `gemv` (a Triton kernel that reads one byte
per weight); larger ones quantize the activations per row the same way and call
torch._scaled_mm (cuBLASLt fp8 tensor cores, Hopper and later) with row-wise scales on both sides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels.gguf_splitk import counters, store_output, usable_split, workspace

E4M3_MAX = 448.0


def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (e4m3 [N, K], fp32 scale [N]); a zero row gets scale 1 and zeros."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (w / scale[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


@triton.jit
def _fp8_gemv_kernel(x_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr, w_ptr, scale_ptr, M, N, K, s_xm, s_om, s_w,
                     BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, SPLIT_K, SPLIT: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BN + tl.arange(0, BN)
    n2 = rows[:, None]
    row_ok = n2 < N
    kk = tl.arange(0, BK)[None, :]
    n_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    m0 = pid_m * BM
    acc0 = tl.zeros((BN, BK), dtype=tl.float32)
    if BM > 1:
        acc1 = tl.zeros((BN, BK), dtype=tl.float32)
    if BM > 2:
        acc2 = tl.zeros((BN, BK), dtype=tl.float32)
        acc3 = tl.zeros((BN, BK), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        k = t * BK + kk
        k_ok = k < K
        w = tl.load(w_ptr + n2.to(tl.int64) * s_w + k, mask=row_ok & k_ok, other=0.0).to(tl.float32)
        xp = x_ptr + m0 * s_xm + k
        acc0 += w * tl.load(xp, mask=k_ok & (m0 < M), other=0.0).to(tl.float32)
        if BM > 1:
            acc1 += w * tl.load(xp + s_xm, mask=k_ok & (m0 + 1 < M), other=0.0).to(tl.float32)
        if BM > 2:
            acc2 += w * tl.load(xp + 2 * s_xm, mask=k_ok & (m0 + 2 < M), other=0.0).to(tl.float32)
            acc3 += w * tl.load(xp + 3 * s_xm, mask=k_ok & (m0 + 3 < M), other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=rows < N, other=0.0)[:, None]
    cols = m0 + tl.arange(0, BM)
    which = tl.arange(0, BM)[None, :]
    res = tl.where(which == 0, tl.sum(acc0, axis=1)[:, None], 0.0)
    if BM > 1:
        res = tl.where(which == 1, tl.sum(acc1, axis=1)[:, None], res)
    if BM > 2:
        res = tl.where(which == 2, tl.sum(acc2, axis=1)[:, None], res)
        res = tl.where(which == 3, tl.sum(acc3, axis=1)[:, None], res)
    # per-row scales distribute over the split-K partial sums, so they can be applied before
    store_output(res * scale, rows, cols, N, M, out_ptr, s_om, bias_ptr, ws_ptr, cnt_ptr,
                 pid_m * tl.num_programs(0) + pid_n, pid_k, SPLIT_K, HAS_BIAS, SPLIT)


def gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, *,
         bn: int = 16, bk: int = 512, bm: int = 1, split_k: int = 1, num_warps: int = 4) -> torch.Tensor:
    m, k = x.shape
    n = q.shape[0]
    tiles_n, tiles_m = triton.cdiv(n, bn), triton.cdiv(m, bm)
    split_k = usable_split(split_k, tiles_n * tiles_m, m, n)
    ws = workspace(split_k, m, n, x.device)
    _fp8_gemv_kernel[(tiles_n, split_k, tiles_m)](
        x, out, bias if bias is not None else out, ws, counters(x.device), q, scale, m, n, k, x.stride(0),
        out.stride(0), q.stride(0), BN=bn, BK=bk, BM=bm, SPLIT_K=split_k, SPLIT=split_k > 1, HAS_BIAS=bias is not None,
        num_warps=num_warps)
    return out


def scaled_mm_ok(q: torch.Tensor, device: torch.device) -> bool:
    """cuBLASLt fp8 wants Hopper or later and dimensions that are multiples of 16."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    n, k = q.shape
    return torch.cuda.get_device_capability(device) >= (8, 9) and n % 16 == 0 and k % 16 == 0


def scaled_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (16-bit) @ (scale * q)^T via fp8 tensor cores: the activations are quantized per row."""
    amax = x.abs().amax(dim=1, keepdim=True).float()
    sx = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    x8 = (x.float() / sx).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x8, q.t(), scale_a=sx, scale_b=scale.reshape(1, -1), out_dtype=x.dtype)
    return out if bias is None else out + bias.to(out.dtype)
