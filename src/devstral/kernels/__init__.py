"""GPU kernels, one per file, each beside the plain-PyTorch reference that defines it.

Every public function here dispatches: the Triton kernel on a CUDA tensor when Triton is installed,
otherwise the reference (the CPU twin that CI tests). The reference is the specification; each
kernel's GPU test compares the two on fresh random inputs.

Triton is imported lazily: a CPU-only install never needs it.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    if os.environ.get("DEVSTRAL_NO_TRITON"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernel for this tensor? CUDA tensors when Triton is there; CPU tensors too under
    TRITON_INTERPRET=1, which is how the kernels' logic is checked on a machine with no GPU."""
    if not triton_available():
        return False
    if t.requires_grad and torch.is_grad_enabled():
        return False  # the inference kernels have no backward; training takes use_triton_training()
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def use_triton_training(*tensors: torch.Tensor) -> bool:
    """Run the training kernel (Triton forward + hand-written backward, `*_autograd.py`) instead of the
    reference's autograd? When a gradient will flow through any of the tensors, on the devices
    `use_triton` runs kernels for."""
    if not triton_available() or not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return False
    return tensors[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
