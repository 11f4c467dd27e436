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
                              help="CPU threads for PyTorch and llama.cpp (default: the number of physical cores).")


def apply_threads(threads: int | None) -> int:
    """torch.set_num_threads(threads or the physical core count); returns the number used.

    torch's default (all logical CPUs) makes a small model several times slower on a busy machine."""
    import torch

    n = threads or physical_cores()
    torch.set_num_threads(n)
    return n


# The engine's knobs, shared by run, chat and serve.
SPECULATIVE_OPTION = typer.Option("lookup", "--speculative",
                                  help="lookup: draft tokens from the context and verify them in one pass "
                                       "(exact: same output, same distribution); off: one token per pass.")
BACKEND_OPTION = typer.Option("auto", "--backend",
                              help="auto (torch on CUDA, llama.cpp for a .gguf without CUDA when llama-cpp-python "
                                   "is installed), torch or llama.cpp.")
GPU_MEMORY_OPTION = typer.Option(0.9, "--gpu-memory-fraction", min=0.05, max=1.0,
                                 help="Share of the GPU the model, its KV cache and activations may use.")
TENSOR_PARALLEL_OPTION = typer.Option(None, "--tensor-parallel", "-tp", min=1,
                                      help="Split the model over N processes (N GPUs on CUDA, NCCL; gloo on the CPU); "
                                           "this process is rank 0 and starts the others. Under torchrun: its "
                                           "process count.")
QUANTIZE_ON_LOAD = typer.Option(None, "--quantize-on-load", help="Quantize a safetensors model as it loads, to fit "
                                "a smaller GPU: q8_0, q4_k or fp8.")

MMPROJ_OPTION = typer.Option(None, "--mmproj", help="The vision projector GGUF (llama.cpp's mmproj) that goes with "
                             "a GGUF model: images in chat. Safetensors models carry their own vision tower.")
VISION_OPTION = typer.Option(True, "--vision/--no-vision", " /--no-mmproj",
                             help="Load a multimodal checkpoint's vision encoder (images in chat); --no-vision "
                                  "saves its memory, and with org/repo:QUANT skips downloading the repo's mmproj "
                                  "(--no-mmproj, llama.cpp's name, is the same).")


def load_llm(model: str | None, *, adapter: Path | None = None, device: str = "auto", dtype: str = "auto",
             kv_cache_dtype: str = "auto", ctx_size: int | None = None, system: str | None = None,
             no_system: bool = False, speculative: str = "lookup", gpu_memory_fraction: float | None = None,
             backend: str = "auto", quantize_on_load: str | None = None, mmproj: Path | None = None,
             vision: bool = True, tensor_parallel: int | None = None):
    import devstral

    with stderr.status("loading model…", spinner="dots"):
        llm = devstral.load(model, adapter=adapter, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                            max_context=ctx_size, speculative=speculative,
                            gpu_memory_fraction=gpu_memory_fraction, backend=backend,
                            quantize_on_load=quantize_on_load, mmproj=mmproj, vision=vision,
                            tensor_parallel=tensor_parallel)
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


def write_ollama_modelfile(gguf: Path, path: Path, source: Path) -> Path:
    """The Ollama Modelfile of a GGUF made from the model at `source` (a folder or a .gguf): its
    tokenizer's format and system prompt, its sampling defaults and trained context."""
    from devstral.config import ModelConfig
    from devstral.engine.sampling import defaults_for_model
    from devstral.formats.gguf_chat import builtin_template
    from devstral.formats.modelfile import TEMPLATE_VERSIONS, write_modelfile
    from devstral.prompt.system_prompt import fill_placeholders
    from devstral.prompt.tokenizer import load_tokenizer

    folder = source if source.is_dir() else source.parent
    tokenizer = load_tokenizer(source)
    version = getattr(tokenizer, "version", "")
    template = getattr(tokenizer, "chat_template", None)
    if not version.startswith("v") and template:  # a GGUF we wrote carries our template for its version
        version = next((v for v in TEMPLATE_VERSIONS if builtin_template(v) == template), version)
    system = tokenizer.default_system_prompt
    if system:
        system = fill_placeholders(system, name=folder.name)
    trained = ModelConfig.from_dir(folder).max_position_embeddings if source.is_dir() else None
    sampling = vars(defaults_for_model(folder)) if source.is_dir() else {}
    return write_modelfile(gguf, path, tokenizer_version=version, sampling=sampling, system=system,
                           num_ctx=min(trained, 16384) if trained else None)
