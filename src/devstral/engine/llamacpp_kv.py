"""Which llama.cpp sequence ids hold which tokens' keys and values, and how many KV cells they use.

The llama.cpp backend runs one unified KV cache of `num_blocks` cells (one token each) shared by
`n_ids` sequence ids. A running request owns an id. When it ends, the id keeps its cells as a prefix
cache entry ("idle"); idle entries go least recently used first when cells or ids run out.

A new request starts from the longest common prefix held by any id, running or idle:
`llama_memory_seq_cp` tags those cells with the new id as well (in a unified cache a copy moves no
data and recomputes nothing). So an agent's next turn continues from its last one, and requests that
share a system prompt share its cells.

llama.cpp does not report how many cells are in use, so they are counted here. Cells are made in
runs ("segments"): the tokens one id computes after its last copy or truncation. An id holds its
segments from their start position, so a segment's cells are its start to the furthest position any
holder reaches, and the cells in use are the sum of that over segments. Every count can be checked
against llama.cpp's own `llama_memory_seq_pos_max` (the tests do).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from devstral.engine.block_manager import PrefixCacheStats


class MemoryOps(Protocol):
    """llama.cpp's KV-cache sequence operations (positions [p0, p1), -1 = open end)."""

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool: ...

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None: ...


@dataclass
class Holding:
    tokens: list[int] = field(default_factory=list)  # token at each position 0..len-1 whose cells this id holds
    segments: list[tuple[int, int]] = field(default_factory=list)  # (segment, start position), ascending
    owns_tail: bool = False  # the last segment was made by this id and is not truncated: extend it


def common_prefix(a: list[int], b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != b[:n])
    return int(diff[0]) if diff.size else n


class KVSequences:
    def __init__(self, n_ids: int, n_cells: int, ops: MemoryOps, *, prefix_caching: bool = True):
        self.n_ids, self.num_blocks, self.ops, self.prefix_caching = n_ids, n_cells, ops, prefix_caching
        self.block_size = 1  # /metrics counts this cache in cells
        self.free_ids = list(range(n_ids))
        self.running: set[int] = set()
        self.idle: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.held: dict[int, Holding] = {}
        self._segments = itertools.count()
        self.stats = PrefixCacheStats()

    # ---------------------------------------------------------------- counts
    @property
    def used_cells(self) -> int:
        reach: dict[int, int] = {}
        for h in list(self.held.values()):  # a snapshot: /metrics reads this from the server's event loop
            if not h.segments:
                continue
            ends = [start for _, start in h.segments[1:]] + [len(h.tokens)]
            for (seg, start), end in zip(h.segments, ends, strict=True):
                reach[seg] = max(reach.get(seg, 0), end - start)
        return sum(reach.values())

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.used_cells

    # ---------------------------------------------------------------- a request's id
    def acquire(self, prompt: list[int]) -> tuple[int, int]:
        """An id for a new request, holding the longest reusable prefix of `prompt`: (id, tokens held).
        At least one prompt token is left to compute: its logits give the first new token."""
        src, n = self._best_prefix(prompt) if self.prefix_caching else (None, 0)
        self.stats.queried_tokens += len(prompt)
        self.stats.hit_tokens += n
        if src is not None and src in self.idle and (n == len(self.held[src].tokens) or not self._spare_id(src)):
            del self.idle[src]  # continue that entry itself: nothing else would keep its tail
            self._truncate(src, n)
            self.running.add(src)
            return src, n
        dst = self._take_id(keep=src)
        if src is not None and n:
            self.ops.seq_cp(src, dst, 0, n)
            h = self.held[src]
            self.held[dst] = Holding(h.tokens[:n], [s for s in h.segments if s[1] < n])
        else:
            self.held[dst] = Holding()
        self.running.add(dst)
        return dst, n

    def release(self, seq_id: int, *, keep: bool) -> None:
        """A request ended: its cells become a prefix cache entry (`keep`), or are dropped."""
        self.running.discard(seq_id)
        if keep and self.prefix_caching and self.held[seq_id].tokens:
            self.idle[seq_id] = None
        else:
            self._drop(seq_id)

    def computed(self, seq_id: int, tokens: list[int]) -> None:
        """llama_decode stored these tokens' keys/values for `seq_id`, right after the ones it held."""
        h = self.held[seq_id]
        if not h.owns_tail:
            h.segments.append((next(self._segments), len(h.tokens)))
            h.owns_tail = True
        h.tokens.extend(tokens)

    def make_room(self, n_cells: int) -> bool:
        """Drop idle entries, least recently used first, until `n_cells` are free. False if they cannot be."""
        free = self.num_free
        while free < n_cells and self.idle:
            self._drop(next(iter(self.idle)))
            free = self.num_free
        return free >= n_cells

    def drop_idle(self) -> None:
        for seq_id in list(self.idle):
            self._drop(seq_id)

    def scratch(self) -> int:
        """An empty id outside the prefix cache, for work that `drop` then forgets (teacher forcing)."""
        seq_id = self._take_id(keep=None)
        self.held[seq_id] = Holding()
        return seq_id

    def drop(self, seq_id: int) -> None:
        """Forget an id's cells entirely (a failed request, or scratch work)."""
        self.running.discard(seq_id)
        self._drop(seq_id)

    # ---------------------------------------------------------------- internals
    def _best_prefix(self, prompt: list[int]) -> tuple[int | None, int]:
        cap = len(prompt) - 1
        if cap <= 0 or not self.held:
            return None, 0
        target = np.asarray(prompt[:cap], dtype=np.int64)
        best, best_n = None, 0
        # Idle entries are preferred on a tie (most recent first): continuing one costs no extra id.
        for seq_id in [*reversed(self.idle), *self.running]:
            n = common_prefix(self.held[seq_id].tokens, target)
            if n > best_n:
                best, best_n = seq_id, n
        return best, best_n

    def _spare_id(self, keep: int) -> bool:
        return bool(self.free_ids) or any(i != keep for i in self.idle)

    def _take_id(self, keep: int | None) -> int:
        if not self.free_ids:
            victim = next((i for i in self.idle if i != keep), None)
            if victim is None:
                raise RuntimeError("no llama.cpp sequence id left (more running requests than ids)")
            self._drop(victim)
        return self.free_ids.pop(0)

    def _truncate(self, seq_id: int, n: int) -> None:
        h = self.held[seq_id]
        if n < len(h.tokens):
            self.ops.seq_rm(seq_id, n, -1)
            del h.tokens[n:]
            h.segments = [s for s in h.segments if s[1] < n]
            h.owns_tail = False  # a copy made earlier may hold these positions: new cells start a new segment

    def _drop(self, seq_id: int) -> None:
        self.idle.pop(seq_id, None)
        if seq_id in self.held:
            self.ops.seq_rm(seq_id, -1, -1)
            del self.held[seq_id]
            self.free_ids.append(seq_id)
            self.free_ids.sort()
