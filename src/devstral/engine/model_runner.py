"""Runs one scheduled step: lays the batch out as one flat row of tokens, runs the model over the
paged cache, and samples the next token of every sequence that reached its end.

A decode row is one query over the paged cache: a decoding sequence's next token, or one of the 1 + k
rows of a sequence verifying k drafts (same block table, row j attending up to its own position, the
keys of the rows before it stored by the same layer just before). On CUDA, a step made only of decode
rows replays a CUDA graph captured for the smallest row-count bucket that holds it (padding rows write
nowhere and are discarded): decode batch sizes and, with speculation, the verify row counts
(speculative.verify_rows). So a verify step costs one launch, like a decode step, instead of ~10
kernels' launch overhead per layer; the CPU runs the same rows eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from devstral.config import ModelConfig
from devstral.engine.attention import BatchAttention, PrefillChunk
from devstral.engine.constraints import apply_mask
from devstral.engine.image_embeds import ImageEmbedder
from devstral.engine.kv_pool import KVPool
from devstral.engine.sampling import MIN_TEMPERATURE, sample
from devstral.engine.scheduler import ScheduledSeq
from devstral.engine.sequence import Sequence
from devstral.engine.speculative import accept_greedy, verify
from devstral.errors import DevstralError, NonFiniteLogitsError
from devstral.kernels import decode_advance, greedy_pick, triton_available
from devstral.kernels.moe_experts import routed_only
from devstral.model.moe import graph_safe
from devstral.model.transformer import Transformer

log = logging.getLogger("devstral.engine")


@dataclass
class StepInputs:
    """One step's model inputs as host arrays: picklable, so rank 0 can send them to the others."""

    tokens: np.ndarray  # [N] int64, decode rows first
    positions: np.ndarray  # [N] int64
    slots: np.ndarray  # [N] int64: where each token's keys/values go in the pool
    tables: np.ndarray  # [n_decode, width] int32: the decode rows' block tables
    context: np.ndarray  # [n_decode] int32: keys each decode row attends to, its own included
    chunks: list[tuple[int, int, int, np.ndarray]]  # prefill chunks: (offset, length, start, block table)
    select: np.ndarray | None  # rows whose logits are needed; None: a prefill-only step
    graph: bool  # replay the captured decode graph
    images: list = field(default_factory=list)  # (first row, first position, tokens, images) of chunks with images


@dataclass
class Launched:
    """An overlapped decode step on its way (Engine.step): one plain decode row per item, its sampled
    tokens still on the device while the host goes on."""

    batch: list[ScheduledSeq]
    tokens: torch.Tensor  # [n] on the device: the next step's input ids
    host: torch.Tensor  # [2, n]: the tokens and the rows' NaN flags, copying to the host
    done: torch.cuda.Event | None  # recorded after that copy (CUDA)
    rows: int | None  # the runner's last_step_rows for it
    started: float = 0.0  # perf_counter when its cost starts counting (the engine's step costs)

    def result(self) -> tuple[list[int], list[int]]:
        """(tokens, NaN flags), waiting for this step only: the step launched after it keeps running."""
        if self.done is not None:
            self.done.synchronize()
        tokens, bad = self.host.tolist()
        return tokens, bad


def graph_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs] if max_num_seqs <= 256 else sizes


