"""`LLM` over llama.cpp: the same streaming, chat, tool calls, stop handling and sampling, with
`LlamaCppEngine` doing the forward passes of a GGUF.

The torch model is never built: the GGUF's weights live in llama.cpp only. The context is planned as
the torch engine's CPU plan is: whole contexts for every slot within a share of the free RAM.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import torch

from devstral.config import ModelConfig
from devstral.engine.engine import EngineConfig
from devstral.engine.generate import LLM
from devstral.engine.llamacpp_engine import GIB, LlamaCppEngine, kv_bytes_per_token, kv_type
from devstral.engine.llamacpp_images import LlamaCppImages
from devstral.engine.llamacpp_model import LlamaCppModel
from devstral.engine.sampling import SamplingParams
from devstral.errors import DevstralError
from devstral.prompt.images import keep_images
from devstral.prompt.tokenizer import Tokenizer


def plan_context(cfg: ModelConfig, ec: EngineConfig, *, available: int | None = None) -> int:
    """The context per sequence: the model's window (or --ctx-size) when `parallel` of them fit in
    `cpu_memory_fraction` of the available RAM, else capped with a notice; a --ctx-size that does not
    fit is an error naming the knobs."""
    kind = kv_type(ec.kv_cache_dtype)
    per_token = kv_bytes_per_token(kind, cfg)
    slots = max(ec.max_num_seqs, 1)
    budget = int((psutil.virtual_memory().available if available is None else available) * ec.cpu_memory_fraction)
    fit = budget // (per_token * slots)
    wanted = ec.max_context or cfg.max_position_embeddings
    if ec.max_context and ec.max_context > fit:
        raise DevstralError(f"--ctx-size {ec.max_context} x --parallel {slots} needs "
                            f"{ec.max_context * slots * per_token / GIB:.1f} GiB of KV cache but "
                            f"{budget / GIB:.1f} GiB are free for it: lower --ctx-size or --parallel, or use "
                            "--kv-cache-dtype q8_0")
    if fit < 16:
        raise DevstralError(f"no memory left for the KV cache ({budget / GIB:.2f} GiB; {per_token / 1024:.0f} KiB per "
                            "token): lower --parallel, use --kv-cache-dtype q8_0, or load a smaller model")
    ctx = min(wanted, fit)
    if ctx < wanted:
        print(f"note: context capped at {ctx} tokens by memory for the KV cache (the model allows {wanted}); "
              "--kv-cache-dtype q8_0 or a lower --parallel gives more", file=sys.stderr)
    return ctx


class LlamaCppLLM(LLM):
    backend = "llama.cpp"

    def __init__(self, model: LlamaCppModel, config: ModelConfig, tokenizer: Tokenizer, *, path: Path | None = None,
                 sampling: SamplingParams | None = None, engine_config: EngineConfig, threads: int,
                 vision: LlamaCppImages | None = None):
        """`vision`: the model's projector in llama.cpp's multimodal library, when it takes images."""
        self.threads = threads
        super().__init__(model, config, tokenizer, path=path, sampling=sampling, engine_config=engine_config,  # type: ignore[arg-type]
                         vision=vision)  # type: ignore[arg-type]

    def _plan_engine(self) -> None:
        # Logits come back from llama.cpp as float32 rows in host memory; sampling runs there.
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.kv_kind = kv_type(self.engine_config.kv_cache_dtype)
        self.max_context = plan_context(self.config, self.engine_config)

    def _build_engine(self) -> LlamaCppEngine:
        return LlamaCppEngine(self.model, self.config, self.engine_config, max_context=self.max_context,
                              threads=self.threads, images=self.vision)

    def logits(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Full-sequence logits [len(ids), vocab] in float32, computed by llama.cpp from scratch."""
        self._check_images(ids)
        ids = keep_images(ids if isinstance(ids, list) else torch.as_tensor(ids, dtype=torch.long).tolist())
        self._check_ids(ids)
        return self.engine.logits(ids)
