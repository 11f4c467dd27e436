"""y = x @ W^T + b for a planar GGUF weight on CUDA: picks the streaming GEMV (float or int8
activations), the integer-dot GEMV (Q4_K, Q6_K, Q8_0 at M <= 8), the float GEMV, the tile GEMM or dequantize + cuBLAS (gguf_config.gguf_plan).

The dequantize path writes bands of rows into one bf16 scratch buffer per device, shared by every
layer (layers run one after another), capped at DEVSTRAL_DEQUANT_SCRATCH_MB (default 512 MiB: a
Devstral FFN matrix, 32768 x 5120, in one band; the 131072-row output head in three).
"""

from __future__ import annotations

import os

import torch

from devstral.errors import DevstralError
from devstral.kernels import (
    gguf_config,
    gguf_dequant,
    gguf_gemm,
    gguf_gemv,
    gguf_gemv_tma,
    gguf_gemv_wide,
    gguf_idot,
)
from devstral.kernels.gguf_pack import PackedGGUF
from devstral.kernels.silu_mul import silu_mul

_SCRATCH: dict[torch.device, torch.Tensor] = {}


def scratch_bytes() -> int:
    raw = os.environ.get("DEVSTRAL_DEQUANT_SCRATCH_MB", "512")
    try:
        mb = float(raw)
    except ValueError:
        raise DevstralError(f"DEVSTRAL_DEQUANT_SCRATCH_MB: not a number: {raw!r}") from None
    return max(64 << 10, int(mb * (1 << 20)))


def _scratch(device: torch.device, nbytes: int) -> torch.Tensor:
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < nbytes:
        _SCRATCH.pop(device, None)
        try:
            buf = _SCRATCH[device] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError:
            raise DevstralError(f"out of GPU memory for the {nbytes >> 20} MiB dequantization scratch of a large "
                                "batch: lower DEVSTRAL_DEQUANT_SCRATCH_MB or the prefill chunk size") from None
    return buf


def dequant_matmul(x: torch.Tensor, p: PackedGGUF, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    elem = x.element_size()
    rows = max(1, min(p.n, scratch_bytes() // (elem * p.k)))
    buf = _scratch(x.device, rows * p.k * elem)
    for start in range(0, p.n, rows):
        stop = min(p.n, start + rows)
        w = buf[:(stop - start) * p.k * elem].view(x.dtype).view(stop - start, p.k)
        gguf_dequant.dequantize(p, start=start, stop=stop, out=w)
        if start == 0 and stop == p.n:
            torch.mm(x, w.t(), out=out)
        else:
            out[:, start:stop] = x @ w.t()
    if bias is not None:
        out += bias.to(out.dtype)
    return out


FIXED_KINDS = ("wide_tma", "wide", *gguf_config.WIDE_INT8_KINDS)  # the plans that can add into fixed point


def fixed_plan(p: PackedGGUF, device: torch.device) -> bool:
    """Whether one activation row of this weight runs a plan that can write fixed point (linear's `fixed`)."""
    return gguf_config.gguf_plan(p.qtype.name, 1, p.n, p.k, device)[0] in FIXED_KINDS


def linear(x: torch.Tensor, p: PackedGGUF, bias: torch.Tensor | None = None, glu: bool = False,
           fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x @ W^T (+ bias). glu: x holds a gate/up projection's [gate | up] rows ([.., 2K]) and the input is
    their SwiGLU: folded into the activation quantization where the plan is wide_xq, else one silu_mul.
    fixed (acc, zero), int64 [1, N] each: for one activation row without bias, the output is added into acc as
    fixed point and zero is zeroed (kernels/fixed_point.py), and acc is returned ([.., N] int64); otherwise, or
    where the plan cannot, an ordinary output. quant/fixed_deltas.py checks the plans before it hands buffers out."""
    if x.shape[-1] != (2 * p.k if glu else p.k):
        raise ValueError(f"input of {x.shape[-1]} values for a weight of K={p.k}" + (" (glu: 2K)" if glu else ""))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    fixed = fixed if m == 1 and bias is None else None
    out = fixed[0] if fixed is not None else torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    if m:
        kind, cfg = gguf_config.gguf_plan(p.qtype.name, m, p.n, p.k, x.device)
        if fixed is not None and kind not in FIXED_KINDS:
            raise ValueError(f"fixed-point output asked of a {kind} plan ({p.qtype.name} {p.n}x{p.k})")
        zero = {} if fixed is None else {"fixed_zero": fixed[1]}
        if kind == "wide_tma" and not (m == 1 and gguf_gemv_tma.usable(p, cfg["bn"], cfg["ns"], x.device)):
            # no TMA here (before sm_90, a row slice off 16 bytes, more rows): the same tile, the register-prefetch loop
            kind, cfg = "wide_xq", {key: v for key, v in cfg.items() if key not in gguf_gemv_tma.TMA_ONLY_KEYS}
        if glu and kind not in ("wide_xq", "wide_tma"):
            x2, glu = silu_mul(x2[:, :p.k], x2[:, p.k:]), False
        if kind == "wide_tma":
            gguf_gemv_tma.gemv(x2, p, bias, out, glu=glu, **cfg, **zero)
        elif kind == "wide" or kind in gguf_config.WIDE_INT8_KINDS:
            gguf_gemv_wide.gemv(x2, p, bias, out, int8=kind != "wide", xq=kind == "wide_xq", glu=glu, **cfg, **zero)
        elif kind == "idot":
            gguf_idot.gemv(x2, p, bias, out, **cfg)
        elif kind == "gemv":
            gguf_gemv.gemv(x2, p, bias, out, **cfg)
        elif kind == "gemm":
            gguf_gemm.gemm(x2, p, bias, out, **cfg)
        else:
            dequant_matmul(x2, p, bias, out)
    return out.reshape(*lead, p.n)
