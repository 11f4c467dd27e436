"""A compiled llguidance grammar as the engine's TokenConstraint (engine/constraints.py).

The next mask is computed off the critical path: `accept(token)` hands the mask for the following
step to a worker thread and returns at once, so the mask is computed while the engine runs the
forward pass for that token (llguidance drops the GIL while it computes). `allowed_tokens()` then
only waits for a result that is usually ready. The mask leaves llguidance as a packed bitmask and is
unpacked with numpy (about 20 us for 131k ids); the engine moves it to the logits' device.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from devstral.errors import DevstralError

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class GrammarError(DevstralError):
    """A grammar that cannot be compiled, or that admits no output (from here on)."""


class GrammarViolation(RuntimeError):
    """A token the mask forbade was fed back: the engine did not apply the mask (a bug, not bad input)."""


def short_error(message: str) -> str:
    """llguidance's error in one line: its "Error: ..." line when it adds a state dump, else the first."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    found = next((line for line in lines if line.startswith("Error:")), " ".join(lines) or "unknown error")
    return found.removeprefix("Error:").strip()[:300]


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="devstral-grammar")
        return _pool


def compute_mask(matcher: Any, vocab_size: int) -> torch.Tensor:
    """The allowed next tokens of `matcher` as a bool tensor [vocab_size] on the CPU.

    Raises GrammarError when the matcher is in an error state or allows nothing at all (not even
    EOS): generation could not continue, and sampling from an empty set must never be attempted.
    """
    words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
    matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
    if matcher.is_error():
        raise GrammarError(f"structured output failed: {short_error(matcher.get_error())}")
    allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size].view(np.bool_)
    if not allowed.any():
        raise GrammarError("structured output: no token can continue the output (the grammar admits nothing here)")
    return torch.from_numpy(allowed)


class GrammarConstraint:
    """One sequence's grammar state. Not thread-safe: one engine thread drives it (and the worker
    thread computing its next mask never runs at the same time as a call that touches the matcher)."""

    def __init__(self, matcher: Any, vocab_size: int, first_mask: torch.Tensor | None = None):
        self._matcher, self._vocab = matcher, vocab_size
        self._mask = first_mask
        self._pending: Future[torch.Tensor] | None = None
        self._finished = matcher.is_stopped()
        if first_mask is None and not self._finished:
            self._pending = _executor().submit(compute_mask, matcher, vocab_size)

    def allowed_tokens(self) -> torch.Tensor:
        if self._pending is not None:
            self._mask, self._pending = self._pending.result(), None  # re-raises a GrammarError
        if self._mask is None:
            self._mask = compute_mask(self._matcher, self._vocab)
        return self._mask

    def accept(self, token_id: int) -> None:
        if self._pending is not None:  # never touch the matcher while a mask is computed from it
            self._pending.result()
            self._pending = None
        if not self._matcher.consume_token(int(token_id)):
            raise GrammarViolation(f"structured output: token {token_id} is not allowed here "
                                   f"({short_error(self._matcher.get_error() or 'rejected by the grammar')})")
        self._mask = None
        self._finished = self._matcher.is_stopped()
        if not self._finished:
            self._pending = _executor().submit(compute_mask, self._matcher, self._vocab)

    def is_finished(self) -> bool:
        return self._finished
