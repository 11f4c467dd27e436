"""The decode attention's split merge left to the o projection (DEVSTRAL_O_MERGE=1; host only, no kernels).

At batch-1 decode the attention's pass 2 (the merge of its splits) is a launch of its own between pass 1 and
the o GEMV, and removing it measured +1.5% decode on the H200 (session 26's ablation: docs/architecture.md).
With this, pass 1 writes its partials as usual and, instead of launching pass 2, leaves a `DeferredMerge`
here. The o projection's GEMV (kernels/gguf_linear.py) takes it when its input is that attention output and
merges the partials in its own prologue (kernels/gguf_gemv_merge.py); any other consumer, or a plan that
cannot, calls `materialize()` first, which launches pass 2 as before. So the output is never read unwritten:
the attention defers only where its caller says the next reader is such a GEMV (model/transformer.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from devstral.errors import DevstralError


@dataclass
class DeferredMerge:
    out: torch.Tensor  # [B, H, D]: written by pass 1 for rows whose keys fit in one split, else not yet
    part_out: torch.Tensor  # [B, H, splits, D] float32 partial outputs
    part_lse: torch.Tensor  # [B, H, splits] float32 log-sum-exps (base 2)
    context_lens: torch.Tensor  # [B] int32
    splits: int  # the launch's split count (each row uses the first `used` of them)
    window: int  # 0: none
    min_chunk: int  # keys a split takes at least (whole tiles)
    block_n: int  # pass 1's tile of keys
    len_early: bool  # context_lens may be read before the dependent-launch wait (settled)
    launch_merge: Callable[[], None]  # pass 2, writing out

    def materialize(self) -> torch.Tensor:
        """Launch pass 2 now (the output written as without deferral) and return the output."""
        self.launch_merge()
        return self.out


_pending: DeferredMerge | None = None


def mode() -> str:
    """DEVSTRAL_O_MERGE: "0" (default) off; "1" on, pass 1 letting o's programs start at its own start (o's
    weights load during the splits); "late" on, pass 1 letting them start as each split finishes."""
    raw = os.environ.get("DEVSTRAL_O_MERGE", "0").strip()
    if raw not in ("0", "1", "late"):
        raise DevstralError(f"DEVSTRAL_O_MERGE={raw!r}: expected 0, 1 or late")
    return raw


def signal_at_end() -> bool:
    return mode() == "late"


def defer(merge: DeferredMerge) -> None:
    """Leave a merge for the next GEMV; one left before and not taken is launched first (never lost)."""
    global _pending
    if _pending is not None:
        _pending.materialize()
    _pending = merge


def take(x: torch.Tensor) -> DeferredMerge | None:
    """The pending merge whose output x is (the same memory, all of it), removed from here; else None.
    The taker merges it itself or calls materialize()."""
    global _pending
    merge = _pending
    if merge is None or x.data_ptr() != merge.out.data_ptr() or x.numel() != merge.out.numel():
        return None
    _pending = None
    return merge


def settle() -> None:
    """Launch a merge nobody took (a reader that is not a GEMV must call this before it reads)."""
    global _pending
    merge, _pending = _pending, None
    if merge is not None:
        merge.materialize()
