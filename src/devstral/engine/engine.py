"""The engine: sequences in, tokens out, one batched forward pass per `step()`.

It owns the paged KV pool (sized from the memory there is), the block manager with its prefix cache,
the scheduler and the model runner. Callers add sequences and read the tokens the engine appends to
them; whoever drives the loop (the CLI's generator, or the server's worker thread) calls `step()`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import psutil
import torch

from devstral.config import ModelConfig
from devstral.engine.block_manager import BlockManager
from devstral.engine.image_embeds import ImageEmbedder
from devstral.engine.kv_pool import KVPool, parse_kv_kind, pool_tokens_for_memory
from devstral.engine.model_runner import Launched, ModelRunner, flag_nonfinite
from devstral.engine.sampling import SamplingParams
from devstral.engine.scheduler import ScheduledSeq, Scheduler, overlappable
from devstral.engine.sequence import Sequence
from devstral.engine.speculative import StepCosts, verify_rows
from devstral.errors import DevstralError
from devstral.kernels.kv_format import bytes_per_token
from devstral.model.transformer import Transformer
from devstral.model.vision import VisionModel
from devstral.prompt.images import PromptImage, images_of

GIB = 1 << 30


@dataclass
class EngineConfig:
    max_context: int | None = None  # None: the model's whole window, where memory allows
    max_num_seqs: int = 1  # sequences batched together (serve --parallel)
    max_num_batched_tokens: int | None = None  # tokens per step; None: 8192 on CUDA, 512 on CPU
    block_size: int = 16
    kv_cache_dtype: str = "auto"
    gpu_memory_fraction: float = 0.90  # of the whole GPU, weights included, as vLLM counts it
    cpu_memory_fraction: float = 0.50  # of the RAM available after loading, for the CPU's KV pool
    cuda_graphs: bool = True
    prefix_caching: bool = True
    speculative: str = "lookup"  # "off" or "lookup" (prompt-lookup drafts, verified exactly)
    spec_max_batch: int = 8  # draft only while at most this many sequences run
    # Launch a decode step before reading the previous one's tokens (Engine.step). None: on for CUDA, where
    # it hides the host's share of a step (+7% decode on an H200), unless DEVSTRAL_OVERLAP=0; off on CPU,
    # where the host is the device.
    overlap: bool | None = None


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    drafted_tokens: int = 0  # speculative drafts verified
    accepted_tokens: int = 0  # of which kept
    batch_sizes: list[int] = field(default_factory=list)  # recent sequences per step


def plan_memory(model: Transformer, cfg: ModelConfig, ec: EngineConfig, kind: str,
                device: torch.device) -> tuple[int, int]:
    """(max_context, pool tokens): the pool takes what memory allows; the context is the model's window
    (or what was asked) when one sequence of it fits in the pool."""
    per_token = bytes_per_token(kind, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    wanted = ec.max_context or cfg.max_position_embeddings
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserve = _activation_bytes(cfg, ec, device) + _expert_scratch_bytes(model, cfg)
        budget = int(total * ec.gpu_memory_fraction) - (total - free) - reserve
        knob = "--gpu-memory-fraction"
    else:
        budget = int(psutil.virtual_memory().available * ec.cpu_memory_fraction)
        knob = "free RAM"
    pool = pool_tokens_for_memory(cfg, kind, max(budget, 0))
    pool -= pool % ec.block_size
    # Whole contexts for every slot (on CUDA twice that, so the prefix cache keeps past turns), rounded
    # up to whole blocks: more would only take memory from other models in the process.
    useful = wanted * max(ec.max_num_seqs, 1) * (2 if device.type == "cuda" else 1)
    pool = min(pool, -(-useful // ec.block_size) * ec.block_size)
    if pool < ec.block_size:
        raise DevstralError(f"no memory left for the KV cache ({max(budget, 0) / GIB:.2f} GiB after the weights; "
                            f"{per_token / 1024:.0f} KiB per token): raise {knob}, use --kv-cache-dtype q8_0, "
                            f"or load a smaller model")
    if ec.max_context and ec.max_context > pool:
        raise DevstralError(f"--ctx-size {ec.max_context} needs {ec.max_context * per_token / GIB:.1f} GiB of KV cache "
                            f"but {pool * per_token / GIB:.1f} GiB fit ({pool} tokens): lower --ctx-size, use "
                            f"--kv-cache-dtype q8_0, or raise {knob}")
    ctx = min(wanted, pool)
    if ctx < wanted:
        print(f"note: context capped at {ctx} tokens by memory for the KV cache (the model allows {wanted}); "
              f"--kv-cache-dtype q8_0 or {knob} gives more", file=sys.stderr)
    return ctx, pool


def _activation_bytes(cfg: ModelConfig, ec: EngineConfig, device: torch.device) -> int:
    """Peak memory of a forward step beyond the weights, from the model's shapes: the widest
    intermediate (q/k/v and gate/up for every token of a step), attention over a chunk, and logits for
    every sequence, with headroom for the allocator and CUDA graphs."""
    tokens = _batched_tokens(ec, device)
    elt = 2
    mlp = tokens * cfg.hidden_dim * 2 * elt * 2
    attn = tokens * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim * elt * 4
    logits = max(ec.max_num_seqs, 1) * cfg.vocab_size * 4 * 4
    return mlp + attn + logits + 2 * GIB


def _expert_scratch_bytes(model: Transformer, cfg: ModelConfig) -> int:
    """A MoE model with quantized experts prefilling through DEVSTRAL_MOE_GROUPED=dequant (the default)
    dequantizes one projection's experts to bf16 first (kernels/moe_experts.py): E x hidden x dim values
    of scratch. DEVSTRAL_MOE_GROUPED=triton (moe_grouped_gemm.py) dequantizes tiles in registers and the
    fallback (one quantized linear per expert) uses gguf_linear's own bounded scratch: neither needs it."""
    from devstral.kernels.moe_experts import grouped_mode
    from devstral.quant.linear import QuantLinear

    if not cfg.n_experts or grouped_mode() != "dequant" or not any(isinstance(m, QuantLinear) for m in model.modules()):
        return 0
    return cfg.n_experts * cfg.hidden_dim * cfg.dim * 2


