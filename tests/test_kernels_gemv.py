"""The skinny GEMM (M <= 16 rows) against a float64 matmul of the same bf16/fp16 inputs, and against
F.linear (cuBLAS on the GPU); and `linear()`'s dispatch: F.linear unless the measured table names
this GPU, shape and row count.

CPU: Triton's interpreter at small odd shapes (masked tails, split-K). GPU (`-m gpu`): Devstral-Small
shapes, every candidate config the benchmark sweeps, and a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from devstral.kernels import gemv  # noqa: E402
from devstral.kernels.gemv_triton import GemvConfig, linear_triton  # noqa: E402

# Triton 3.6's interpreter turns 1-element arrays into loop bounds (numpy deprecates that)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def assert_rounded_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y is x @ w^T (float64 of the same inputs) rounded to y's dtype, up to float32 accumulation:
    within one unit in the last place plus the accumulation error bound."""
    exact = x.double().reshape(-1, x.shape[-1]) @ w.double().T
    eps = torch.finfo(y.dtype).eps
    accumulation = (x.double().abs().reshape(-1, x.shape[-1]) @ w.double().abs().T) * x.shape[-1] * 2 ** -24
    err = (y.double().reshape(exact.shape) - exact).abs()
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == x.dtype
    assert bool((err <= exact.abs() * eps + accumulation + 1e-30).all()), f"max error {err.max().item()}"


# ---------------------------------------------------------------- CPU, through the interpreter
@pytest.mark.parametrize("k,n", [(96, 80), (200, 72), (256, 128)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_skinny_gemm_matches_the_exact_product(k, n, m):
    g = torch.Generator().manual_seed(k + n + m)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    for cfg in (GemvConfig(block_n=32, block_k=32, split_k=1, num_stages=2),  # masked K tail at k=200
                GemvConfig(block_n=16, block_k=32, split_k=3, num_stages=2),  # split-K + the sum kernel
                GemvConfig(block_n=16, block_k=32, split_k=2, num_stages=2, persistent=1)):  # 3 programs loop
        assert_rounded_product(linear_triton(x, w, cfg), x, w)


def test_skinny_gemm_strided_rows_and_batch_dims():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 64, generator=g).to(torch.float16)
    x = torch.randn(2, 3, 128, generator=g).to(torch.float16)[..., ::2]  # [2, 3, 64], last dim strided
    y = linear_triton(x, w, GemvConfig(block_n=16, block_k=32, num_stages=2))
    assert_rounded_product(y, x, w)


def test_linear_dispatch_uses_F_linear_off_the_table(monkeypatch):
    """CPU tensors, shapes the table does not name, and more than 16 rows all take F.linear exactly."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(40, 24, generator=g).to(torch.bfloat16)
    for m in (1, 17):
        x = torch.randn(m, 24, generator=g).to(torch.bfloat16)
        assert torch.equal(gemv.linear(x, w), F.linear(x, w))
    monkeypatch.setattr(gemv, "_table", lambda: {"cpu": {"24x40": {"16": GemvConfig()._asdict()}}})
    assert gemv.tuned_config(x[:1], w) is None  # only CUDA tensors are ever dispatched by the table


def test_run_linear_keeps_wrapped_modules_forward():
    from torch import nn

    from devstral.kernels.gemv import run_linear

    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 16, generator=g)
    plain, biased = nn.Linear(16, 8, bias=False), nn.Linear(16, 8)
    assert torch.equal(run_linear(plain, x), plain(x))
    assert torch.equal(run_linear(biased, x), biased(x))  # not a bias-free Linear: its own forward


def test_shipped_table_is_well_formed():
    fields = set(GemvConfig._fields)
    for gpu, shapes in gemv._table().items():
        assert isinstance(gpu, str)
        for shape, by_m in shapes.items():
            k, n = (int(v) for v in shape.split("x"))
            assert k > 0 and n > 0
            for m, entry in by_m.items():
                assert 1 <= int(m) <= 16
                assert entry is None or set(entry) == fields


# ---------------------------------------------------------------- GPU
SHAPES = [(5120, 6144), (4096, 5120), (5120, 65536), (32768, 5120), (5120, 131072)]  # K -> N, Devstral Small
GPU_CONFIGS = [GemvConfig(64, 256, 1, 4, 4), GemvConfig(128, 128, 1, 4, 4), GemvConfig(64, 128, 4, 4, 4),
               GemvConfig(32, 256, 8, 4, 3), GemvConfig(64, 128, 1, 4, 4, persistent=2),
               GemvConfig(64, 256, 4, 4, 4, persistent=1)]


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", SHAPES)
def test_gpu_skinny_gemm_at_devstral_shapes(k, n):
    g = torch.Generator(device="cuda").manual_seed(k + n)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    for m in (1, 5, 16):
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        for cfg in GPU_CONFIGS:
            y = linear_triton(x, w, cfg)
            assert_rounded_product(y, x, w)
            # and within bf16 rounding of cuBLAS
            assert (y.float() - F.linear(x, w).float()).abs().max().item() <= 2 * 2 ** -8 * y.float().abs().max()


@pytest.mark.gpu
def test_gpu_linear_follows_the_table(monkeypatch):
    dev = "cuda"
    name = torch.cuda.get_device_name(0)
    cfg = GemvConfig(64, 128, 2, 4, 3)
    monkeypatch.setattr(gemv, "_table", lambda: {name: {"512x256": {"4": cfg._asdict(), "16": None}}})
    gemv._lookup.cache_clear()
    try:
        w = torch.randn(256, 512, device=dev, dtype=torch.bfloat16)
        assert gemv.tuned_config(torch.randn(3, 512, device=dev, dtype=torch.bfloat16), w) == cfg
        assert gemv.tuned_config(torch.randn(9, 512, device=dev, dtype=torch.bfloat16), w) is None  # null: cuBLAS
        assert gemv.tuned_config(torch.randn(17, 512, device=dev, dtype=torch.bfloat16), w) is None
        x = torch.randn(1, 2, 512, device=dev, dtype=torch.bfloat16)
        assert_rounded_product(gemv.linear(x, w), x, w)
    finally:
        gemv._lookup.cache_clear()


@pytest.mark.gpu
def test_gpu_skinny_gemm_replays_in_a_cuda_graph():
    w = torch.randn(5120, 32768, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(4, 32768, device="cuda", dtype=torch.bfloat16)
    cfg = GemvConfig(64, 128, 8, 4, 4)
    linear_triton(x, w, cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear_triton(x, w, cfg)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_rounded_product(y, x, w)
