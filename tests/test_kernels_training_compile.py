"""The training kernels (`*_autograd.py`) compile for Hopper (sm_90a) and Ampere (sm_80) at Devstral-Small
shapes through Triton's compiler and ptxas, with no GPU and no register spills (as
test_kernels_compile.py does for the inference kernels; runs with DEVSTRAL_KERNEL_SWEEP=1)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from test_kernels_compile import _compile, _local_bytes, _RecordingModule  # noqa: E402

pytestmark = pytest.mark.skipif(not os.environ.get("DEVSTRAL_KERNEL_SWEEP"),
                                reason="compiles the training kernels; runs with DEVSTRAL_KERNEL_SWEEP=1")
MODULES = ["rms_norm_autograd", "rope_autograd", "silu_mul_autograd"]


def _record(monkeypatch) -> list:
    launches: list = []
    mods = {name: importlib.import_module(f"devstral.kernels.{name}") for name in MODULES}
    for mod in mods.values():
        monkeypatch.setattr(mod, "kernels_for", lambda t, name: _RecordingModule(importlib.import_module(name),
                                                                                  launches))
    bf = torch.bfloat16
    x, w = torch.randn(6, 5120, dtype=bf), torch.randn(5120, dtype=bf)
    rms = mods["rms_norm_autograd"]
    _, _, rstd = rms._forward(x, None, w, 1e-5)
    rms._forward(x, x, w, 1e-5)
    for need_dw in (False, True):
        rms._backward(x, x, w, torch.ones(6), None, need_dw, bf)
        rms._backward(x, x, w, torch.ones(6), x, need_dw, bf)
    rms._backward(x.float(), x.float(), w.float(), torch.ones(6), None, True, torch.float32)  # full training
    cos = torch.randn(1, 4, 128, dtype=bf)
    gq, gk = torch.randn(1, 4, 32, 128, dtype=bf), torch.randn(1, 4, 8, 128, dtype=bf)
    mods["rope_autograd"].rope_backward_triton(gq, gk, cos, cos, torch.ones(1, 4), bf, bf)
    mods["rope_autograd"].rope_backward_triton(gq, gk, cos, cos, None, bf, bf)
    g = torch.randn(4, 32768, dtype=bf)
    mods["silu_mul_autograd"].silu_mul_backward_triton(g, g, g)
    return launches


@pytest.mark.parametrize("arch", [90, 80])
def test_training_kernels_compile_without_spills(monkeypatch, arch):
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:
        pytest.skip("this Triton has no offline compile entry points")
    target = GPUTarget("cuda", arch, 32)
    names = set()
    for fn, args, kwargs in _record(monkeypatch):
        kernel = _compile(fn, args, kwargs, target)
        label = f"{fn.__name__} {({k: v for k, v in kwargs.items() if k.isupper()})}"
        assert _local_bytes(kernel.asm["cubin"]) in (0, None), f"{label} spills registers"
        names.add(fn.__name__)
    assert names == {"_fwd_kernel", "_bwd_kernel", "_rope_bwd_kernel", "_silu_mul_bwd_kernel"}