def _batched_tokens(ec: EngineConfig, device: torch.device) -> int:
    return ec.max_num_batched_tokens or (8192 if device.type == "cuda" else 512)


class Engine:
    def __init__(self, model: Transformer, cfg: ModelConfig, ec: EngineConfig, *, compute_dtype: torch.dtype,
                 plan: tuple[int, int] | None = None, vision: VisionModel | None = None):
        self.cfg, self.ec = cfg, ec
        self.device = next(model.parameters()).device
        self.overlap = ec.overlap if ec.overlap is not None else (
            self.device.type == "cuda" and os.environ.get("DEVSTRAL_OVERLAP", "1") != "0")
        self.kind = parse_kv_kind(ec.kv_cache_dtype, compute_dtype, self.device)
        self.max_context, pool_tokens = plan or plan_memory(model, cfg, ec, self.kind, self.device)
        if self.device.type == "cuda":
            model.fuse_projections()
        self.pool = KVPool(cfg, pool_tokens // ec.block_size, ec.block_size, self.kind, self.device)
        self.blocks = BlockManager(self.pool.num_blocks, ec.block_size, prefix_caching=ec.prefix_caching)
        if ec.speculative not in ("off", "lookup"):
            raise DevstralError(f"--speculative: unknown value {ec.speculative!r} (choose off or lookup)")
        self.step_costs = StepCosts()
        self.scheduler = Scheduler(self.blocks, max_num_seqs=ec.max_num_seqs,
                                   max_num_batched_tokens=_batched_tokens(ec, self.device),
                                   max_context=self.max_context, speculative=ec.speculative,
                                   spec_max_batch=ec.spec_max_batch, step_costs=self.step_costs)
        self.images = ImageEmbedder(vision) if vision is not None else None
        spec_rows = verify_rows(ec.max_num_seqs, ec.spec_max_batch) if ec.speculative == "lookup" else []
        self.runner = ModelRunner(model, cfg, self.pool, max_num_seqs=ec.max_num_seqs,
                                  max_context=self.max_context, cuda_graphs=ec.cuda_graphs, images=self.images,
                                  verify_rows=spec_rows)
        self.scheduler.row_buckets = self.runner.row_buckets
        self.stats = EngineStats()
        self._in_flight: Launched | None = None  # the overlapped decode's step on the device

    # ---------------------------------------------------------------- requests
    def add(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, stop_ids: set[int], *,
            images: list[PromptImage] | None = None) -> Sequence:
        """`images`: where the prompt's [IMG] tokens get their embeddings (prompt/images.PromptIds)."""
        if len(prompt_ids) + max_tokens > self.max_context:
            raise DevstralError(f"prompt of {len(prompt_ids)} tokens plus {max_tokens} new ones exceeds the "
                                f"context size {self.max_context}")
        if images and self.images is None:
            raise DevstralError("this prompt has images but the model has no vision encoder")
        seq = Sequence(prompt_ids, params, max_tokens, stop_ids, device=self.device, images=images)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence, reason: str = "cancelled") -> None:
        self.scheduler.finish(seq, reason)

    def has_work(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---------------------------------------------------------------- the loop
    def step(self) -> list[Sequence]:
        """One forward pass over everything scheduled; returns the sequences that got a token.

        With `overlap`, a step of plain decode rows (scheduler.overlappable sequences, no drafts) is
        launched without waiting for its tokens; the next call launches the step after it, with those
        tokens as its input ids on the device, and only then reads them and appends them: the host's
        work for one step runs while the device computes the next. Each call still returns one step's
        tokens, as without overlap. The step after a launched one sees the tokens one step late: a
        sequence that samples a stop token had a row in it whose token is discarded (its key/value
        write lands in its own freed block, before anyone else's in stream order), as is the row of a
        sequence aborted meanwhile. Anything else (an admission, a draft, a constraint) lets the step
        in flight finish alone, and the next call takes the normal path."""
        if self._in_flight is None:
            batch = self.scheduler.schedule()
            if not batch:
                if self.scheduler.waiting and not self.scheduler.running:  # cannot happen: add() checks the size
                    raise RuntimeError("the KV pool cannot hold the next waiting sequence")
                return []
            if not self._overlaps(batch):
                return self._step_sync(batch)
            try:
                self._in_flight = self._launch(batch)
            except Exception as e:
                return self._fail_batch(batch, e)
        launched, self._in_flight = self._in_flight, None
        after = self.scheduler.schedule_after([item.seq for item in launched.batch])
        if after:
            try:
                self._in_flight = self._launch(after, launched)
            except Exception as e:
                done = self._finish(launched)
                self._fail_batch(after, e)
                return done
        done = self._finish(launched)
        if self._in_flight is not None:  # its cost counts from the tokens before it: what overlap leaves
            self._in_flight.started = time.perf_counter()
        return done

    def _overlaps(self, batch: list[ScheduledSeq]) -> bool:
        # Tensor parallel: the other ranks get each step's input ids as host arrays (runner.broadcast),
        # which an overlapped step does not have, so it runs every step the normal way.
        return self.overlap and self.runner.broadcast is None and all(
            item.n_tokens == 1 and not item.draft and item.samples and overlappable(item.seq) for item in batch)

    def _launch(self, batch: list[ScheduledSeq], after: Launched | None = None) -> Launched:
        t0 = time.perf_counter()
        launched = self.runner.launch(batch, after)
        launched.started = t0
        for item in batch:  # the step computes its input token's keys/values: the next one starts past it
            seq = item.seq
            if seq.num_computed < seq.num_prompt_tokens:
                self.stats.prompt_tokens += 1
            seq.num_computed += 1
            seq.num_passes += 1
        return launched

    def _finish(self, launched: Launched) -> list[Sequence]:
        """Read a launched step's tokens and append them, but to sequences that ended meanwhile."""
        try:
            tokens, bad = launched.result()
        except Exception as e:
            return self._fail_batch(launched.batch, e)
        new_tokens = {}
        for item, token, nan in zip(launched.batch, tokens, bad, strict=True):
            seq = item.seq
            if seq.finished:  # stopped by the step before, or aborted: its row was wasted
                continue
            if nan:
                flag_nonfinite(seq)
            # Its blocks up to the row now in flight are named: that row's token is appended below, and
            # admissions (which could share them) wait for the pipeline to drain.
            self.blocks.register_computed(seq)
            new_tokens[seq] = [token]
        self._record_step(launched.rows, len(launched.batch), time.perf_counter() - launched.started)
        self._append_all(new_tokens)
        return list(new_tokens)

    def _step_sync(self, batch: list[ScheduledSeq]) -> list[Sequence]:
        t0 = time.perf_counter()
        try:
            new_tokens = self.runner.step(batch)
        except Exception as e:  # the batched pass failed: every sequence in it ends with the error
            return self._fail_batch(batch, e)
        for item in batch:
            seq = item.seq
            if seq.num_computed < seq.num_prompt_tokens:
                self.stats.prompt_tokens += min(item.n_tokens, seq.num_prompt_tokens - seq.num_computed)
            computed = item.n_tokens
            if item.draft:  # only the kept drafts' keys/values are valid; the rest get overwritten
                kept = len(new_tokens.get(seq, [0])) - 1
                computed = 1 + kept
                seq.drafter.record(len(item.draft), kept)
                self.stats.drafted_tokens += len(item.draft)
                self.stats.accepted_tokens += kept
            seq.num_computed += computed
            seq.num_passes += 1
            self.blocks.register_computed(seq)
        # decode rows only (the runner returned host tokens): the step's wall time is its cost
        self._record_step(self.runner.last_step_rows, len(batch), time.perf_counter() - t0)
        self._append_all(new_tokens)
        return list(new_tokens)

    def _fail_batch(self, batch: list[ScheduledSeq], e: Exception) -> list[Sequence]:
        """A batched pass failed: every sequence in it that is still running ends with the error."""
        if isinstance(e, torch.OutOfMemoryError):
            e = DevstralError("out of GPU memory in a forward pass: lower --gpu-memory-fraction (it leaves "
                              "room for activations), --parallel or --max-batched-tokens")
        for item in batch:
            if not item.seq.finished:
                self._fail(item.seq, e)
        return [item.seq for item in batch]

    def _record_step(self, rows: int | None, batch_size: int, seconds: float) -> None:
        if rows is not None:
            self.step_costs.record(rows, seconds)
        self.stats.steps += 1
        self.stats.batch_sizes = [*self.stats.batch_sizes[-255:], batch_size]

    def _append_all(self, new_tokens: dict[Sequence, list[int]]) -> None:
        for seq, tokens in new_tokens.items():
            for token in tokens:
                try:
                    self._append(seq, token)
                except Exception as e:  # a constraint refused the token: only this sequence fails
                    self._fail(seq, e)
                if seq.finished:
                    break

    def teacher_forced_logits(self, ids: list[int], chunk: int | None = None) -> torch.Tensor:
        """Logits [len(ids), vocab] at every position, computed through the paged KV cache in chunks of
        `chunk` tokens (one token at a time with chunk=1, like decoding) with the prefix cache in play.
        Images of `ids` (a PromptIds) are embedded as in serving."""
        if self.has_work():
            raise RuntimeError("teacher_forced_logits needs an idle engine")
        seq = Sequence(ids, SamplingParams(temperature=0), 1, set(), device=self.device, images=images_of(ids))
        if not self.blocks.allocate(seq):
            raise DevstralError(f"{len(ids)} tokens do not fit in the KV cache ({self.pool.num_tokens} tokens)")
        try:
            chunk = chunk or _batched_tokens(self.ec, self.device)
            out = []
            if seq.num_computed:  # served by the prefix cache: no logits for those rows
                out.append(torch.full((seq.num_computed, self.cfg.vocab_size), float("nan"), device=self.device))
            while seq.num_computed < len(ids):
                n = min(chunk, len(ids) - seq.num_computed)
                out.append(self.runner.chunk_logits(ScheduledSeq(seq, n)).float())
                seq.num_computed += n
                self.blocks.register_computed(seq)
            return torch.cat(out)
        finally:
            self.blocks.free(seq)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        seq.error = error
        self.scheduler.finish(seq, "error")

    def _append(self, seq: Sequence, token: int) -> None:
        if seq.error is not None:
            raise seq.error
        seq.token_ids.append(token)
        self.stats.generated_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        reason = None
        if token in seq.stop_ids:
            reason = "stop"
        else:
            if seq.constraint is not None:
                seq.constraint.accept(token)
                if seq.constraint.is_finished():
                    reason = "stop"
            if reason is None and (seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_context):
                reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
