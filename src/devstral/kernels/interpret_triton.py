"""Running this package's Triton kernels on CPU tensors, through Triton's interpreter.

A kernel module decides at import time whether its `@triton.jit` functions compile for the GPU or
run in the interpreter (`triton.knobs.runtime.interpret`). `kernels_for(t, __name__)` gives each
launcher the right set for its tensors: the module itself for CUDA tensors, else a second copy of the
module loaded with the interpreter switched on. So one process can check a kernel's logic on the CPU
(CI has no GPU) and still run the compiled kernel on a GPU. Triton's own library functions written
in Triton (`tl.sum`, `tl.max`, `tl.cdiv`, ...) were compiled-mode objects when triton was imported;
while an interpreted kernel runs they are swapped for interpreted twins.

The interpreter of Triton 3.6 rounds float32 -> bfloat16 by truncation and drops the carry when it
rounds to fp8 (31.0 becomes 16.0). The GPU rounds to nearest even. While interpreted kernels run,
its float converter is replaced with one that rounds as the hardware does (through torch's casts,
saturating to the finite range for fp8 as `cvt.satfinite` does), so that a CPU test checks the
kernel's logic and not the interpreter's rounding.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from types import ModuleType

import numpy as np
import torch


def kernels_for(t: torch.Tensor, module_name: str) -> ModuleType:
    """The module whose kernels launch on `t`'s device: `module_name` itself for a CUDA tensor, its
    interpreted copy otherwise."""
    if t.is_cuda:
        return sys.modules[module_name]
    return _interpreted_copy(module_name)


def on_interpreter(t: torch.Tensor) -> bool:
    """True when kernels for `t` run in the interpreter, which has no bfloat16 matmul: the kernels
    then feed `tl.dot` float32 operands."""
    return not t.is_cuda


@functools.cache
def _interpreted_copy(module_name: str) -> ModuleType:
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    spec = importlib.util.find_spec(module_name)
    module = importlib.util.module_from_spec(spec)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        spec.loader.exec_module(module)
    for name, value in list(vars(module).items()):
        if isinstance(value, JITFunction) and value.fn.__module__ != module_name:
            # a helper imported from another kernel module: its interpreted twin, or the kernel
            # would call a compiled-mode function from inside the interpreter
            setattr(module, name, getattr(_interpreted_copy(value.fn.__module__), value.fn.__name__))
        elif isinstance(value, InterpretedFunction):
            value.run = _patched_while_running(value.run)
    return module


@contextlib.contextmanager
def hardware_rounding():
    """For a process run wholly under TRITON_INTERPRET=1 (kernels_for's copies get this by themselves):
    float casts inside round as the GPU does, while the block runs."""
    from triton.runtime import interpreter

    original = interpreter._convert_float
    interpreter._convert_float = _exact_convert(interpreter)
    try:
        yield
    finally:
        interpreter._convert_float = original


def _patched_while_running(run):
    """The interpreter's library twins and exact casts, in place only while one of our kernels runs."""

    @functools.wraps(run)
    def wrapped(*args, **kwargs):
        swaps = _swaps()
        for owner, name, _, patched in swaps:
            setattr(owner, name, patched)
        try:
            return run(*args, **kwargs)
        finally:
            for owner, name, original, _ in swaps:
                setattr(owner, name, original)

    return wrapped


@functools.cache
def _swaps() -> list:
    """(owner, attribute, original, replacement) for every patch."""
    from triton.runtime import interpreter
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    with contextlib.suppress(ImportError):
        import triton.experimental.gluon  # noqa: F401  (imported lazily by launches; not while swapped)
    swaps = [(interpreter, "_convert_float", interpreter._convert_float, _exact_convert(interpreter))]
    for name, module in list(sys.modules.items()):
        if name == "triton.language" or name.startswith("triton.language."):
            for attr, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    swaps.append((module, attr, value, InterpretedFunction(value.fn)))
    return swaps


def _exact_convert(interpreter):
    """The interpreter's float converter, rounding to nearest even through torch's casts."""
    import triton.language as tl

    torch_types = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16,
                   tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2, tl.float64: torch.float64}
    int_types = {1: (np.int8, torch.int8), 2: (np.int16, torch.int16), 4: (np.int32, torch.int32),
                 8: (np.int64, torch.int64)}
    fp8_max = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
    original = interpreter._convert_float
    rtz = interpreter._ir.ROUNDING_MODE.RTZ

    def convert(data, src_type, dst_type, rounding_mode):
        src, dst = torch_types.get(src_type), torch_types.get(dst_type)
        if src is None or dst is None or rounding_mode == rtz:
            return original(data, src_type, dst_type, rounding_mode)
        np_in, t_in = int_types[src.itemsize]
        _, t_out = int_types[dst.itemsize]
        bits = np.ascontiguousarray(data).view(np_in)
        x = torch.from_numpy(bits.copy()).view(t_in).view(src)
        if dst in fp8_max:
            limit = fp8_max[dst]
            x = x.float().clamp(-limit, limit)  # satfinite; NaN stays NaN
        y = x.to(dst).view(t_out).numpy()
        return y.view(np.dtype(f"uint{8 * dst.itemsize}")).reshape(np.shape(data))

    return convert
