"""Which sequences run in the next forward pass, and how many of their tokens.

Each step has a token budget. Running sequences go first, oldest first: one token for a decoding
sequence, the next chunk of the prompt for one still prefilling. Waiting sequences are admitted in
arrival order while the budget, the sequence limit and the free blocks allow, so a long prompt is
prefilled in chunks that share steps with everyone else's decode. When a running sequence needs a
block and none is free, the newest running sequence is preempted: its blocks are freed and it goes
back to the front of the line, to be recomputed later (its prefix is likely still cached).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from devstral.engine.block_manager import BlockManager
from devstral.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    n_tokens: int  # tokens computed this step, from seq.num_computed on

    @property
    def samples(self) -> bool:
        """Does this step reach the sequence's last token, and so sample its next one?"""
        return self.seq.num_computed + self.n_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence wherever it is and free its blocks."""
        if seq.finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.finish(reason)

    def schedule(self) -> list[ScheduledSeq]:
        budget, batch = self.max_num_batched_tokens, []
        # 1. every decoding sequence's next token: decode latency never waits behind a long prompt
        for seq in [s for s in self.running if s.num_uncomputed == 1]:
            if budget == 0:
                break
            if seq.status is Status.RUNNING and self._make_room(seq, seq.num_tokens):
                batch.append(ScheduledSeq(seq, 1))
                budget -= 1
        # 2. prompt chunks: running prefills, then admissions. While several prompts compete, each
        #    first gets at most a quarter of the step, so a short prompt is not stuck behind a long one.
        prefilling = [s for s in self.running if s.num_uncomputed > 1]
        cap = self.max_num_batched_tokens if len(prefilling) + len(self.waiting) <= 1 else \
            max(1, self.max_num_batched_tokens // 4)
        chunks: list[ScheduledSeq] = []
        for seq in prefilling:
            if budget == 0:
                break
            if seq.status is Status.RUNNING:
                n = min(seq.num_uncomputed, budget, cap)
                chunks.append(ScheduledSeq(seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.allocate(seq):
                break  # wait for blocks to free up; arrival order is kept
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget, cap)
            chunks.append(ScheduledSeq(seq, n))
            budget -= n
        for item in chunks:  # what the cap left over goes to the oldest prompts
            extra = min(item.seq.num_uncomputed - item.n_tokens, budget)
            item.n_tokens += extra
            budget -= extra
        return batch + chunks

    def _make_room(self, seq: Sequence, n_tokens: int) -> bool:
        while not self.blocks.ensure_capacity(seq, n_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
