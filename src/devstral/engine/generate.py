"""The LLM object: logits, generate and stream on one process, prefill then decode with a KV cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from devstral.config import ModelConfig
from devstral.engine.constraints import apply_mask
from devstral.engine.detokenize import StreamDecoder
from devstral.engine.kv_cache import KVCache, parse_kv_kind
from devstral.engine.sampling import Sampler, SamplingParams
from devstral.errors import ContextOverflowError, DevstralError
from devstral.model.transformer import Transformer
from devstral.prompt.tokenizer import Tokenizer
from devstral.textstream import held_suffix_len, split_on_stop

PREFILL_CHUNK = 512  # bounds activation memory for long prompts
# Control tokens a chat parser needs to see in the text; every other control token stays hidden.
VISIBLE_CONTROL_TOKENS = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]")


@dataclass
class StepOutput:
    """One streamed step: the new token (None on the final event), its text, and the finish reason."""

    token_id: int | None
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


# Yielded between prefill chunks when a caller asks (`yield_prefill=True`): no token, no text. A
# scheduler that interleaves requests (server/worker.py) runs others between the chunks of a long
# prompt instead of stalling them for the whole prefill; it never forwards this event.
PREFILL_PROGRESS = StepOutput(None, "")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int]
    usage: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: list[StepOutput] | None = None


class LLM:
    def __init__(self, model: Transformer, config: ModelConfig, tokenizer: Tokenizer, *, path: Path | None = None,
                 sampling: SamplingParams | None = None, kv_cache_dtype: str = "auto", max_context: int = 4096):
        self.model, self.config, self.tokenizer, self.path = model, config, tokenizer, path
        self.default_sampling = sampling or SamplingParams()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.kv_kind = parse_kv_kind(kv_cache_dtype, self.dtype)
        self.max_context = max_context
        self._cache: KVCache | None = None
        self.last_timings: dict[str, float] = {}

    # ---------------------------------------------------------------- building blocks
    @torch.inference_mode()
    def logits(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Full-sequence logits [len(ids), vocab] in float32, no cache, no sampling."""
        tokens = torch.as_tensor(ids, dtype=torch.long, device=self.device)[None]
        self._check_ids(tokens)
        return self.model(tokens).float()[0]

    def encode_prompt(self, prompt: str) -> list[int]:
        """Raw completion prompt: one BOS, then the text (a BOS string already typed is not doubled)."""
        bos_text = self.tokenizer.decode([self.tokenizer.bos_id], special=True)
        if bos_text and prompt.startswith(bos_text):
            prompt = prompt[len(bos_text):]
        return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]

    def _check_ids(self, tokens: torch.Tensor) -> None:
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise DevstralError(f"token id out of range [0, {self.config.vocab_size})")

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """A fresh KV cache for one sequence (a server slot holds one per concurrent request)."""
        return KVCache(self.config, 1, max_len or self.max_context, kind=self.kv_kind, dtype=self.dtype,
                       device=self.device)

    def _kv_cache(self) -> KVCache:
        if self._cache is None:
            self._cache = self.new_cache()
        return self._cache

    # ---------------------------------------------------------------- generation
    def stream(self, prompt: str | list[int], params: SamplingParams | None = None, *,
               special: bool = False, should_stop=None, cache: KVCache | None = None,
               yield_prefill: bool = False) -> Iterator[StepOutput]:
        """Yield text as tokens are made; the last event carries finish_reason ("stop" or "length").

        `special=True` renders the tool-call and thinking control tokens ([TOOL_CALLS], [ARGS], ...)
        in the text, for the chat parser; other control tokens never reach the text.
        `should_stop()` is polled once per token so a caller (a server on disconnect) can cancel.
        `cache` lets several interleaved generations each keep their own KV cache.
        `yield_prefill=True` yields PREFILL_PROGRESS between prefill chunks, for such a scheduler.
        """
        params = params or self.default_sampling
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise DevstralError("empty prompt")
        budget = self.max_context - len(ids)
        if budget < 1 or (params.max_tokens is not None and params.max_tokens > budget):
            raise ContextOverflowError(len(ids), self.max_context, params.max_tokens or 0)
        max_new = budget if params.max_tokens is None else params.max_tokens
        if cache is not None and cache.max_len < len(ids) + max_new:
            raise ContextOverflowError(len(ids), cache.max_len, max_new)
        yield from self._generate(ids, params, max_new, special, should_stop, cache or self._kv_cache(),
                                  yield_prefill)

    def _generate(self, ids, params, max_new, special, should_stop, cache, yield_prefill) -> Iterator[StepOutput]:
        # inference_mode as a context, not a decorator: a generator suspended at a yield must not
        # leave the caller's thread inside inference mode.
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
        self._check_ids(tokens)
        sampler = Sampler(params, self.device)
        constraint = params.constraint() if params.constraint is not None else None
        stop_ids = {self.tokenizer.eos_id, *params.stop_token_ids}
        decoder = StreamDecoder(self.tokenizer, special=special, context=ids)
        hidden = self._hidden_control_tokens() if special else set()
        stops, held, history = params.stop, "", list(ids)
        t0 = time.perf_counter()
        logits = None
        for start in range(0, len(ids), PREFILL_CHUNK):  # prefill in chunks
            if start and yield_prefill:
                yield PREFILL_PROGRESS
                if should_stop is not None and should_stop():
                    break
            chunk = tokens[:, start:start + PREFILL_CHUNK]
            logits = self._forward(chunk, cache, start)
        self._sync()
        t1 = time.perf_counter()
        pos, n_new, finish, hit = len(ids), 0, "length", False
        while n_new < max_new:
            if should_stop is not None and should_stop():
                finish = "cancelled"
                break
            if constraint is not None:
                logits = apply_mask(logits, constraint.allowed_tokens())
            token = sampler(logits, history)
            top = self._top_logprobs(logits, token, params.logprobs)
            n_new += 1
            if constraint is not None and token not in stop_ids:
                constraint.accept(token)
            if token in stop_ids:
                finish = "stop"
                yield StepOutput(token, "", None, *top)
                break
            history.append(token)
            if token not in hidden:
                held += decoder.push(token)
            emit, hit = split_on_stop(held, stops)
            if hit:
                yield StepOutput(token, emit, None, *top)
                finish, held = "stop", ""
                break
            safe = len(held) - held_suffix_len(held, stops)
            yield StepOutput(token, held[:safe], None, *top)
            held = held[safe:]
            if constraint is not None and constraint.is_finished():
                finish = "stop"
                break
            if n_new == max_new:
                break
            logits = self._forward(torch.tensor([[token]], device=self.device), cache, pos)
            pos += 1
        if not hit:
            held, _ = split_on_stop(held + decoder.flush(), stops)
            if held:
                yield StepOutput(None, held)
        self._sync()
        t2 = time.perf_counter()
        self.last_timings = {
            "prompt_tokens": len(ids), "completion_tokens": n_new,
            "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "prefill_tok_s": len(ids) / max(t1 - t0, 1e-9),
            "decode_tok_s": max(n_new - 1, 0) / max(t2 - t1, 1e-9) if n_new > 1 else 0.0,
        }
        yield StepOutput(None, "", finish)

    def _hidden_control_tokens(self) -> _HiddenControls:
        visible = {self.tokenizer.special_id(t) for t in VISIBLE_CONTROL_TOKENS} - {None}
        return _HiddenControls(self.tokenizer, visible)

    def _forward(self, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        with torch.no_grad():
            return self.model(tokens, cache=cache, start=start, last_only=True)[0, -1]

    def _top_logprobs(self, logits, token, n) -> tuple[float | None, list[tuple[int, float]] | None]:
        if n is None:
            return None, None
        lp = torch.log_softmax(logits.float(), -1)
        top = torch.topk(lp, n) if n > 0 else None
        pairs = [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)] if top is not None else []
        return float(lp[token]), pairs

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------- chat (prompt/ and engine/chat.py)
    def chat(self, messages: list[dict], tools: list[dict] | None = None, sampling: SamplingParams | None = None,
             **kw):
        """OpenAI-shaped messages -> ChatResult(.message, .finish_reason, .usage)."""
        from devstral.engine.chat import chat

        return chat(self, messages, tools=tools, sampling=sampling, **kw)

    def stream_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    sampling: SamplingParams | None = None, **kw):
        """Yields deltas shaped like OpenAI's streaming chunks' `choices[0]`."""
        from devstral.engine.chat import stream_chat

        return stream_chat(self, messages, tools=tools, sampling=sampling, **kw)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, **kw) -> Completion:
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        text, out, steps, finish = [], [], [], "length"
        for step in self.stream(ids, params, **kw):
            text.append(step.text)
            if step.token_id is not None:
                out.append(step.token_id)
                steps.append(step)
            if step.finish_reason:
                finish = step.finish_reason
        want_lp = (params or self.default_sampling).logprobs is not None
        return Completion(text="".join(text), token_ids=out, finish_reason=finish, prompt_token_ids=ids,
                          usage={"prompt_tokens": len(ids), "completion_tokens": len(out),
                                 "total_tokens": len(ids) + len(out)},
                          timings=dict(self.last_timings), logprobs=steps if want_lp else None)


class _HiddenControls:
    """Membership test: is this id a control token that must not appear in chat text?"""

    def __init__(self, tokenizer: Tokenizer, visible: set[int]):
        self.tokenizer, self.visible = tokenizer, visible

    def __contains__(self, token_id: int) -> bool:
        return token_id not in self.visible and self.tokenizer.is_special(token_id)
