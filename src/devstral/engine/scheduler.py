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
from dataclasses import dataclass, field

from devstral.engine.block_manager import BlockManager
from devstral.engine.sequence import Sequence, Status
from devstral.engine.speculative import K_MAX, Drafter, StepCosts, speculation_allowed


@dataclass
class ScheduledSeq:
    seq: Sequence
    n_tokens: int  # tokens computed this step, from seq.num_computed on (drafts included)
    draft: list[int] = field(default_factory=list)  # speculative tokens after the sequence's last one
    # Overlapped decode: the input token is the one the step in flight samples, not yet on the host.
    pending: bool = False

    @property
    def samples(self) -> bool:
        """Does this step reach the sequence's last token, and so sample its next one?"""
        return self.seq.num_computed + self.n_tokens - len(self.draft) == self.seq.num_tokens + self.pending

    def input_ids(self) -> list[int]:
        if self.pending:
            return [0]  # a placeholder: the runner takes the id from the device
        start = self.seq.num_computed
        return [*self.seq.token_ids[start:start + self.n_tokens - len(self.draft)], *self.draft]


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_context: int | None = None, speculative: str = "off", spec_max_batch: int = 8,
                 spec_k_max: int = K_MAX, step_costs: StepCosts | None = None):
        self.blocks = blocks
        self.step_costs = step_costs  # measured by the engine: whether a draft pays for its verify step
        # The row counts the runner replays as CUDA graphs (ascending; empty: every step runs eagerly).
        # Drafts are sized so that a step's decode rows fill one exactly.
        self.row_buckets: list[int] = []
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_context = max_context
        self.speculative, self.spec_max_batch, self.spec_k_max = speculative, spec_max_batch, spec_k_max
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
        # 1. every decoding sequence's next token (and its drafts): decode latency never waits behind a
        #    long prompt. Speculation pays while steps are bound by reading the weights: small batches.
        decoding = [s for s in self.running if s.num_uncomputed == 1]
        speculate = self.speculative == "lookup" and len(self.running) <= self.spec_max_batch
        rows = len(decoding)  # the step's decode rows so far: one per decoding sequence, plus drafts
        for seq in decoding:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue
            draft = self._draft(seq, budget - 1, len(decoding), rows) if speculate else []
            if draft and self.blocks.blocks_for(seq.num_tokens + len(draft)) - len(seq.block_table) > \
                    self.blocks.num_free:
                draft = []  # drafts are optional: never preempt anyone to verify them
            if self._make_room(seq, seq.num_tokens + len(draft)):
                batch.append(ScheduledSeq(seq, 1 + len(draft), draft))
                budget -= 1 + len(draft)
                rows += len(draft)
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

    def schedule_after(self, launched: list[Sequence]) -> list[ScheduledSeq] | None:
        """The overlapped decode's next step: the plain decode step that follows a launched one whose
        tokens the host has not read yet (each sequence's num_computed already counts its launched row),
        or None where the next step must wait for them: an admission, a sequence still prefilling, a
        draft, a preemption. A sequence that reaches its length limit with the token in flight gets no
        row; one that samples a stop token gets a row that the engine discards."""
        if self.waiting and len(self.running) < self.max_num_seqs:
            return None  # an admission (schedule() would try one): its prefill runs the normal way
        in_flight = set(launched)
        if any(s not in in_flight or not overlappable(s) for s in self.running):
            return None
        seqs = [s for s in self.running if not self._ends_with_next_token(s)]
        if len(seqs) > self.max_num_batched_tokens:
            return None
        speculate = self.speculative == "lookup" and len(self.running) <= self.spec_max_batch
        skips = []  # drafters whose skipped step is counted once the step is sure to run
        for i, seq in enumerate(seqs):
            if speculate and speculation_allowed(seq.params, False):
                ks, ratio = self._draft_options(seq, self.max_num_batched_tokens - i - 1, len(seqs), len(seqs),
                                                ahead=1)
                if seq.drafter.plan(ks, ratio):
                    return None  # it drafts from its last token: the host needs it first
                skips.append((seq.drafter, ks, ratio))
            if not self.blocks.ensure_capacity(seq, seq.num_tokens + 1):
                return None  # schedule() preempts someone
        for drafter, ks, ratio in skips:
            drafter.choose(ks, ratio)  # no draft (plan said so): counted like a step of schedule()'s
        return [ScheduledSeq(seq, 1, pending=True) for seq in seqs]

    def _ends_with_next_token(self, seq: Sequence) -> bool:
        """Does the token in flight take `seq` to its length limit (Engine._append's test, one ahead)?"""
        return seq.num_output_tokens + 1 >= seq.max_tokens or (
            self.max_context is not None and seq.num_tokens + 1 >= self.max_context)

    def bucket(self, rows: int) -> int:
        """The row count a step of `rows` decode rows runs as: its graph bucket, else itself."""
        return next((b for b in self.row_buckets if b >= rows), rows)

    def _draft(self, seq: Sequence, budget: int, n_seqs: int, rows: int) -> list[int]:
        """Drafts for `seq` in a step of `n_seqs` decoding sequences whose decode rows number `rows` so
        far (this sequence's own row included)."""
        if not speculation_allowed(seq.params, seq.constraint is not None):
            return []
        ks, ratio = self._draft_options(seq, budget, n_seqs, rows)
        return seq.drafter.propose(seq.token_ids, ks, ratio)

    def _draft_options(self, seq: Sequence, budget: int, n_seqs: int, rows: int, ahead: int = 0):
        """(the draft counts `seq` can take, what each costs in plain steps) for _draft; `ahead`: tokens
        it gains before that step (the overlapped decode's token in flight)."""
        if seq.drafter is None:
            seq.drafter = Drafter(self.spec_k_max)
        limit = min(budget, seq.max_tokens - seq.num_output_tokens - ahead - 1, self.spec_k_max)
        if self.max_context is not None:
            limit = min(limit, self.max_context - seq.num_tokens - ahead - 1)
        if self.row_buckets:  # the step lands on a captured row count, or the drafts would be padding
            ks = [b - rows for b in self.row_buckets if rows < b <= rows + limit]
        else:
            ks = list(range(1, limit + 1))
        costs, bucket = self.step_costs, self.bucket
        ratio = None if costs is None else (
            lambda k: costs.ratio(bucket(n_seqs), bucket(rows), bucket(rows + k)))
        return ks, ratio

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


def overlappable(seq: Sequence) -> bool:
    """Can `seq`'s next decode step be launched before its last token reaches the host? Not where the
    host needs that token first: a constraint masks the next logits by it, the repeat penalty reads it,
    logprobs are read per token; nor with images (their rows run eagerly, not as plain decode rows)."""
    p = seq.params
    return seq.constraint is None and p.logprobs is None and p.repeat_penalty == 1.0 and not seq.images
