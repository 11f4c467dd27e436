"""Rank 0 leads, the other ranks follow: the same engine steps on every rank.

Rank 0 owns the scheduler, the sampler and everything above them (LLM, server, CLI). Every forward
pass it runs is announced first on the control channel, as the step's host-side inputs
(engine/model_runner.StepInputs: token ids, positions, KV slots, block tables); the followers run the
same inputs through their shard of the model, into their own KV pool, which holds only their kv
heads. Engine (re)builds and plain full-sequence passes are announced the same way, so the ranks
always enter the same collectives in the same order, CUDA-graph capture included.
"""

from __future__ import annotations

import dataclasses

import torch

from devstral.config import ModelConfig
from devstral.engine.engine import Engine, plan_memory
from devstral.engine.generate import LLM
from devstral.engine.kv_pool import parse_kv_kind
from devstral.errors import DevstralError
from devstral.model.transformer import Transformer
from devstral.parallel.group import TPGroup
from devstral.parallel.sharding import local_config


class TensorParallelLLM(LLM):
    """The LLM on rank 0 of a tensor-parallel group (same surface as LLM)."""

    def __init__(self, model: Transformer, config: ModelConfig, tokenizer, *, tp: TPGroup, **kwargs):
        self.tp = tp
        self.local_config = local_config(config, tp.world)
        super().__init__(model, config, tokenizer, **kwargs)

    def _plan_engine(self) -> None:
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.kv_kind = parse_kv_kind(self.engine_config.kv_cache_dtype, self.dtype, self.device)
        ec = self.engine_config
        if self.device.type == "cpu":  # the ranks share one machine's RAM
            ec = dataclasses.replace(ec, cpu_memory_fraction=ec.cpu_memory_fraction / self.tp.world)
        self._plan = plan_memory(self.model, self.local_config, ec, self.kv_kind, self.device)
        self.max_context = self._plan[0]

    def _build_engine(self) -> Engine:
        return _fatal_on_error(self._build_engine_in_step)()

    def _build_engine_in_step(self) -> Engine:
        self.tp.send(("engine", self.engine_config, self.dtype, self._plan))
        engine = Engine(self.model, self.local_config, self.engine_config, compute_dtype=self.dtype, plan=self._plan)
        runner = engine.runner
        runner.broadcast = _fatal_on_error(lambda inputs: self.tp.send(("step", inputs)))
        runner.run = _fatal_on_error(runner.run)
        return engine

    @torch.inference_mode()
    def logits(self, ids) -> torch.Tensor:
        tokens = torch.as_tensor(ids, dtype=torch.long)[None]
        self._check_ids(tokens)
        _fatal_on_error(self.tp.send)(("logits", tokens))
        return _fatal_on_error(self.model)(tokens.to(self.device)).float()[0]

    def close(self) -> None:
        """Stop the followers and leave the group (also done at exit)."""
        from devstral.parallel.launch import shutdown

        self._engine = None
        shutdown(self.tp)


def _fatal_on_error(fn):
    """The engine survives a failed step (its sequences end with the error); a tensor-parallel group does
    not, since its ranks are no longer in step: the failure ends the group (launch.group_failed)."""
    def call(*args):
        try:
            return fn(*args)
        except Exception as e:
            from devstral.parallel.launch import group_failed

            group_failed(e)
            raise

    return call


def refuse_direct_use(llm: LLM, what: str) -> None:
    """Paths that call the model outside the engine's steps would leave the followers behind."""
    if isinstance(llm, TensorParallelLLM):
        raise DevstralError(f"{what} is not available with --tensor-parallel (it runs the model outside the "
                            "engine's steps)")


@torch.inference_mode()
def follow(model: Transformer, config: ModelConfig, tp: TPGroup) -> None:
    """A follower's loop: run what rank 0 announces until it says stop."""
    local = local_config(config, tp.world)
    engine: Engine | None = None
    while True:
        message = tp.receive()
        kind = message[0]
        if kind == "step":
            engine.runner.run(message[1])
        elif kind == "engine":
            _, ec, dtype, plan = message
            engine = None  # the old pool's memory goes before the new one is allocated
            engine = Engine(model, local, ec, compute_dtype=dtype, plan=plan)
        elif kind == "logits":
            model(message[1].to(tp.device))
        elif kind == "stop":
            return
        else:
            raise RuntimeError(f"tensor-parallel follower: unknown message {kind!r}")