@dataclass
class Ahead:
    """What the decode graphs' buffers hold after a replay that advanced them (decode_advance): the step after
    that replay, for these sequences in this order, if each has since been scheduled exactly one token further
    and its new position falls inside the block table the buffers hold (recorded as its length and last entry:
    a table only grows at its end)."""

    bucket: int
    seqs: list[Sequence]
    positions: list[int]  # the position each row's buffers now hold
    tables: list[tuple[int, int]]  # (length, last block) of each row's block table in the buffers

    def holds(self, batch: list[ScheduledSeq], block_size: int) -> bool:
        if len(batch) != len(self.seqs):
            return False
        for item, seq, pos, (n, last) in zip(batch, self.seqs, self.positions, self.tables, strict=True):
            table = item.seq.block_table
            if (item.seq is not seq or item.n_tokens != 1 or item.draft or seq.num_computed != pos
                    or pos // block_size >= n or len(table) < n or table[n - 1] != last):
                return False
        return True

    def advanced(self) -> Ahead:
        return Ahead(self.bucket, self.seqs, [p + 1 for p in self.positions], self.tables)


class _DecodeGraphs:
    """Static input buffers and one captured graph per batch-size bucket. With decode_advance on, each graph
    ends by picking every row's greedy token and moving its own inputs on by one (`ahead` then says which
    step a bare replay runs)."""

    def __init__(self, runner: ModelRunner, buckets: list[int]):
        """`buckets`: row counts, each captured once."""
        dev, bmax = runner.device, max(buckets)
        self.tokens = torch.zeros(bmax, dtype=torch.long, device=dev)
        self.positions = torch.zeros(bmax, dtype=torch.long, device=dev)
        self.slots = torch.full((bmax,), -1, dtype=torch.long, device=dev)  # -1: a padding row, never advanced
        self.tables = torch.zeros(bmax, runner.max_blocks, dtype=torch.int32, device=dev)
        self.context = torch.ones(bmax, dtype=torch.int32, device=dev)
        self.advance = decode_advance.enabled()
        self.ahead: Ahead | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None]] = {}
        pool = torch.cuda.graph_pool_handle()
        for b in sorted(buckets, reverse=True):  # the largest first: the others reuse its memory
            attn = runner.decode_attention(self.slots[:b], self.tables[:b], self.context[:b])
            run = lambda b=b, attn=attn: self._forward(runner, b, attn)  # noqa: E731
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compile and autotune the kernels outside the capture
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out, picked = run()
            self.graphs[b] = (graph, out, picked)
        self.buckets = sorted(self.graphs)

    def _forward(self, runner: ModelRunner, b: int, attn: BatchAttention) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = runner.model(self.tokens[:b][None], self.positions[:b][None], cache=attn)[0]
        if not self.advance:
            return logits, None
        picked = greedy_pick.greedy_pick(logits)  # [2, b]: tokens and NaN flags
        decode_advance.advance(self.tokens[:b], picked[0], self.positions[:b], self.slots[:b], self.context[:b],
                               self.tables[:b], runner.block_size)
        return logits, picked

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def run(self, n: int, tokens, positions, slots, tables: torch.Tensor, context) -> torch.Tensor:
        b = self.bucket(n)
        self.ahead = None  # the launch that asked for this replay records what it leaves, if it can
        self.tokens[:n].copy_(tokens, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slots[:n].copy_(slots, non_blocking=True)
        self.slots[n:b].fill_(-1)
        self.tables[:n, :tables.shape[1]].copy_(tables, non_blocking=True)
        self.context[:n].copy_(context, non_blocking=True)
        self.context[n:b].fill_(1)
        graph, out, _ = self.graphs[b]
        graph.replay()
        return out[:n]

    def picked(self, n: int) -> torch.Tensor:
        """The last replay's greedy tokens and NaN flags, [2, n] (advancing graphs only; overwritten by the next)."""
        return self.graphs[self.bucket(n)][2][:, :n]

    def replay_ahead(self) -> torch.Tensor:
        """Replay the step the buffers hold (`ahead`) as they are; its picked [2, rows]."""
        ahead = self.ahead
        graph, _, picked = self.graphs[ahead.bucket]
        graph.replay()
        self.ahead = ahead.advanced()
        return picked[:, :len(ahead.seqs)]


class ModelRunner:
    def __init__(self, model: Transformer, cfg: ModelConfig, pool: KVPool, *, max_num_seqs: int,
                 max_context: int, cuda_graphs: bool, images: ImageEmbedder | None = None,
                 verify_rows: list[int] | tuple[int, ...] = ()):
        """`verify_rows`: row counts of verify steps to capture besides the decode batch sizes."""
        self.model, self.cfg, self.pool = model, cfg, pool
        self.images = images  # the vision encoder's side, for prompts with images
        self.device = next(model.parameters()).device
        self.block_size = pool.block_size
        self.max_context = max_context
        self.max_blocks = -(-max_context // pool.block_size)
        self.scale = cfg.head_dim ** -0.5
        self.graphs: _DecodeGraphs | None = None
        self.broadcast: Callable[[StepInputs], None] | None = None  # set on rank 0 under tensor parallelism
        # The rows of the last step for the engine's cost table: its graph bucket, or its row count on an
        # engine without graphs; None for a step that ran eagerly beside graphs or had prefill chunks.
        self.last_step_rows: int | None = None
        # Graphs need the Triton kernels: the references synchronise with the host (.tolist()).
        # A MoE layer is capturable once fuse() stacked its experts for the routed-expert kernels (no host
        # sync); on the reference path its gathers are sized on the host, so the model runs eagerly
        if cuda_graphs and self.device.type == "cuda" and triton_available() and graph_safe(model):
            self.capture(sorted(set(graph_buckets(max_num_seqs)) | set(verify_rows)))

    def capture(self, buckets: list[int]) -> None:
        try:
            with torch.inference_mode(), routed_only():  # MoE layers: the graph-safe path at every bucket
                self.graphs = _DecodeGraphs(self, buckets)
        except torch.OutOfMemoryError:
            self.graphs = None
            torch.cuda.empty_cache()
            log.warning("warning: not enough GPU memory to capture CUDA graphs; decoding eagerly "
                        "(lower --gpu-memory-fraction or --parallel to leave room for them)")

    @property
    def row_buckets(self) -> list[int]:
        """The row counts replayed as CUDA graphs, ascending (empty: every step runs eagerly)."""
        return list(self.graphs.buckets) if self.graphs is not None else []

    def decode_attention(self, slots, tables, context) -> BatchAttention:
        return BatchAttention(self.pool, slots, slots.shape[0], tables, context, self.max_context, self.scale,
                              self.cfg.sliding_window)

    # ---------------------------------------------------------------- one step
    @torch.inference_mode()
    def step(self, batch: list[ScheduledSeq]) -> dict[Sequence, list[int]]:
        """Run the batch; return the new tokens of each sequence that reached its end (one sampled token,
        or the kept drafts and one sampled token for a sequence that speculated)."""
        batch = sorted(batch, key=lambda s: not _decode_rows(s))  # decode rows first
        logits, sampling = self._forward(batch)
        if not sampling:
            return {}
        rows, row = [], 0  # the logits rows of each sampling item: its drafts' too
        for item in sampling:
            rows.append(slice(row, row + 1 + len(item.draft)))
            row += 1 + len(item.draft)
        self._check_finite(logits, sampling, rows)
        out: dict[Sequence, list[int]] = {}
        plain = [i for i, item in enumerate(sampling) if not item.draft]
        if plain:
            seqs = [sampling[i].seq for i in plain]
            lg = logits if len(plain) == len(sampling) else logits[[rows[i].start for i in plain]]
            lg = self._constrain(lg, seqs)
            tokens = sample(lg, [s.params for s in seqs], [s.token_ids for s in seqs], [s.generator for s in seqs])
            self._logprobs(lg, tokens, seqs)
            out.update((s, [t]) for s, t in zip(seqs, tokens.tolist(), strict=True))
        drafted = [i for i, item in enumerate(sampling) if item.draft]
        greedy = [i for i in drafted if sampling[i].seq.params.temperature < MIN_TEMPERATURE]
        top = logits.argmax(-1).tolist() if greedy else []  # one host sync for every greedy verification
        for i in drafted:
            item = sampling[i]
            if i in greedy:
                out[item.seq] = accept_greedy(item.draft, top[rows[i]])
            else:
                out[item.seq] = verify(logits[rows[i]], item.draft, item.seq.params, item.seq.generator)
        return out

    @torch.inference_mode()
    def launch(self, batch: list[ScheduledSeq], after: Launched | None = None) -> Launched:
        """Start a step of plain decode rows (no drafts, nothing that needs the host between steps) and
        its sampling without waiting for them. `after`: the launched step whose sampled tokens are this
        step's input ids (the items are `pending`): they go from its device tensor into this step's
        inputs, never through the host."""
        seqs = [item.seq for item in batch]
        greedy = all(s.params.temperature < MIN_TEMPERATURE and s.params.repeat_penalty == 1.0 for s in seqs)
        graphs = self.graphs
        if greedy and graphs is not None and graphs.ahead is not None and graphs.ahead.holds(batch, self.block_size):
            self.last_step_rows = graphs.ahead.bucket
            picked = graphs.replay_ahead()  # the graph left this step's inputs in its buffers: no copy
            return self._launched(batch, picked[0], picked)
        inputs, _ = self.step_inputs(batch)
        tokens = None
        if after is not None:
            row = {item.seq: i for i, item in enumerate(after.batch)}
            take = [row[item.seq] for item in batch]
            tokens = after.tokens if take == list(range(len(after.batch))) else after.tokens[take]
        logits = self.run(inputs, tokens)
        if greedy and inputs.graph and graphs.advance:
            picked = graphs.picked(len(batch))  # the graph picked them and advanced its inputs
            tables = [(len(s.block_table), s.block_table[-1]) for s in seqs]
            graphs.ahead = Ahead(self.last_step_rows, seqs, [s.num_computed + 1 for s in seqs], tables)
            return self._launched(batch, picked[0], picked)
        if greedy and greedy_pick.enabled():
            picked = greedy_pick.greedy_pick(logits)  # sample()'s tokens and the NaN flags in one launch
            return self._launched(batch, picked[0], picked)
        new = sample(logits, [s.params for s in seqs], [s.token_ids for s in seqs], [s.generator for s in seqs])
        return self._launched(batch, new, torch.stack([new, torch.isnan(logits).any(-1).long()]))

    def _launched(self, batch: list[ScheduledSeq], new: torch.Tensor, flagged: torch.Tensor) -> Launched:
        """`flagged` [2, n]: the tokens and NaN flags, copied to the host without waiting."""
        host = flagged.to("cpu", non_blocking=True)
        done = None
        if self.device.type == "cuda":  # the copy lands in pinned memory; the event says when
            done = torch.cuda.Event()
            done.record()
        return Launched(batch, new, host, done, self.last_step_rows)

    @torch.inference_mode()
    def chunk_logits(self, item: ScheduledSeq) -> torch.Tensor:
        """Logits [n, vocab] at every token of one sequence's scheduled chunk (teacher forcing through
        the paged cache: how the tests and `eval kld` score a cache kind or a chunking)."""
        return self._forward([item], all_rows=True)[0]

    def _forward(self, batch: list[ScheduledSeq], all_rows: bool = False) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        inputs, sampling = self.step_inputs(batch, all_rows)
        if self.broadcast is not None:  # tensor parallel: the other ranks run the same inputs
            self.broadcast(inputs)
        return self.run(inputs), sampling

    def step_inputs(self, batch: list[ScheduledSeq], all_rows: bool = False) -> tuple[StepInputs, list[ScheduledSeq]]:
        """The step as host arrays (what rank 0 sends the other tensor-parallel ranks) and the items
        that sample, in logits-row order."""
        bs = self.block_size
        tokens, positions, slots, select, sampling = [], [], [], [], []
        image_spans = []  # (first row in the flat batch, first position, tokens, images) of chunks with images
        decode = [s for s in batch if _decode_rows(s)]  # the batch's first items (step() sorts them so)
        for item in batch:
            seq, start = item.seq, item.seq.num_computed
            if seq.images:
                image_spans.append((len(tokens), start, item.n_tokens - len(item.draft), seq.images))
            pos = np.arange(start, start + item.n_tokens)
            table = np.asarray(seq.block_table, dtype=np.int64)
            tokens.extend(item.input_ids())
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if item.samples:  # a speculating sequence needs the logits of its drafts' positions too
                select.extend(range(len(tokens) - 1 - len(item.draft), len(tokens)))
                sampling.append(item)
        nd = sum(s.n_tokens for s in decode)  # decode rows: a verifying sequence has 1 + k of them
        width = max((len(s.seq.block_table) for s in decode), default=1)
        tables = np.zeros((nd, width), dtype=np.int32)
        context = np.empty(nd, dtype=np.int32)
        row = 0
        for s in decode:
            tables[row:row + s.n_tokens, :len(s.seq.block_table)] = s.seq.block_table
            context[row:row + s.n_tokens] = np.arange(s.seq.num_computed + 1, s.seq.num_computed + 1 + s.n_tokens)
            row += s.n_tokens
        if all_rows:
            select = list(range(len(tokens)))
        graph = (not all_rows and not image_spans and self.graphs is not None and len(decode) == len(batch)
                 and len(sampling) == len(decode) and self.graphs.bucket(nd) is not None)
        if graph:
            self.last_step_rows = self.graphs.bucket(nd)
        else:
            self.last_step_rows = nd if self.graphs is None and len(decode) == len(batch) else None
        chunks, offset = [], nd
        for item in batch[len(decode):]:
            chunks.append((offset, item.n_tokens, item.seq.num_computed,
                           np.asarray(item.seq.block_table, dtype=np.int32)))
            offset += item.n_tokens
        inputs = StepInputs(np.asarray(tokens, dtype=np.int64), np.concatenate(positions), np.concatenate(slots),
                            tables, context, chunks, np.asarray(select, dtype=np.int64) if select else None, graph,
                            image_spans)
        return inputs, sampling

    def run(self, inputs: StepInputs, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The forward pass of one step's inputs: logits of the selected rows ([0] when none). `tokens`:
        the input ids already on the device, instead of inputs.tokens (see launch)."""
        dev = self.device
        tok = tokens if tokens is not None else torch.from_numpy(inputs.tokens).to(dev, non_blocking=True)
        pos = torch.from_numpy(inputs.positions).to(dev, non_blocking=True)
        slot = torch.from_numpy(inputs.slots).to(dev, non_blocking=True)
        tables_t = torch.from_numpy(inputs.tables).to(dev, non_blocking=True)
        context = torch.from_numpy(inputs.context).to(dev, non_blocking=True)
        nd = len(inputs.context)
        if inputs.graph:
            return self.graphs.run(nd, tok, pos, slot, tables_t, context)
        chunks = [PrefillChunk(offset, length, start, torch.from_numpy(table).to(dev, non_blocking=True))
                  for offset, length, start, table in inputs.chunks]
        attn = BatchAttention(self.pool, slot, nd, tables_t, context, self.max_context, self.scale,
                              self.cfg.sliding_window, chunks)
        inject = None
        if inputs.images:
            if self.images is None:
                raise DevstralError("this prompt has images but the model has no vision encoder")
            inject = self.images.injection(inputs.images, dev)
        if inputs.select is None:  # prefill chunks only: fill the cache
            self.model.hidden_states(tok[None], pos[None], cache=attn, inject=inject)
            return torch.empty(0)
        sel = torch.from_numpy(inputs.select).to(dev, non_blocking=True)
        return self.model(tok[None], pos[None], cache=attn, select=sel, inject=inject)[0]

    @staticmethod
    def _check_finite(logits: torch.Tensor, sampling: list[ScheduledSeq], rows: list[slice]) -> None:
        """A sequence whose logits hold NaN (broken weights, an fp16 overflow) fails with an error that
        says so (the engine sees .error), instead of sampling from garbage; the batch goes on."""
        bad = torch.isnan(logits).any(-1).tolist()
        for item, r in zip(sampling, rows, strict=True):
            if any(bad[r]):
                flag_nonfinite(item.seq)

    @staticmethod
    def _constrain(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        # The masks are computed here, on the CPU, while the GPU is still running the forward pass.
        rows = [i for i, s in enumerate(seqs) if s.constraint is not None]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            try:
                logits[i] = apply_mask(logits[i], seqs[i].constraint.allowed_tokens())
            except Exception as e:  # this sequence fails (the engine sees .error); the batch goes on
                seqs[i].error = e
        return logits

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]) -> None:
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return
        lp = torch.log_softmax(logits[rows].float(), dim=-1)
        n_top = max(seqs[i].params.logprobs for i in rows)
        top = torch.topk(lp, n_top) if n_top > 0 else None
        chosen = lp.gather(1, tokens[rows][:, None]).squeeze(1).tolist()
        top_v = top.values.tolist() if top is not None else [[] for _ in rows]
        top_i = top.indices.tolist() if top is not None else [[] for _ in rows]
        for j, i in enumerate(rows):
            n = seqs[i].params.logprobs
            seqs[i].logprobs.append((chosen[j], list(zip(top_i[j][:n], top_v[j][:n], strict=True))))


def flag_nonfinite(seq: Sequence) -> None:
    if seq.error is None:
        seq.error = NonFiniteLogitsError(seq.num_output_tokens)


def _decode_rows(item: ScheduledSeq) -> bool:
    """Is this item computed as decode rows (one query per token over the paged cache)? A single token,
    or a verifying sequence's last token and drafts."""
    return item.n_tokens == 1 or bool(item.draft)
