"""What the decode step asks L2 to keep: cache-eviction hints on the loads of the GEMVs and the norms.

A batch-1 decode step streams every weight once (14 GB for Devstral-Small Q4_K_M) through a 50 MB L2, so by
the time a norm runs again, a step later, its weight row has been pushed out; so has the residual stream it
reads, written by the norm before it some 100-200 MB of weights earlier. The norms are latency-bound links of
the step's chain, and under dependent launch they run beside the next GEMV's first weight loads, which is when
a DRAM miss costs most (docs/architecture.md: a norm slows by 2.6 us when gate/up loads early).

The hints (PTX `L2::cache_hint` policies, made by Triton from `eviction_policy`):
- WEIGHT_EVICT on the register-loop GEMVs' weight loads (`DEVSTRAL_WEIGHT_EVICT_FIRST=1`): "evict_first", read
  once a step and never again before it is evicted anyway. Triton 3.6 drops the hint on TMA copies
  (descriptor loads lower without a cache policy), so the TMA GEMV's weights stay at the normal priority.
- KEEP on the norms' weight and residual loads and the residual's store (`DEVSTRAL_NORM_EVICT_LAST=1`):
  "evict_last", about 0.8 MB of weights and 0.8 MB of residual rows a step.

Read once, at import: a Triton global must be a constexpr that does not change while a process runs.
"""

from __future__ import annotations

import os

import triton.language as tl


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


WEIGHT_EVICT = tl.constexpr("evict_first" if _flag("DEVSTRAL_WEIGHT_EVICT_FIRST") else "")
KEEP = tl.constexpr("evict_last" if _flag("DEVSTRAL_NORM_EVICT_LAST") else "")
