"""The llama.cpp engine: the torch engine's surface (add / abort / step) over llama.cpp's low-level API.

Each `step()` is one `llama_decode` call: every running sequence's next token plus prompt chunks,
under a token budget, in one llama_batch where each token carries its request's sequence id. The
logits of the rows that sample come back as float32 and go through our own sampler
(`engine/sampling.sample`), constraints and logprobs, so Devstral's defaults and seeds behave as on the
torch engine; stop tokens, detokenizing and tool-call parsing happen above, in `LLM.stream`.

KV cache: one unified llama.cpp cache of `max_context x parallel` cells. Which sequence id holds
which tokens, prefix reuse across requests and turns (`llama_memory_seq_cp`), and the least recently
used eviction of finished requests' cells are `llamacpp_kv.KVSequences`' job. Every running sequence
fits (each is at most `max_context` long), so there is never a preemption.

Images (llamacpp_images.py): a prompt chunk is either text or the [IMG]/[IMG_BREAK] rows of one image,
never both (the scheduler cuts chunks at an image's edges). A step decodes its image rows first, as one
llama_batch of input embeddings (libmtmd's output) for every sequence that has some, then its tokens;
the sampling rows are always tokens ([IMG_END] ends an image). For the prefix cache an image row's key is
not its [IMG] id but a number made from the image's digest and the row, so two images of one size never
share cells.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from devstral.config import ModelConfig
from devstral.engine.engine import EngineConfig, EngineStats
from devstral.engine.llamacpp_kv import KVSequences
from devstral.engine.llamacpp_model import LlamaCppModel, llama_cpp, llama_errors
from devstral.engine.model_runner import ModelRunner
from devstral.engine.sampling import SamplingParams, sample
from devstral.engine.sequence import Sequence, Status
from devstral.errors import DevstralError
from devstral.prompt.images import PromptImage, images_of

GIB = 1 << 30
DEFAULT_BATCH_TOKENS = 512  # tokens per step on the CPU, as the torch engine


# --kv-cache-dtype -> (GGML type name, bytes per value). llama.cpp has no fp8 cache.
KV_TYPES = {"fp16": ("F16", 2.0), "bf16": ("BF16", 2.0), "fp32": ("F32", 4.0), "q8_0": ("Q8_0", 34 / 32),
            "q4_0": ("Q4_0", 18 / 32)}


def kv_type(name: str) -> str:
    """The --kv-cache-dtype the llama.cpp cache uses: auto is fp16, llama.cpp's default."""
    name = "fp16" if name == "auto" else name
    if name not in KV_TYPES:
        raise DevstralError(f"--kv-cache-dtype {name}: the llama.cpp backend stores auto, "
                            f"{', '.join(KV_TYPES)} (fp8 is the torch backend's, on CUDA)")
    return name


def kv_bytes_per_token(kind: str, cfg: ModelConfig) -> int:
    return int(2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * KV_TYPES[kind][1])


