"""Pipeline depth that fits the GPU's shared memory.

A launch config names num_stages: how many tiles a software pipeline keeps in shared memory. The tuned tables
(kernels/tuned/) were measured on GPUs with 228 KB a block; the rules of gguf_config.py serve every other GPU, and a
depth that fits a Hopper may not fit an Ada card's 99 KB or an Ampere's 163 KB. Triton only finds out at the first
launch (OutOfResources, before anything is enqueued, so also while a CUDA graph captures). Here such a launch is
retried one stage shallower until it fits, and the depth that fitted is remembered for that config, so later
launches (and graph captures) go straight to it. Any other resource error (registers) is raised as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # no Triton: nothing is launched, nothing to catch
    OutOfResources = None

log = logging.getLogger(__name__)
_fitted: dict[tuple, int] = {}


def launch(key: Hashable, num_stages: int, run: Callable[[int], object]) -> int:
    """run(stages) with stages = num_stages, or fewer where the config needs more shared memory than the GPU has;
    key names the config (kernel, constexprs, device). Returns the depth that ran."""
    stages = _fitted.get((key, num_stages), num_stages)
    while True:
        try:
            run(stages)
        except Exception as e:
            if OutOfResources is None or not isinstance(e, OutOfResources) or stages <= 1 \
                    or getattr(e, "name", "") != "shared memory":
                raise
            log.info("%s: %d pipeline stages need more shared memory than this GPU has; trying %d", key, stages,
                     stages - 1)
            stages -= 1
            continue
        _fitted[(key, num_stages)] = stages
        return stages


__all__ = ["launch"]
