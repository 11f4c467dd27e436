"""Helpers and options the commands share: --threads, loading a model from flags, flags -> SamplingParams."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

stderr = Console(stderr=True)


def physical_cores() -> int:
    """Physical cores this process may run on: psutil's count, capped by the CPU affinity mask (a
    container or `taskset` limit). Hyper-threads do not speed up matrix products; they slow them down."""
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        cores = min(cores, len(os.sched_getaffinity(0)))
    return max(1, cores)


# `--threads` for every command that computes on the CPU (serve and agent import it from here).
THREADS_OPTION = typer.Option(None, "--threads", min=1,
                              help="CPU threads for PyTorch (default: the number of physical cores).")


def apply_threads(threads: int | None) -> int:
    """torch.set_num_threads(threads or the physical core count); returns the number used.

    torch's default (all logical CPUs) makes a small model several times slower on a busy machine."""
    import torch

    n = threads or physical_cores()
    torch.set_num_threads(n)
    return n


def load_llm(model: str | None, *, adapter: Path | None = None, device: str = "auto", dtype: str = "auto",
             kv_cache_dtype: str = "auto", ctx_size: int | None = None, system: str | None = None,
             no_system: bool = False):
    import devstral

    with stderr.status("loading model…", spinner="dots"):
        llm = devstral.load(model, adapter=adapter, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                            max_context=ctx_size)
    if no_system:
        llm.tokenizer.default_system_prompt = None
    elif system is not None:
        llm.tokenizer.default_system_prompt = system
    return llm


def sampling_from_flags(llm, **flags):
    """The model's defaults (Devstral's, then generation_config.json), overridden by the flags given."""
    stop = flags.pop("stop", None)
    params = llm.default_sampling.updated(**flags)
    if stop:
        params = params.updated(stop=list(stop))
    return params
