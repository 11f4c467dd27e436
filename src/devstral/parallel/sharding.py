"""Which slice of each weight a tensor-parallel rank holds (Megatron's split of a Mistral decoder).

* column-parallel (split the output rows, dim 0): q_proj, k_proj, v_proj (whole heads), gate_proj,
  up_proj. Each rank computes its own heads / its own slice of the hidden layer; no communication.
* row-parallel (split the input columns, dim 1): o_proj, down_proj. Each rank multiplies its slice
  and the partial sums meet in one all-reduce per block (parallel/layers.py).
* vocab-parallel (split the rows, dim 0): embed_tokens and lm_head.
* everything else (norms) is replicated.

Splits are even, so the head counts, the hidden size and the vocabulary must divide by the number of
ranks; `check_divisible` says which one does not, in one line.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from devstral.config import ModelConfig
from devstral.errors import DevstralError

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")
VOCAB = ("embed_tokens", "lm_head")


class Slice(NamedTuple):
    dim: int  # the axis that is split
    start: int
    stop: int


def check_divisible(cfg: ModelConfig, world: int, source: str = "the model") -> None:
    """One line naming the size that the number of ranks does not divide."""
    if world < 1:
        raise DevstralError(f"--tensor-parallel must be at least 1, got {world}")
    if getattr(cfg, "n_experts", 0):
        raise DevstralError(f"--tensor-parallel {world}: {source} is a mixture-of-experts model; tensor parallelism "
                            "splits dense models only for now")
    for what, n in (("attention heads", cfg.n_heads), ("kv heads", cfg.n_kv_heads),
                    ("FFN hidden size", cfg.hidden_dim), ("vocabulary", cfg.vocab_size)):
        if n % world:
            raise DevstralError(f"--tensor-parallel {world}: {source} has {n} {what}, which {world} ranks cannot "
                                f"split evenly (choose a divisor of {n})")


def kind_of(name: str) -> str | None:
    """'column', 'row', 'vocab' or None (replicated) for one of our decoder's parameter names."""
    if not name.startswith(("model.layers.", "model.embed_tokens.", "lm_head.")):
        return None
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    if module in COLUMN:
        return "column"
    if module in ROW:
        return "row"
    if module in VOCAB:
        return "vocab"
    return None


def rank_slice(name: str, shape: tuple[int, ...], rank: int, world: int) -> Slice | None:
    """The part of tensor `name` (full `shape`) that `rank` holds, or None when it holds all of it."""
    kind = kind_of(name)
    if kind is None or world == 1 or len(shape) < 1:
        return None
    dim = 1 if kind == "row" else 0
    if len(shape) <= dim:  # a bias of a row-parallel layer: replicated (added once, after the sum)
        return None
    size = shape[dim] // world
    return Slice(dim, rank * size, (rank + 1) * size)


def local_shape(name: str, shape: tuple[int, ...], rank: int, world: int) -> tuple[int, ...]:
    s = rank_slice(name, shape, rank, world)
    if s is None:
        return tuple(shape)
    out = list(shape)
    out[s.dim] = s.stop - s.start
    return tuple(out)


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The sizes one rank computes with: its heads, kv heads and hidden slice (the KV pool holds only
    the local kv heads). The vocabulary stays whole: logits are gathered before sampling."""
    if world == 1:
        return cfg
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // world, n_kv_heads=cfg.n_kv_heads // world,
                               hidden_dim=cfg.hidden_dim // world)
