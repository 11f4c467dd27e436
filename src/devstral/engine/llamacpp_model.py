"""llama.cpp as a library: importing it safely, and a GGUF's weights loaded in it.

llama-cpp-python is optional (`pip install devstral[llamacpp]`). Importing it is refused, with the fix
in one line, when its build would crash on this machine: a build made with `GGML_NATIVE=ON` on a CPU
that advertises AMX uses AMX instructions, and a Linux kernel that has not enabled AMX (many VMs)
kills the process with SIGILL at the first matrix product (upstream llama.cpp PR #26954). Linux
lists `amx_tile` among a CPU's flags only when the kernel enabled it, so the check costs nothing.

Only token ids, image pixels and logits cross into llama.cpp: tokenization, prompts and sampling stay ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import weakref
from pathlib import Path
from typing import Any

from devstral.errors import DevstralError

# What the README says to build with: portable AVX2 kernels, no AMX (Metal and CUDA builds add their flags).
PORTABLE_BUILD = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
                  '-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" '
                  'pip install --force-reinstall --no-cache-dir "llama-cpp-python>=0.3.36"')
INSTALL_HINT = "pip install 'devstral[llamacpp]' (the README shows the build flags for your CPU)"

_AMX_KERNELS = re.compile(r"\bAMX\w*\s*=\s*1\b")
_module: Any = None


def amx_problem(system_info: str, cpu_flags: set[str] | None) -> str | None:
    """Why this build would die with SIGILL here, or None. `system_info` is llama.cpp's feature line;
    `cpu_flags` the kernel's CPU flags (None where the OS does not list them: nothing to check)."""
    if cpu_flags is None or not _AMX_KERNELS.search(system_info) or "amx_tile" in cpu_flags:
        return None
    return ("llama-cpp-python was built with AMX kernels, which this CPU advertises but its kernel has not "
            "enabled (the first matrix product would crash with SIGILL); rebuild it: " + PORTABLE_BUILD)


def linux_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def llama_cpp() -> Any:
    """The `llama_cpp` module with its backend initialised; DevstralError when it is not installed or
    its build would crash on this CPU."""
    global _module
    if _module is not None:
        return _module
    try:
        import llama_cpp as lib
    except (ImportError, OSError) as e:  # OSError: the package is there but its shared library is not loadable
        raise DevstralError(f"the llama.cpp backend needs llama-cpp-python ({e}): {INSTALL_HINT}") from None
    problem = amx_problem(lib.llama_print_system_info().decode(errors="replace"), linux_cpu_flags())
    if problem:
        raise DevstralError(problem)
    _quiet_log(lib)
    lib.llama_backend_init()
    _module = lib
    return lib


_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5  # ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT
_log_state: dict[str, Any] = {"level": 0, "errors": [], "callback": None}


def _quiet_log(lib: Any) -> None:
    """llama.cpp logs nothing on our stderr: its errors are kept, and the DevstralError of a call that
    failed quotes them (`llama_errors`), so a bad file is still one line."""
    @lib.llama_log_callback
    def log(level: int, text: bytes, user_data: Any) -> None:
        if level != _GGML_LOG_CONT:
            _log_state["level"] = level
        if _log_state["level"] == _GGML_LOG_ERROR:
            line = text.decode("utf-8", errors="replace").strip()
            if line:
                _log_state["errors"] = [*_log_state["errors"][-15:], line]

    _log_state["callback"] = log  # ctypes calls it for the life of the process: keep it alive
    lib.llama_log_set(log, ctypes.c_void_p(0))


def llama_errors(clear: bool = False) -> str:
    """llama.cpp's error lines since the last clear, the first (the cause) first."""
    text = "; ".join(_log_state["errors"])
    if clear:
        _log_state["errors"] = []
    return text


def llama_cpp_unavailable() -> str | None:
    """None when the llama.cpp backend can run here, else why not."""
    try:
        llama_cpp()
    except DevstralError as e:
        return str(e)
    return None


def check_gguf(g: Any, cfg: Any) -> None:
    """What the torch loader checks of a GGUF, without building the model: the metadata against the
    tensor table, every tensor's name and shape, and no NaN or infinite weight (llama.cpp would load
    it and compute garbage). One read of the file, which warms the page cache llama.cpp maps next."""
    import torch

    from devstral.formats.finite import check_finite, check_finite_blocks
    from devstral.formats.gguf_model import FLOAT_TYPES, check_gguf_config_against_tensors
    from devstral.formats.gguf_names import from_gguf_name
    from devstral.model.transformer import Transformer

    check_gguf_config_against_tensors(g, cfg)
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in Transformer(cfg).named_parameters(remove_duplicate=False)}
    views = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for name in g.tensor_names:
        ours = from_gguf_name(name)
        if ours is None:
            if name.startswith("blk."):
                raise DevstralError(f"{g.path}: unexpected tensor {name} for architecture {g.architecture}")
            continue
        info = g.info(name)
        if info.shape != expected[ours]:
            raise DevstralError(f"{g.path}: tensor {name} has shape {list(info.shape)} but the metadata implies "
                                f"{list(expected[ours])}")
        raw = g.raw_torch(name)
        if info.qtype in FLOAT_TYPES:
            check_finite(raw.view(views[info.qtype.name]), name, g.path)
        else:
            check_finite_blocks(raw.reshape(info.shape[0], -1), info.qtype, name, g.path)


class LlamaCppModel:
    """A GGUF's weights in llama.cpp (memory-mapped where the build allows). Engines make their
    contexts (KV cache, threads) from it; `close()` frees them first, then the weights.

    It also answers the few questions the server asks of a torch model: `parameters()` (the size
    /api/tags reports), `to("meta")` (keep_alive's unload) and `hidden_states` (embeddings, which
    this backend does not compute)."""

    def __init__(self, path: str | Path, *, gpu_layers: int = 0):
        lib = llama_cpp()
        self.path = Path(path)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        llama_errors(clear=True)
        self.ptr = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            cause = llama_errors(clear=True).split("; ")[0]
            raise DevstralError(f"{self.path}: llama.cpp could not load this GGUF: {cause or 'no reason given'}")
        self.gpu_layers = gpu_layers
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.ptr)))
        self.size_bytes = int(lib.llama_model_size(self.ptr))
        self.description = _model_desc(lib, self.ptr)
        self._users: weakref.WeakSet = weakref.WeakSet()  # engines whose contexts use these weights

    def register(self, engine: Any) -> None:
        self._users.add(engine)

    @property
    def loaded(self) -> bool:
        return bool(self.ptr)

    def close(self) -> None:
        for engine in list(self._users):
            engine.close()  # a context must not outlive the weights it computes with
        if self.ptr and _module is not None:
            _module.llama_model_free(self.ptr)
        self.ptr = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the library may be gone already
            self.close()

    # ---------------------------------------------------------------- what the server reads of a model
    def parameters(self):
        import torch

        yield torch.empty(self.size_bytes, dtype=torch.uint8, device="meta")  # sizes only, no memory

    def to(self, device: Any) -> LlamaCppModel:
        if str(device) != "meta":
            raise DevstralError("a llama.cpp model stays where llama.cpp put it")
        self.close()
        return self

    def hidden_states(self, *args: Any, **kwargs: Any):
        raise DevstralError("embeddings are computed by the torch backend: serve this model with --backend torch")


def _model_desc(lib: Any, ptr: Any) -> str:
    buf = ctypes.create_string_buffer(256)
    lib.llama_model_desc(ptr, buf, ctypes.sizeof(buf))
    return buf.value.decode(errors="replace")
