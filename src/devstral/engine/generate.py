"""The LLM object: logits, generate and stream, over the batched engine (engine.py).

`stream()` adds one sequence to the engine and turns the tokens the engine appends to it into text:
detokenized without splitting UTF-8 characters, with stop strings matched on the text (a possible
stop-string prefix is held back) and control tokens hidden unless a chat parser needs them. Who runs
the engine's steps depends on the caller: a plain call steps the engine itself; the server's worker
passes `yield_prefill=True`, gets PENDING whenever the sequence waits, and steps the engine once for
all its requests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from devstral.config import ModelConfig
from devstral.engine.chat import chat, stream_chat
from devstral.engine.detokenize import StreamDecoder
from devstral.engine.engine import Engine, EngineConfig, plan_memory
from devstral.engine.kv_pool import parse_kv_kind
from devstral.engine.outputs import PENDING, PREFILL_PROGRESS, StepOutput
from devstral.engine.sampling import SamplingParams
from devstral.engine.sequence import Sequence
from devstral.errors import ContextOverflowError, DevstralError
from devstral.model.transformer import Transformer
from devstral.model.vision import VisionModel
from devstral.prompt.images import images_of, keep_images
from devstral.prompt.tokenizer import Tokenizer
from devstral.textstream import held_suffix_len, split_on_stop

__all__ = ["LLM", "Completion", "StepOutput", "PENDING", "PREFILL_PROGRESS"]

# Control tokens a chat parser needs to see in the text; every other control token stays hidden.
VISIBLE_CONTROL_TOKENS = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int]
    usage: dict
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: list[StepOutput] | None = None


class LLM:
    """The torch engine's LLM. `LlamaCppLLM` (llamacpp_llm.py) is the same object over llama.cpp: it
    overrides the four engine hooks below (`_plan_engine`, `_build_engine`, `logits`, `backend`)."""

    backend = "torch"

    def __init__(self, model: Transformer, config: ModelConfig, tokenizer: Tokenizer, *, path: Path | None = None,
                 sampling: SamplingParams | None = None, kv_cache_dtype: str = "auto", max_context: int | None = None,
                 parallel: int = 1, engine_config: EngineConfig | None = None, vision: VisionModel | None = None):
        self.model, self.config, self.tokenizer, self.path = model, config, tokenizer, path
        self.vision = vision  # model/vision.py: set for a model that takes images
        self.default_sampling = sampling or SamplingParams()
        self.engine_config = engine_config or EngineConfig(max_context=max_context, max_num_seqs=parallel,
                                                           kv_cache_dtype=kv_cache_dtype)
        self._engine: Engine | None = None
        self.last_timings: dict[str, float] = {}
        self._plan_engine()

    def _plan_engine(self) -> None:
        """Device, dtype, KV kind and memory plan (sets `max_context`) for the engine to be built."""
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.kv_kind = parse_kv_kind(self.engine_config.kv_cache_dtype, self.dtype, self.device)
        self._plan = plan_memory(self.model, self.config, self.engine_config, self.kv_kind, self.device)
        self.max_context = self._plan[0]

    def _build_engine(self) -> Engine:
        return Engine(self.model, self.config, self.engine_config, compute_dtype=self.dtype, plan=self._plan,
                      vision=self.vision)

    @property
    def engine(self) -> Engine:
        """Built on first use, so that a server can set its parallelism first (the CPU pool and the
        CUDA graphs' batch sizes depend on it)."""
        if self._engine is None:
            self._engine = self._build_engine()
        return self._engine

    def set_parallel(self, n: int) -> None:
        """Batch up to n sequences (serve --parallel). Rebuilds an idle engine built for fewer."""
        if n == self.engine_config.max_num_seqs:
            return
        if self._engine is not None and self._engine.has_work():
            raise RuntimeError("set_parallel while sequences are running")
        self.engine_config.max_num_seqs = n
        self._engine = None
        self._plan_engine()

    # ---------------------------------------------------------------- building blocks
    @torch.inference_mode()
    def logits(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Full-sequence logits [len(ids), vocab] in float32, no cache, no sampling (images of a
        PromptIds embedded)."""
        images = self._check_images(ids)
        tokens = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)[None]
        self._check_ids(tokens)
        inject = None
        if images:
            from devstral.engine.image_embeds import ImageEmbedder

            inject = ImageEmbedder(self.vision).injection([(0, 0, tokens.shape[1], images)], self.device)
        return self.model(tokens, inject=inject).float()[0]

    def _check_images(self, ids) -> list:
        """The images of a prompt; an error for images a text-only model cannot see, or for image
        tokens that arrive without their image (a raw prompt that typed them)."""
        images = images_of(ids)
        if images and self.vision is None:
            raise DevstralError("this prompt has images but the model is text-only (it has no vision encoder)")
        img = getattr(self.tokenizer, "image_tokens", None)
        if img is not None and not images and img.img in ids:
            raise DevstralError("the prompt holds [IMG] tokens without their image; send images as image parts")
        return images

    def encode_prompt(self, prompt: str) -> list[int]:
        """Raw completion prompt: one BOS, then the text (a BOS string already typed is not doubled)."""
        bos_text = self.tokenizer.decode([self.tokenizer.bos_id], special=True)
        if bos_text and prompt.startswith(bos_text):
            prompt = prompt[len(bos_text):]
        return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]

    def _check_ids(self, tokens: torch.Tensor | list[int]) -> None:
        tokens = torch.as_tensor(tokens)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise DevstralError(f"token id out of range [0, {self.config.vocab_size})")

    # ---------------------------------------------------------------- generation
    def stream(self, prompt: str | list[int], params: SamplingParams | None = None, *,
               special: bool = False, should_stop=None, cache=None,
               yield_prefill: bool = False) -> Iterator[StepOutput]:
        """Yield text as tokens are made; the last event carries finish_reason ("stop", "length" or
        "cancelled"), the timings and the prompt tokens served by the prefix cache.

        `special=True` renders the tool-call and thinking control tokens ([TOOL_CALLS], [ARGS], ...)
        in the text, for the chat parser; other control tokens never reach the text.
        `should_stop()` is polled once per token so a caller (a server on disconnect) can cancel.
        `yield_prefill=True` yields PENDING whenever the sequence waits for the engine, whose steps the
        caller then runs. `cache` is accepted for older callers and ignored: the engine owns the cache.
        """
        params = params or self.default_sampling
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else keep_images(prompt)
        if not ids:
            raise DevstralError("empty prompt")
        budget = self.max_context - len(ids)
        if budget < 1 or (params.max_tokens is not None and params.max_tokens > budget):
            raise ContextOverflowError(len(ids), self.max_context, params.max_tokens or 0)
        self._check_ids(ids)
        self._check_images(ids)
        max_new = budget if params.max_tokens is None else params.max_tokens
        yield from self._generate(ids, params, max_new, special, should_stop, yield_prefill)

    def _generate(self, ids, params, max_new, special, should_stop, yield_prefill) -> Iterator[StepOutput]:
        stop_ids = {self.tokenizer.eos_id, *params.stop_token_ids}
        if max_new == 0:
            yield StepOutput(None, "", "length", cached_tokens=0)
            return
        decoder = StreamDecoder(self.tokenizer, special=special, context=ids)
        hidden = self._hidden_control_tokens() if special else set()
        stops, held, finish, hit = params.stop, "", "length", False
        images = images_of(ids)
        seq = (self.engine.add(ids, params, max_new, stop_ids, images=images) if images
               else self.engine.add(ids, params, max_new, stop_ids))
        read = len(ids)
        try:
            while not hit:
                while read < seq.num_tokens and not hit:
                    token = seq.token_ids[read]
                    k, read = read - len(ids), read + 1
                    top = seq.logprobs[k] if k < len(seq.logprobs) else (None, None)
                    if token in stop_ids:
                        yield StepOutput(token, "", None, *top)
                        continue
                    if token not in hidden:
                        held += decoder.push(token)
                    emit, hit = split_on_stop(held, stops)
                    if hit:
                        yield StepOutput(token, emit, None, *top)
                        finish, held = "stop", ""
                        self.engine.abort(seq, "stop")
                        break
                    safe = len(held) - held_suffix_len(held, stops)
                    yield StepOutput(token, held[:safe], None, *top)
                    held = held[safe:]
                if hit:
                    break
                if seq.finished:
                    if seq.error is not None:
                        raise seq.error
                    finish = seq.finish_reason
                    break
                if should_stop is not None and should_stop():
                    finish = "cancelled"
                    break
                if yield_prefill:
                    yield PENDING
                else:
                    self.engine.step()
        finally:
            if not seq.finished:
                self.engine.abort(seq, "cancelled")
        if not hit:
            held, _ = split_on_stop(held + decoder.flush(), stops)
            if held:
                yield StepOutput(None, held)
        self.last_timings = _timings(seq)
        yield StepOutput(None, "", finish, cached_tokens=seq.num_cached_prompt_tokens, timings=dict(self.last_timings))

    def _hidden_control_tokens(self) -> _HiddenControls:
        visible = {self.tokenizer.special_id(t) for t in VISIBLE_CONTROL_TOKENS} - {None}
        return _HiddenControls(self.tokenizer, visible)

    # ---------------------------------------------------------------- chat (engine/chat.py)
    def chat(self, messages: list[dict], tools: list[dict] | None = None, sampling: SamplingParams | None = None,
             **kw):
        """OpenAI-shaped messages -> ChatResult(.message, .finish_reason, .usage)."""
        return chat(self, messages, tools=tools, sampling=sampling, **kw)

    def stream_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    sampling: SamplingParams | None = None, **kw):
        """Yields deltas shaped like OpenAI's streaming chunks' `choices[0]`."""
        return stream_chat(self, messages, tools=tools, sampling=sampling, **kw)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, **kw) -> Completion:
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else keep_images(prompt)
        text, out, steps, finish, cached, timings = [], [], [], "length", 0, {}
        for step in self.stream(ids, params, **kw):
            text.append(step.text)
            if step.token_id is not None:
                out.append(step.token_id)
                steps.append(step)
            if step.finish_reason:
                finish, cached, timings = step.finish_reason, step.cached_tokens or 0, step.timings
        want_lp = (params or self.default_sampling).logprobs is not None
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out),
                 "prompt_tokens_details": {"cached_tokens": cached}}
        return Completion(text="".join(text), token_ids=out, finish_reason=finish, prompt_token_ids=ids, usage=usage,
                          timings=dict(timings), logprobs=steps if want_lp else None)


def _timings(seq: Sequence) -> dict[str, float]:
    end = seq.finish_time or time.perf_counter()
    first = seq.first_token_time or end
    n_new, n_prompt = seq.num_output_tokens, seq.num_prompt_tokens
    prefill, decode = first - seq.arrival, end - first
    drafted = seq.drafter.drafted if seq.drafter is not None else 0
    accepted = seq.drafter.accepted if seq.drafter is not None else 0
    decode_passes = max(seq.num_passes - 1, 0)  # the first pass ends the prefill with the first token
    return {
        "prompt_tokens": n_prompt, "completion_tokens": n_new, "cached_tokens": seq.num_cached_prompt_tokens,
        "prefill_s": prefill, "decode_s": decode,
        "prefill_tok_s": (n_prompt - seq.num_cached_prompt_tokens) / max(prefill, 1e-9),
        "decode_tok_s": (n_new - 1) / max(decode, 1e-9) if n_new > 1 else 0.0,
        "draft_tokens": drafted, "draft_acceptance": accepted / drafted if drafted else 0.0,
        "tokens_per_pass": (n_new - 1) / decode_passes if decode_passes else 1.0,
    }


class _HiddenControls:
    """Membership test: is this id a control token that must not appear in chat text?"""

    def __init__(self, tokenizer: Tokenizer, visible: set[int]):
        self.tokenizer, self.visible = tokenizer, visible

    def __contains__(self, token_id: int) -> bool:
        return token_id not in self.visible and self.tokenizer.is_special(token_id)
