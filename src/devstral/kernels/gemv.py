"""Linear layers at decode batch sizes: the reference is `F.linear`; `linear()` runs the Triton skinny
GEMM (gemv_triton.py) only where a measurement on this GPU model showed it faster than cuBLAS.

The measurements live in `gemv_tuned.json` beside this file: {GPU name: {"KxN": {"M": config or
null}}}, written by `benchmarks/engine_kernels.py` on that GPU (it times cuBLAS and every candidate
config at M = 1, 2, 4, 8, 16 and keeps the winner; null means cuBLAS won). A row count M uses the
entry of the smallest measured M >= M (the kernel pads to 16 rows either way). Shapes and GPUs the
table does not name, more than 16 rows, and dtypes other than bf16/fp16 run `F.linear`, so an
unmeasured setup never gets slower.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from devstral.kernels import use_triton

TUNED_TABLE = Path(__file__).with_name("gemv_tuned.json")


def linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T, no bias: what `nn.Linear(K, N, bias=False)` computes."""
    if use_triton(x) and not (weight.requires_grad and torch.is_grad_enabled()):
        config = tuned_config(x, weight)
        if config is not None:
            from devstral.kernels.gemv_triton import linear_triton

            return linear_triton(x, weight, config)
    return F.linear(x, weight)


def run_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, through `linear()` when the module is a plain bias-free nn.Linear (LoRA-wrapped and
    quantized layers keep their own forward)."""
    if type(module) is torch.nn.Linear and module.bias is None:
        return linear(x, module.weight)
    return module(x)


def tuned_config(x: torch.Tensor, weight: torch.Tensor):
    """The measured winning GemvConfig for this GPU, shape and row count, or None (cuBLAS)."""
    if not x.is_cuda or weight.dim() != 2:
        return None
    from devstral.kernels.gemv_triton import MAX_M, supports

    m = x.numel() // max(1, x.shape[-1])
    if m > MAX_M or not supports(x, weight):
        return None
    return _lookup(x.device.index if x.device.index is not None else torch.cuda.current_device(),
                   weight.shape[1], weight.shape[0], m)


@functools.lru_cache(maxsize=1024)
def _lookup(device_index: int, k: int, n: int, m: int):
    from devstral.kernels.gemv_triton import GemvConfig

    by_m = _table().get(torch.cuda.get_device_name(device_index), {}).get(f"{k}x{n}")
    if not by_m:
        return None
    bucket = next((b for b in sorted(int(key) for key in by_m) if b >= m), None)
    entry = by_m.get(str(bucket)) if bucket is not None else None
    return GemvConfig(**entry) if entry else None


@functools.cache
def _table() -> dict:
    try:
        return json.loads(TUNED_TABLE.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
