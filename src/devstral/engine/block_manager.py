"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts, and the prefix cache.

A block holds `block_size` consecutive tokens of one or more sequences' caches. A full block is named
by a hash chained over every token before it (its parent block's hash and its own tokens), so two
requests that share a prefix share its blocks: an agent's next turn finds its whole history here.

Freed blocks keep their contents and their hash until the space is needed: blocks that were never
hashed are reused first, then hashed ones in least-recently-freed order. A sequence frees its blocks
last-to-first, so a conversation's tail goes before its head.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from devstral.engine.sequence import Sequence


def block_hash(parent: bytes, tokens: list[int], images: bytes = b"") -> bytes:
    """128-bit chained hash: a collision would need 2^64 blocks, so no token-by-token check is kept.
    `images`: the digests of the images whose tokens the block holds ([IMG] ids alone do not say which
    image they stand for)."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes() + images,
                           digest_size=16).digest()


def image_key(seq: Sequence, block: int, block_size: int) -> bytes:
    """The digests of `seq`'s images that overlap block `block` (empty for text)."""
    if not seq.images:
        return b""
    lo, hi = block * block_size, (block + 1) * block_size
    return b"".join(im.digest for im in seq.images if im.start < hi and im.end > lo)


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of which served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.block_of: dict[bytes, int] = {}
        self.free_plain: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # oldest freed first
        self.stats = PrefixCacheStats()

    @property
    def num_free(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # ---------------------------------------------------------------- allocation
    def allocate(self, seq: Sequence) -> bool:
        """Blocks for all of `seq`'s tokens, the cached prefix reused. False (nothing changed) when
        there is not enough free space. At least one token is always left to compute, because the
        forward pass that computes it is what yields the next token's logits."""
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        reviving = sum(1 for b in hits if self.ref_count[b] == 0)
        fresh = self.blocks_for(seq.num_tokens) - len(hits)
        if fresh > self.num_free - reviving:
            return False
        for b in hits:
            if self.ref_count[b] == 0:
                del self.free_cached[b]
            self.ref_count[b] += 1
        seq.block_table = [*hits, *(self._take() for _ in range(fresh))]
        seq.block_hashes = [self.hash_of[b] for b in hits]
        seq.num_computed = len(hits) * self.block_size
        prompt_hits = min(seq.num_computed, seq.num_prompt_tokens)
        seq.num_cached_prompt_tokens = prompt_hits
        self.stats.queried_tokens += seq.num_prompt_tokens
        self.stats.hit_tokens += prompt_hits
        return True

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        if not self.prefix_caching:
            return []
        bs, parent, hits = self.block_size, b"", []
        for i in range((seq.num_tokens - 1) // bs):
            h = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs], image_key(seq, i, bs))
            b = self.block_of.get(h)
            if b is None:
                break
            hits.append(b)
            parent = h
        return hits

    def _take(self) -> int:
        if self.free_plain:
            b = self.free_plain.popleft()
        else:
            b, _ = self.free_cached.popitem(last=False)  # evict the least recently freed
            self.block_of.pop(self.hash_of[b], None)
            self.hash_of[b] = None
        self.ref_count[b] = 1
        return b

    def ensure_capacity(self, seq: Sequence, n_tokens: int) -> bool:
        """Enough blocks for `seq`'s first n_tokens (a decode step's new token). False if none is free."""
        need = self.blocks_for(n_tokens) - len(seq.block_table)
        if need > self.num_free:
            return False
        seq.block_table.extend(self._take() for _ in range(need))
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Name the blocks that the last forward pass filled, so later requests can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else b""
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            h = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs], image_key(seq, i, bs))
            b = seq.block_table[i]
            if h not in self.block_of and self.hash_of[b] is None:
                self.block_of[h], self.hash_of[b] = b, h
            seq.block_hashes.append(h)
            parent = h

    def free(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                if self.hash_of[b] is not None:
                    self.free_cached[b] = None
                else:
                    self.free_plain.append(b)
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed = 0
