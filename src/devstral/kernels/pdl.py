"""Programmatic dependent launch (Hopper and later): on by default on sm_90+, DEVSTRAL_PDL=0 turns it off.

At batch 1 a decode step is ~570 kernels, most of them small, and each pays a launch and a ramp before
it does any work. Launched as a programmatic dependent, a kernel may be scheduled while the one before
it still runs; it waits (griddepcontrol.wait) for that kernel's end, and for its writes to be visible,
before it touches memory that kernel may have written. Every kernel of the decode chain is launched so:
RMSNorm, RoPE with the KV store, the decode attention (its merge too) and SwiGLU wait first thing; the
activation quantization and the MoE router too. A dense GEMV first issues its first tile's weight loads
(weights are never written) and waits before it reads the activations; a MoE expert GEMV waits first,
as its expert ids are the router's output. Each signals its own dependents
(griddepcontrol.launch_dependents) at its start, a GEMV at the end of its loop: at its start, a GEMV of
more than one wave let the next kernel's programs take the SM slots its own later waves needed. Nothing
is written before the wait (split-K workspaces and counters included), so outputs are those of plain
launches (tests/test_engine_gpu.py compares greedy tokens). Measured on the H200 (Devstral Small
Q4_K_M decode, benchmarks/gpu_engine.py): 165.1 tok/s without; 155.5 with the GEMVs only, signalling at
their start; 176.5 with the GEMVs only, signalling at their loop's end; 179.0 with every kernel.
Under Triton's interpreter and before sm_90 it is always off.
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