@contextlib.contextmanager
def _one_torch_thread():
    """Sample with one torch thread. llama.cpp computes with its own threads; torch's OpenMP workers, once
    woken by an op over the vocabulary, spin for milliseconds on the same cores as llama.cpp's next pass
    (measured on 2 cores: +7 ms per token, a third of a 0.5B model's decode)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class SchedulerCounters:
    """What /metrics reads of a scheduler: this engine never preempts (every sequence fits)."""

    num_preemptions: int = 0


class _Batch:
    """A llama_batch over numpy arrays (one sequence id per token), filled with slices, not per-token
    Python loops."""

    def __init__(self, lib: Any, capacity: int, *, n_embd: int = 0):
        """n_embd > 0: a batch of input embeddings ([capacity, n_embd] float32) instead of token ids."""
        i32 = ctypes.POINTER(ctypes.c_int32)
        self.token = np.zeros(capacity, np.int32)
        self.embd = np.zeros((capacity, n_embd), np.float32) if n_embd else None
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq_id = np.zeros(capacity, np.int32)
        self.logits = np.zeros(capacity, np.int8)
        base = self.seq_id.ctypes.data
        self._seq_ptrs = (i32 * capacity)(*(ctypes.cast(base + 4 * i, i32) for i in range(capacity)))
        self.struct = lib.llama_batch(
            n_tokens=0, token=None if n_embd else self.token.ctypes.data_as(i32),
            embd=self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if n_embd else None,
            pos=self.pos.ctypes.data_as(i32),
            n_seq_id=self.n_seq_id.ctypes.data_as(i32), seq_id=self._seq_ptrs,
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, tokens: list[int], start: int, seq_id: int, *, logits: str) -> None:
        """tokens at positions start.. of seq_id; logits "last", "all" or "none"."""
        k, n = len(tokens), self.n
        self.token[n:n + k] = tokens
        self.pos[n:n + k] = np.arange(start, start + k, dtype=np.int32)
        self.seq_id[n:n + k] = seq_id
        self.logits[n:n + k] = 1 if logits == "all" else 0
        if logits == "last":
            self.logits[n + k - 1] = 1
        self.n = n + k
        self.struct.n_tokens = self.n

    def add_embeddings(self, rows: np.ndarray, start: int, seq_id: int, *, logits: bool = False) -> None:
        """Input embeddings [k, n_embd] at positions start.. of seq_id."""
        k, n = len(rows), self.n
        self.embd[n:n + k] = rows
        self.pos[n:n + k] = np.arange(start, start + k, dtype=np.int32)
        self.seq_id[n:n + k] = seq_id
        self.logits[n:n + k] = 1 if logits else 0
        self.n = n + k
        self.struct.n_tokens = self.n


def image_keys(prompt_ids: list[int], images: list[PromptImage]) -> list[int]:
    """Prefix-cache keys of a prompt: its ids, with each image row's id replaced by a negative number
    from the image's digest (40 bits) and the row's offset in the image (20 bits)."""
    keys = list(prompt_ids)
    for im in images:
        base = -1 - (int.from_bytes(im.digest[:5], "little") << 20)
        keys[im.start:im.end - 1] = range(base, base - (im.length - 1), -1)
    return keys


class LlamaCppEngine:
    def __init__(self, model: LlamaCppModel, cfg: ModelConfig, ec: EngineConfig, *, max_context: int,
                 threads: int, images: Any = None):
        """`images`: llamacpp_images.LlamaCppImages for a model with a vision projector."""
        lib = llama_cpp()
        if not model.loaded:
            raise RuntimeError("the llama.cpp model was closed")
        if model.n_vocab != cfg.vocab_size:
            raise DevstralError(f"{model.path}: llama.cpp sees {model.n_vocab} tokens, the metadata {cfg.vocab_size}")
        self.lib, self.model, self.cfg, self.ec = lib, model, cfg, ec
        self.max_context = max_context
        self.max_num_seqs = max(ec.max_num_seqs, 1)
        self.batch_tokens = ec.max_num_batched_tokens or DEFAULT_BATCH_TOKENS
        self.kind = kv_type(ec.kv_cache_dtype)
        # ids for the running requests, the prefix cache's idle entries, and one for logits(): in a
        # unified cache an id costs no memory, cells do.
        n_ids = min(int(lib.llama_max_parallel_sequences()), 2 * self.max_num_seqs + 8)
        if self.max_num_seqs >= n_ids:
            raise DevstralError(f"--parallel {self.max_num_seqs}: llama.cpp runs at most {n_ids - 1} sequences at once")
        self.ctx = self._new_context(n_cells=max_context * self.max_num_seqs, n_ids=n_ids, threads=threads)
        model.register(self)
        # llama.cpp caps a batch at the context size: a larger one would abort the process
        self.batch_tokens = min(self.batch_tokens, int(lib.llama_n_batch(self.ctx)))
        self.mem = lib.llama_get_memory(self.ctx)
        self.kv = KVSequences(n_ids, int(lib.llama_n_ctx(self.ctx)), self, prefix_caching=ec.prefix_caching)
        self.batch = _Batch(lib, self.batch_tokens)
        self.images = images
        self.embd_batch = _Batch(lib, self.batch_tokens, n_embd=cfg.dim) if images is not None else None
        self.keys: dict[Sequence, list[int]] = {}  # prefix-cache keys of the prompts with images
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.seq_ids: dict[Sequence, int] = {}
        self.stats = EngineStats()
        self.blocks = self.kv  # /metrics: cells as blocks of one token, and the prefix cache's counts
        self.scheduler = SchedulerCounters()

    def _new_context(self, *, n_cells: int, n_ids: int, threads: int):
        lib = self.lib
        p = lib.llama_context_default_params()
        p.n_ctx = n_cells
        # llama.cpp reserves an output row per sequence id in a buffer of n_batch rows and aborts the
        # process (GGML_ASSERT in output_reserve) when there are more ids than rows: the context may take
        # bigger batches than --max-batched-tokens; the scheduler still submits at most that many
        p.n_batch = max(self.batch_tokens, n_ids)
        p.n_ubatch = min(self.batch_tokens, 512)
        p.n_seq_max = n_ids
        p.n_threads = p.n_threads_batch = threads
        p.kv_unified = True  # one pool of cells for every id: prefix copies share cells
        p.n_outputs_max_per_seq = 0  # logits() reads every row of one sequence
        p.type_k = p.type_v = getattr(lib, f"GGML_TYPE_{KV_TYPES[self.kind][0]}")
        # fp32: exact attention (llama.cpp's CPU flash attention rounds through fp16); a quantized V
        # cache needs flash attention; otherwise llama.cpp decides.
        p.flash_attn_type = {"fp32": lib.LLAMA_FLASH_ATTN_TYPE_DISABLED, "q8_0": lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                             "q4_0": lib.LLAMA_FLASH_ATTN_TYPE_ENABLED}.get(self.kind, lib.LLAMA_FLASH_ATTN_TYPE_AUTO)
        p.no_perf = True
        llama_errors(clear=True)
        ctx = lib.llama_init_from_model(self.model.ptr, p)
        if not ctx:
            need = n_cells * kv_bytes_per_token(self.kind, self.cfg) / GIB
            raise DevstralError(f"llama.cpp could not make a context of {n_cells} tokens ({need:.1f} GiB of KV cache; "
                                f"{llama_errors(clear=True) or 'no reason given'}): lower --ctx-size or --parallel, "
                                "or use --kv-cache-dtype q8_0")
        return ctx

    def close(self) -> None:
        """Free the context (the KV cache); the engine cannot step after this."""
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
        self.ctx = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    # ---------------------------------------------------------------- llama.cpp's sequence operations
    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        return bool(self.lib.llama_memory_seq_rm(self.mem, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_pos_max(self, seq_id: int) -> int:
        """llama.cpp's own view: the last position `seq_id` holds (-1: none)."""
        return int(self.lib.llama_memory_seq_pos_max(self.mem, seq_id))

    # ---------------------------------------------------------------- requests
    def add(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, stop_ids: set[int], *,
            images: list[PromptImage] | None = None) -> Sequence:
        """`images`: where the prompt's [IMG] tokens get their embeddings (prompt/images.PromptIds)."""
        if len(prompt_ids) + max_tokens > self.max_context:
            raise DevstralError(f"prompt of {len(prompt_ids)} tokens plus {max_tokens} new ones exceeds the "
                                f"context size {self.max_context}")
        if images and self.images is None:
            raise DevstralError("this prompt has images but the model has no vision projector")
        seq = Sequence(prompt_ids, params, max_tokens, stop_ids, images=images)
        if seq.images:
            self.keys[seq] = image_keys(seq.token_ids, seq.images)
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence, reason: str = "cancelled") -> None:
        self._finish(seq, reason)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---------------------------------------------------------------- the loop
    def step(self) -> list[Sequence]:
        """One llama_decode over everything scheduled; returns the sequences that got a token."""
        if self.ctx is None:
            raise RuntimeError("the llama.cpp context was freed")
        plan = self._schedule()
        if not plan:
            return []
        self.batch.clear()
        sampling: list[Sequence] = []
        image_rows: list[tuple[Sequence, int, PromptImage]] = []
        for seq, n in plan:
            start = seq.num_computed
            image = self._image_at(seq, start)
            if image is not None:
                image_rows.append((seq, n, image))
                continue
            samples = start + n == seq.num_tokens
            self.batch.add(seq.token_ids[start:start + n], start, self.seq_ids[seq], logits="last" if samples else "none")
            if samples:
                sampling.append(seq)
        try:
            if not self.kv.make_room(sum(n for _, n in plan)):
                raise DevstralError("the llama.cpp KV cache is full: lower --parallel or --ctx-size")
            if image_rows:
                self._decode_images(image_rows)
            if self.batch.n:
                self._decode(self.batch)
        except Exception as e:  # the batched pass failed: every sequence in it ends with the error
            for seq, _ in plan:
                self._fail(seq, e)
            return [seq for seq, _ in plan]
        for seq, n in plan:
            start = seq.num_computed
            if start < seq.num_prompt_tokens:
                self.stats.prompt_tokens += min(n, seq.num_prompt_tokens - start)
            self.kv.computed(self.seq_ids[seq], self._keys(seq, start, n))
            seq.num_computed += n
            seq.num_passes += 1
        self.stats.steps += 1
        self.stats.batch_sizes = [*self.stats.batch_sizes[-255:], len(plan)]
        if sampling:
            with _one_torch_thread():
                logits = self._logits_rows(len(sampling))
                logits = ModelRunner._constrain(logits, sampling)
                tokens = sample(logits, [s.params for s in sampling], [s.token_ids for s in sampling],
                                [s.generator for s in sampling])
                ModelRunner._logprobs(logits, tokens, sampling)
            for seq, token in zip(sampling, tokens.tolist(), strict=True):
                try:
                    self._append(seq, token)
                except Exception as e:  # a constraint refused the token: only this sequence fails
                    self._fail(seq, e)
        return sampling

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute): every decoding sequence's next token first, then prompt chunks
        of running prefills and admissions, as the torch scheduler does (a prompt gets at most a quarter
        of the step while several compete)."""
        budget = self.batch_tokens
        plan = [(s, 1) for s in self.running if s.num_uncomputed == 1][:budget]
        budget -= len(plan)
        prefilling = [s for s in self.running if s.num_uncomputed > 1]
        cap = self.batch_tokens if len(prefilling) + len(self.waiting) <= 1 else max(1, self.batch_tokens // 4)
        chunks: list[list] = []
        for seq in prefilling:
            if budget == 0:
                break
            n = min(seq.num_uncomputed, budget, cap)
            chunks.append([seq, n])
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._admit()
            n = min(seq.num_uncomputed, budget, cap)
            chunks.append([seq, n])
            budget -= n
        for item in chunks:  # what the cap left over goes to the oldest prompts
            extra = min(item[0].num_uncomputed - item[1], budget)
            item[1] += extra
            budget -= extra
        return plan + [(seq, self._cut_at_images(seq, n)) for seq, n in chunks]

    @staticmethod
    def _image_at(seq: Sequence, pos: int) -> PromptImage | None:
        """The image whose embedding rows ([IMG] and [IMG_BREAK], not [IMG_END]) hold position `pos`."""
        for im in seq.images:
            if im.start <= pos < im.end - 1:
                return im
        return None

    def _cut_at_images(self, seq: Sequence, n: int) -> int:
        """A chunk from seq.num_computed of at most n tokens that is all text or all one image's rows."""
        start = seq.num_computed
        image = self._image_at(seq, start)
        if image is not None:
            return min(n, image.end - 1 - start)
        later = [im.start for im in seq.images if start < im.start < start + n]
        return min(later) - start if later else n

    def _keys(self, seq: Sequence, start: int, n: int) -> list[int]:
        keys = self.keys.get(seq)
        if keys is None or start >= len(keys):
            return seq.token_ids[start:start + n]
        return keys[start:start + n] + seq.token_ids[len(keys):start + n]

    def _decode_images(self, rows: list[tuple[Sequence, int, PromptImage]]) -> None:
        """One llama_decode of input embeddings: each sequence's chunk of its image's rows."""
        embeddings = self.images.embeddings([im for _, _, im in rows])
        self.embd_batch.clear()
        for (seq, n, im), emb in zip(rows, embeddings, strict=True):
            first = seq.num_computed - im.start
            self.embd_batch.add_embeddings(emb[first:first + n], seq.num_computed, self.seq_ids[seq])
        self._decode(self.embd_batch)

    def _admit(self) -> Sequence:
        seq = self.waiting.popleft()
        seq_id, reused = self.kv.acquire(self.keys.get(seq, seq.token_ids))
        self.seq_ids[seq] = seq_id
        seq.num_computed = reused
        seq.num_cached_prompt_tokens = min(reused, seq.num_prompt_tokens)
        seq.status = Status.RUNNING
        self.running.append(seq)
        return seq

    def _decode(self, batch: _Batch) -> None:
        llama_errors(clear=True)
        rc = self.lib.llama_decode(self.ctx, batch.struct)
        if rc == 1:  # no slot for the batch: llama.cpp restored its cache; free every idle cell and retry
            self.kv.drop_idle()
            rc = self.lib.llama_decode(self.ctx, batch.struct)
        if rc == 1:
            raise DevstralError("the llama.cpp KV cache is full: lower --parallel or --ctx-size")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}: {llama_errors(clear=True)}")

    def _logits_rows(self, n_rows: int) -> torch.Tensor:
        """The logits of this step's sampling rows, in batch order, as a float32 view (no copy) that
        stays valid until the next llama_decode."""
        ptr = self.lib.llama_get_logits(self.ctx)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(n_rows, self.cfg.vocab_size)))

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
            self._finish(seq, reason)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        seq.error = error
        self._finish(seq, "error")

    def _finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence wherever it is; its cells stay as a prefix cache entry unless it failed."""
        if seq.finished:
            return
        if seq in self.running:
            self.running.remove(seq)
            seq_id = self.seq_ids.pop(seq)
            if seq.error is None and self.ctx is not None:
                self.kv.release(seq_id, keep=True)
            elif self.ctx is not None:
                self.kv.drop(seq_id)  # a failed pass may have left part of its batch in the cache
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.keys.pop(seq, None)
        seq.finish(reason)

    # ---------------------------------------------------------------- teacher forcing
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] at every position, computed from scratch in chunks of the step's
        token budget (how `eval kld` and the tests score the model)."""
        if self.has_work():
            raise RuntimeError("logits() needs an idle engine")
        if len(ids) > self.kv.num_blocks:
            raise DevstralError(f"{len(ids)} tokens do not fit in the llama.cpp KV cache ({self.kv.num_blocks} tokens)")
        out = torch.empty(len(ids), self.cfg.vocab_size, dtype=torch.float32)
        self.kv.make_room(len(ids))
        images = images_of(ids)
        if images and self.images is None:
            raise DevstralError("this prompt has images but the model has no vision projector")
        seq_id = self.kv.scratch()
        try:
            start = 0
            while start < len(ids):
                image = next((im for im in images if im.start <= start < im.end - 1), None)
                if image is not None:  # a run of the image's embedding rows
                    end = min(image.end - 1, start + self.batch_tokens)
                    batch = self.embd_batch
                    batch.clear()
                    rows = self.images.embeddings([image])[0]
                    batch.add_embeddings(rows[start - image.start:end - image.start], start, seq_id, logits=True)
                else:
                    end = min([im.start for im in images if im.start > start] + [len(ids), start + self.batch_tokens])
                    batch = self.batch
                    batch.clear()
                    batch.add(list(ids[start:end]), start, seq_id, logits="all")
                rc = self.lib.llama_decode(self.ctx, batch.struct)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed with code {rc}: {llama_errors(clear=True)}")
                out[start:end] = self._logits_rows(end - start)
                start = end
        finally:
            self.kv.drop(seq_id)
        return out
