"""Which engine runs a model: `--backend auto|torch|llama.cpp`.

- torch: our PyTorch engine (engine.py): any checkpoint, CPU or CUDA, LoRA adapters, embeddings.
- llama.cpp: `LlamaCppEngine` over llama-cpp-python (a GGUF only): llama.cpp's CPU kernels (or the
  Metal/CUDA build one installed), with our prompts, sampling, stop handling and tool-call parsing.
- auto: torch on CUDA; llama.cpp for a GGUF on a machine without CUDA when llama-cpp-python is
  installed and safe to run here; torch otherwise.

Both engines have the same surface: `add(prompt_ids, params, max_tokens, stop_ids) -> Sequence`,
`abort(seq, reason)`, `step() -> list[Sequence]`, `has_work()`, `max_context`, `num_running`,
`num_waiting`, `stats`, and for /metrics `blocks` (num_free, num_blocks, stats) and
`scheduler.num_preemptions`. `LLM` and the server's worker use nothing else.
"""

from __future__ import annotations

import sys

BACKENDS = ("auto", "torch", "llama.cpp")


def choose_backend(backend: str, *, gguf: bool, device: str, adapter: bool, cuda: bool | None = None) -> str:
    """"torch" or "llama.cpp" for this model; DevstralError when the explicit choice cannot run it."""
    from devstral.engine.llamacpp_model import llama_cpp, llama_cpp_unavailable
    from devstral.errors import DevstralError

    if backend not in BACKENDS:
        raise DevstralError(f"--backend: unknown value {backend!r} (choose auto, torch or llama.cpp)")
    if backend == "torch":
        return "torch"
    if backend == "llama.cpp":
        if not gguf:
            raise DevstralError("--backend llama.cpp runs .gguf files: make one with `devstral quantize MODEL "
                                "out.gguf --type Q8_0` (or F32, F16, Q4_K_M), or use --backend torch")
        if adapter:
            raise DevstralError("--adapter needs --backend torch; for llama.cpp merge it into a GGUF first "
                                "(devstral finetune ... --merge --gguf Q8_0)")
        llama_cpp()  # raises with the reason (not installed, or a build that would crash here)
        return "llama.cpp"
    if not gguf or adapter:
        return "torch"
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if device.startswith("cuda") or (device == "auto" and cuda):
        return "torch"
    reason = llama_cpp_unavailable()
    if reason is None:
        return "llama.cpp"
    if "needs llama-cpp-python" not in reason:  # installed but unusable here: say why torch runs instead
        print(f"note: running the torch backend: {reason}", file=sys.stderr)
    return "torch"


def gpu_layers(device: str) -> int:
    """llama.cpp layers to offload: none for --device cpu, all where the build has a GPU backend (Metal,
    CUDA, Vulkan builds), none on a CPU-only build."""
    from devstral.engine.llamacpp_model import llama_cpp
    from devstral.errors import DevstralError

    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise DevstralError(f"--device: unknown value {device!r} (choose auto, cpu or cuda)")
    offload = bool(llama_cpp().llama_supports_gpu_offload())
    if device == "cpu":
        return 0
    if device == "auto":
        return -1 if offload else 0
    if not offload:
        raise DevstralError(f"--device {device}: this llama-cpp-python build has no GPU backend "
                            "(use --device cpu, or --backend torch)")
    return -1
