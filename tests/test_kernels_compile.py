"""Every Triton kernel variant the engine and benchmarks/engine_kernels.py launch at Devstral-Small
shapes compiles for Hopper (sm_90a) and Ampere (sm_80, fp8 aside: Triton has no e4m3 before sm_89),
through Triton's own compiler and ptxas, with no GPU and no register spills; the decode and GEMV
kernels' K loops are software-pipelined (more than one shared-memory buffer per tile).

The launchers run on CPU tensors with their kernels swapped for recorders; each recorded launch is
specialized exactly as Triton's runtime does it and compiled for the target. About a minute on 2
cores, so it runs with DEVSTRAL_KERNEL_SWEEP=1 (with the interpreter sweep).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(not os.environ.get("DEVSTRAL_KERNEL_SWEEP"),
                                reason="compiles ~60 kernels; runs with DEVSTRAL_KERNEL_SWEEP=1")
KERNEL_MODULES = ["rms_norm_triton", "rope_triton", "silu_mul_triton", "kv_store_triton", "paged_attention_triton",
                  "gemv_triton"]


class _Recorder:
    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


class _RecordingModule:
    def __init__(self, module, launches):
        self.module, self.launches = module, launches

    def __getattr__(self, name):
        value = getattr(self.module, name)
        return _Recorder(value, self.launches) if isinstance(value, triton.runtime.jit.JITFunction) else value


def _record(monkeypatch, kinds: list[str]) -> list:
    import importlib

    from devstral.kernels.kv_format import KVLayer, storage

    launches: list = []
    mods = {name: importlib.import_module(f"devstral.kernels.{name}") for name in KERNEL_MODULES}
    for mod in mods.values():
        monkeypatch.setattr(mod, "kernels_for", lambda t, name: _RecordingModule(importlib.import_module(name),
                                                                                  launches))
        if hasattr(mod, "on_interpreter"):
            monkeypatch.setattr(mod, "on_interpreter", lambda t: False)
    bf = torch.bfloat16

    def layer(kind):
        vd, nv, sd, ns = storage(kind, 128)
        alloc = lambda n, dt: None if dt is None else torch.zeros(8, 16, 8, n, dtype=dt)  # noqa: E731
        return KVLayer(alloc(nv, vd), alloc(nv, vd), alloc(ns, sd), alloc(ns, sd), kind)

    x = torch.randn(4, 5120, dtype=bf)
    w = torch.randn(5120, dtype=bf)
    mods["rms_norm_triton"].rms_norm_triton(x, w, 1e-5)
    mods["rms_norm_triton"].add_rms_norm_triton(x, x, w, 1e-5)
    # also writing the int8 GEMVs' activations: q/k Q4_K with a Q6_K v (both layouts), gate/up Q4_K
    mods["rms_norm_triton"].add_rms_norm_triton(x[:1], x[:1], w, 1e-5, xq=(0, 1))
    mods["rms_norm_triton"].rms_norm_triton(x, w, 1e-5, xq=(0,))
    qkv = torch.randn(1, 4, 48 * 128, dtype=bf)
    q, k, v = (qkv[..., :4096].view(1, 4, 32, 128), qkv[..., 4096:5120].view(1, 4, 8, 128),
               qkv[..., 5120:].view(1, 4, 8, 128))
    cos = torch.randn(1, 4, 128, dtype=bf)
    mods["rope_triton"].apply_rope_triton(q, k, cos, cos, torch.ones(1, 4))
    mods["rope_triton"].apply_rope_triton(q, k, cos, cos)
    mods["silu_mul_triton"].silu_mul_triton(*torch.randn(4, 65536, dtype=bf).chunk(2, -1))
    pa = mods["paged_attention_triton"]
    tables, lens = torch.zeros(4, 4, dtype=torch.int32), torch.full((4,), 50, dtype=torch.int32)
    q4 = torch.randn(4, 48, 128, dtype=bf)[:, :32]
    for kind in kinds:
        mods["kv_store_triton"].store_kv_triton(k[0], v[0], layer(kind), torch.arange(4))
        # split + merge kernels, splits merged in the launch, one split writing the output, the other
        # orientation of the scores (explicit splits: no occupancy query here); the benchmark's
        # single-buffered num_stages=3 candidate is left out of the pipelining check
        for cfg in (pa.DecodeConfig(splits=3), pa.DecodeConfig(block_n=32, splits=3),
                    pa.DecodeConfig(block_n=128, num_warps=8, splits=3), pa.DecodeConfig(splits=1),
                    pa.DecodeConfig(splits=3, fused_merge=True), pa.DecodeConfig(block_n=128, splits=3),
                    pa.DecodeConfig(splits=3, tokens_major=kind == "bf16")):
            pa.decode_attention_triton(q4, layer(kind), tables, lens, 0.088, None, max_context=131072, config=cfg)
    pa.decode_attention_triton(q4, layer(kinds[0]), tables, lens, 0.088, 4096, max_context=131072,
                               config=pa.DecodeConfig(splits=3))
    pa.decode_attention_triton(q4.half(), layer(kinds[-1]), tables, lens, 0.088, None, max_context=131072,
                               config=pa.DecodeConfig(splits=3))  # fp16 queries
    if "fp8" in kinds:
        pa.decode_attention_triton(q4.half(), layer("fp8"), tables, lens, 0.088, None, max_context=131072,
                                   config=pa.DecodeConfig(splits=3))  # fp8 values dequantized, not folded
    gv = mods["gemv_triton"]
    for kk, n in ((5120, 65536), (32768, 5120)):
        weight = torch.empty(n, kk, dtype=bf)
        for cfg in ([gv.GemvConfig(64, 256, 1, 4, 4), gv.GemvConfig(64, 128, 1, 4, 4), gv.GemvConfig(128, 128, 1, 4, 3),
                     gv.GemvConfig(64, 128, 1, 4, 6), gv.GemvConfig(128, 256, 1, 8, 3),
                     gv.GemvConfig(64, 256, 1, 4, 4, 1), gv.GemvConfig(64, 128, 1, 4, 4, 2)] if n > 8192 else
                    [gv.GemvConfig(bn, bk, 8, 4, 4, p) for bn, bk in ((64, 256), (64, 128), (32, 256))
                     for p in (0, 1)]):
            gv.linear_triton(torch.randn(3, kk, dtype=bf), weight, cfg)
    return launches


def _compile(fn, args, kwargs, target):
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _local_bytes(cubin: bytes) -> int | None:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"LOCAL:(\d+)", usage)
    return int(found.group(1)) if found else None


@pytest.mark.parametrize("arch,kinds", [(90, ["bf16", "fp8", "q8_0", "q4_0"]), (80, ["bf16", "q8_0"])])
def test_every_kernel_variant_compiles_without_spills(monkeypatch, arch, kinds):
    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no offline compile entry points")
    target = GPUTarget("cuda", arch, 32)
    seen, compiled = set(), []
    for fn, args, kwargs in _record(monkeypatch, kinds):
        kernel = _compile(fn, args, kwargs, target)
        key = (fn.__name__, kernel.hash)
        if key in seen:
            continue
        seen.add(key)
        label = f"{fn.__name__} {({k: v for k, v in kwargs.items() if k.isupper()})}"
        assert _local_bytes(kernel.asm["cubin"]) in (0, None), f"{label} spills registers"
        if fn.__name__ in ("_decode_split_kernel", "_gemv_kernel", "_gemv_persistent_kernel"):
            buffers = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x", kernel.asm["ttgir"])
            assert buffers and max(int(b) for b in buffers) >= 2, f"{label}: the K loop is not pipelined"
        compiled.append(label)
    assert len({c.split()[0] for c in compiled}) == 9  # every kernel, merge and split-K sum included


def test_fp32_decode_configs_fit_in_shared_memory(monkeypatch):
    """The fp32 cache's [block_n, head_dim] tiles are 4 bytes a value: at the benchmark's block_n 128 /
    8 warps, five stages overflow an H200 block's shared memory (what the H200 run raised); the launch
    drops to the stages that fit, as the compiled sm_90 kernel's own shared-memory figure shows."""
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:
        pytest.skip("this Triton has no offline compile entry points")
    import importlib

    from devstral.kernels.kv_format import KVLayer

    h200_smem_per_block = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on the H200 (and H100)
    pa = importlib.import_module("devstral.kernels.paged_attention_triton")
    launches: list = []
    monkeypatch.setattr(pa, "kernels_for", lambda t, name: _RecordingModule(pa, launches))
    monkeypatch.setattr(pa, "on_interpreter", lambda t: False)
    monkeypatch.setattr(pa, "_smem_per_block", lambda device: h200_smem_per_block)
    cache = torch.zeros(8, 16, 8, 128)
    layer = KVLayer(cache, cache.clone(), None, None, "fp32")
    q = torch.randn(4, 32, 128)
    tables, lens = torch.zeros(4, 4, dtype=torch.int32), torch.full((4,), 50, dtype=torch.int32)
    for cfg in (pa.DecodeConfig(block_n=128, num_warps=8, splits=3), pa.DecodeConfig(splits=3)):
        pa.decode_attention_triton(q, layer, tables, lens, 0.088, None, max_context=131072, config=cfg)
    target = GPUTarget("cuda", 90, 32)
    splits = [(fn, args, kwargs) for fn, args, kwargs in launches if fn.__name__ == "_decode_split_kernel"]
    assert [kw["num_stages"] for _, _, kw in splits] == [3, 5]  # the default config keeps its pipeline
    for fn, args, kwargs in splits:
        assert _compile(fn, args, kwargs, target).metadata.shared <= h200_smem_per_block
    fn, args, kwargs = splits[0]
    assert _compile(fn, args, {**kwargs, "num_stages": 5}, target).metadata.shared > h200_smem_per_block
