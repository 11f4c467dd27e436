"""Which implementation trains each fused op: ours (`*_autograd.py`, fused_linear_ce.py) or Liger-Kernel's.

The issue's rule is "measure it and keep the faster". MEASURED is that measurement, on the H200 (bf16,
forward + backward, Devstral-Small widths, 8192 tokens; benchmarks/results/train_kernels_h200.json,
which `winners()` turns into this table, and a test keeps the two in step):

    op               ours                   liger                  kept
    rms_norm         0.258 ms               0.302 ms               ours
    rope             0.262 ms               0.282 ms               ours (Liger won, 0.356 against 0.471, before
                                                                   our backward kernel was reworked)
    silu_mul         1.057 ms               1.052 ms               ours (0.4% apart: a tie)
    fused_linear_ce  52.0 ms, 0.625 GiB     35.1 ms, 0.125 GiB     liger (8192x5120 -> 131072)

Liger runs on CUDA tensors. CPU tensors under TRITON_INTERPRET=1 (where our kernels run interpreted) take
it only when DEVSTRAL_TRAIN_KERNELS asks for it: that is how the CPU tests check Liger's numerics, while
the interpreter tests of our own kernels keep testing ours. Without liger-kernel installed, or on any
other device, ours (or the plain PyTorch reference) runs as before. Liger adapters exist for the ops it wins; rms_norm and silu_mul are
always ours.

DEVSTRAL_TRAIN_KERNELS overrides the table: `ours` or `liger` for every op that has a choice, or a
comma list `rope=ours,fused_linear_ce=liger`.
"""

from __future__ import annotations

import functools
import os

import torch

from devstral.errors import DevstralError

ENV = "DEVSTRAL_TRAIN_KERNELS"
MEASURED = {"rms_norm": "ours", "rope": "ours", "silu_mul": "ours", "fused_linear_ce": "liger"}
LIGER_OPS = ("rope", "fused_linear_ce")  # the ops with a Liger adapter (kernels/liger.py)
TIE = 0.05  # Liger is kept only when it is at least this much faster: below it, run-to-run noise decides
_JSON_KEYS = {"rms_norm": ("elementwise", "rms_norm", "ours_ms", "liger_ms"),
              "rope": ("elementwise", "rope", "ours_ms", "liger_ms"),
              "silu_mul": ("elementwise", "silu_mul", "ours_ms", "liger_ms"),
              "fused_linear_ce": ("head", None, "fused_ours", "fused_liger")}


def winners(result: dict, tie: float = TIE) -> dict[str, str]:
    """The table a train_kernels.py result implies: per op, liger when it took at most (1 - tie) of our time."""
    table = {}
    for op, (section, row, ours, liger) in _JSON_KEYS.items():
        if row is None:  # the head section: one entry per implementation, each with its ms
            ours_ms, liger_ms = result[section][ours]["ms"], result[section].get(liger, {}).get("ms")
        else:
            ours_ms, liger_ms = result[section][row][ours], result[section][row].get(liger)
        table[op] = "liger" if liger_ms is not None and liger_ms <= (1 - tie) * ours_ms else "ours"
    return table


@functools.cache
def _parse(spec: str) -> dict[str, str]:
    spec = spec.strip()
    if spec in ("ours", "liger"):
        return {op: spec if op in LIGER_OPS else "ours" for op in MEASURED}
    table = dict(MEASURED)
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        op, sep, impl = (x.strip() for x in item.partition("="))
        if not sep or op not in MEASURED:
            raise DevstralError(f"{ENV}={spec!r}: {item!r} is not OP=IMPL (ops: {', '.join(MEASURED)})")
        if impl not in ("ours", "liger"):
            raise DevstralError(f"{ENV}={spec!r}: {op} must be ours or liger, got {impl!r}")
        if impl == "liger" and op not in LIGER_OPS:
            raise DevstralError(f"{ENV}={spec!r}: {op} has no Liger path (Liger can train: {', '.join(LIGER_OPS)})")
        table[op] = impl
    return table


def table() -> dict[str, str]:
    """MEASURED with the environment's overrides applied (raises DevstralError on a bad value)."""
    spec = os.environ.get(ENV)
    return _parse(spec) if spec else dict(MEASURED)


def liger_available() -> bool:
    from devstral.kernels import triton_available

    return triton_available() and _liger_importable()  # DEVSTRAL_NO_TRITON turns Liger off too


@functools.cache
def _liger_importable() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def use_liger(op: str, t: torch.Tensor) -> bool:
    """Train `op` on `t`'s device with Liger's kernel? Only where the table says liger, Liger is importable
    and its Triton kernels run for this tensor: compiled on CUDA, interpreted on the CPU when asked for."""
    if table()[op] != "liger":
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and bool(os.environ.get(ENV))
    if not (t.is_cuda or interpreted):
        return False
    return liger_available()
