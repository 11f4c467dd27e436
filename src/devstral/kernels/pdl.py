"""Programmatic dependent launch (Hopper and later): on by default on sm_90+, DEVSTRAL_PDL=0 turns it off.

At batch 1 a decode step is ~500 kernels, and a small GEMV (q/k/v, o: 12-18 MB) spends a good part of
its time starting up: launch, then DRAM latency before the first tile arrives. With programmatic
dependent launch the GEMV (launched with the attribute) may start while the kernel before it still runs,
issue its first weight loads -- weights do not depend on that kernel -- and wait (griddepcontrol.wait)
only before it reads the activations. The kernels that feed GEMVs (RMSNorm, SwiGLU, the activation
quantization, decode attention) signal at their start (griddepcontrol.launch_dependents), a GEMV at the
end of its loop, so that the next kernel is scheduled beside its last wave and not in slots its own
later waves need. Both instructions are no-ops where the launch has no such dependency. Measured on the
H200 (Devstral Small Q4_K_M decode, benchmarks/gpu_engine.py): 167.6 tok/s without, 175.0 with; a GEMV
that signalled at its start made it 155.5. Under Triton's interpreter and before sm_90 it is always off.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton >= 3.3; with an older one PDL stays off and the kernels never reach these names
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def enabled(device: torch.device) -> bool:
    if os.environ.get("DEVSTRAL_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1" or gdc_wait is None:
        return False
    if device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


__all__ = ["enabled", "gdc_launch_dependents", "gdc_wait"]
