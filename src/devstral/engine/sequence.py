"""A sequence in the engine: its tokens, where its keys and values live, and how far it has got.

The engine appends sampled tokens to `token_ids`; a consumer (LLM.stream) reads them from there at its
own pace. `num_computed` counts the tokens whose keys/values are in the cache: the tokens from there to
the end are what the next forward pass must compute (the whole prompt at first, one token while
decoding, everything again after a preemption).
"""

from __future__ import annotations

import itertools
import time
from enum import Enum

import torch

from devstral.engine.sampling import SamplingParams
from devstral.prompt.images import PromptImage

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, stop_ids: set[int],
                 device: torch.device | str = "cpu", images: list[PromptImage] | None = None):
        self.id = next(_ids)
        self.token_ids = list(prompt_ids)
        self.images = list(images or [])  # prompt/images.PromptImage: where [IMG] embeddings go
        self.num_prompt_tokens = len(prompt_ids)
        self.params, self.max_tokens, self.stop_ids = params, max_tokens, stop_ids
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.error: BaseException | None = None  # set with finish_reason "error"
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks registered so far
        self.num_computed = 0
        self.num_cached_prompt_tokens = 0  # prompt tokens the prefix cache served (last admission)
        self.num_preemptions = 0
        self.num_passes = 0  # forward passes this sequence took part in
        self.drafter = None  # speculative.Drafter, made by the scheduler when speculation is on
        self.constraint = params.constraint() if params.constraint is not None else None
        self.generator: torch.Generator | None = None
        if params.seed is not None:  # a seeded sequence draws its noise from its own stream
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        # per output token: (logprob of the sampled token, top alternatives) when params.logprobs is set
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def finish(self, reason: str) -> None:
        self.status, self.finish_reason = Status.FINISHED, reason
        self.finish_time = time.perf_counter()

    def __repr__(self) -> str:
        return (f"Sequence(id={self.id}, tokens={self.num_tokens}, computed={self.num_computed}, "
                f"status={self.status.value})")
