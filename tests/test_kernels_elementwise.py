"""The elementwise Triton kernels (RMSNorm, residual add + RMSNorm, RoPE, SwiGLU's silu * up) against
their plain-PyTorch references, whose torch ops define the semantics.

CPU: the kernels run in Triton's interpreter at small odd shapes. GPU (`-m gpu`): the compiled
kernels at Devstral-Small shapes, and inside a captured CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from devstral.kernels.rms_norm import add_rms_norm_ref, rms_norm_ref  # noqa: E402
from devstral.kernels.rms_norm_triton import add_rms_norm_triton, rms_norm_triton  # noqa: E402
from devstral.kernels.rope import apply_rope_ref  # noqa: E402
from devstral.kernels.rope_triton import apply_rope_triton  # noqa: E402
from devstral.kernels.silu_mul import silu_mul_ref  # noqa: E402
from devstral.kernels.silu_mul_triton import silu_mul_triton  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def ulp(t: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of t, in t's dtype, as float64."""
    _, exp = torch.frexp(t.double().abs().clamp_min(torch.finfo(t.dtype).tiny))
    return torch.ldexp(torch.ones_like(exp, dtype=torch.float64), exp - 1) * torch.finfo(t.dtype).eps


def assert_within_one_ulp(out: torch.Tensor, ref: torch.Tensor, carried: torch.Tensor | None = None) -> None:
    """Same dtype and shape, and within rounding of the reference: for 2-byte floats every element
    within one unit in the last place and at most 2% of them off at all (a float32 reduction or exp
    in another order may flip a rounding); float32 results within 8 units in the last place.

    `carried`: where the reference rounds an intermediate to the 2-byte dtype and then multiplies it
    (RMSNorm's normed row by the weight, silu(gate) by up), a float32 difference in the intermediate
    may flip that rounding by one ulp of the intermediate; the product carries it as |factor| x that
    ulp, which can be up to two ulps of the output (the product may sit a binade lower). Both results
    then round once more, so the bound is carried + one ulp of the output."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    info = torch.finfo(ref.dtype)
    ulps, max_fraction = (8, 1.0) if ref.dtype == torch.float32 else (1, 0.02)
    o, r = out.double(), ref.double()
    tol = ulps * (r.abs() * info.eps + info.tiny)
    if carried is not None:
        tol = tol + carried
    assert bool(((o - r).abs() <= tol).all()), f"max error {(o - r).abs().max().item()}"
    assert (o != r).double().mean().item() <= max_fraction


def rms_norm_carried(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """|w| x one ulp of the reference's normed row (rounded to x's dtype before the weight)."""
    h = rms_norm_ref(x, torch.ones(x.shape[-1], dtype=x.dtype, device=x.device), eps)  # weight 1: the row as rounded
    return w.double().abs() * ulp(h)


def silu_mul_carried(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """|up| x one ulp of silu(gate) as the reference rounds it (to gate's dtype)."""
    return up.double().abs() * ulp(torch.nn.functional.silu(gate))


def rope_inputs(B, T, H, Hkv, D, dtype, device, *, batch_cos=True, seed=0):
    """q, k as views of one fused qkv projection (as the model makes them), and cos/sin/q_scale as
    model/rope.py builds them (YaRN-like attention factor, llama-4 temperature)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(dtype).to(device)
    q = qkv[..., :H * D].view(B, T, H, D)
    k = qkv[..., H * D:(H + Hkv) * D].view(B, T, Hkv, D)
    start = torch.randint(0, 50_000, (B if batch_cos else 1, 1), generator=g)
    pos = start + torch.arange(T)
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2).float() / D))
    freqs = pos[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * 1.07).to(dtype).to(device), (emb.sin() * 1.07).to(dtype).to(device)
    q_scale = (1 + 0.1 * torch.log1p(torch.floor(pos.float() / 8192))).expand(B, T).to(device)
    return q, k, cos, sin, q_scale


# ---------------------------------------------------------------- CPU, through the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 5, 2 * 100, generator=g) * 4).to(dtype)[..., ::2]  # strided rows, width 100
    w = (1 + 0.1 * torch.randn(100, generator=g)).to(dtype)
    assert_within_one_ulp(rms_norm_triton(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), rms_norm_carried(x, w, 1e-5))
    w32 = w.float()  # a float32 weight promotes the result to float32, as in torch
    assert_within_one_ulp(rms_norm_triton(x, w32, 1e-6), rms_norm_ref(x, w32, 1e-6), rms_norm_carried(x, w32, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_reference(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 1, 96, generator=g).to(dtype)
    delta = torch.randn(7, 1, 96, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    normed, residual = add_rms_norm_triton(x, delta, w, 1e-5)
    ref_normed, ref_residual = add_rms_norm_ref(x, delta, w, 1e-5)
    assert torch.equal(residual, ref_residual)  # one rounded add: bit for bit
    assert_within_one_ulp(normed, ref_normed, rms_norm_carried(ref_residual, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_q_scale", [False, True])
def test_rope_matches_reference_bit_for_bit(dtype, with_q_scale):
    q, k, cos, sin, q_scale = rope_inputs(2, 5, 6, 2, 32, dtype, "cpu")
    qs = q_scale if with_q_scale else None
    out_q, out_k = apply_rope_triton(q, k, cos, sin, qs)
    ref_q, ref_k = apply_rope_ref(q, k, cos, sin, qs)
    assert out_q.dtype == ref_q.dtype and out_k.dtype == ref_k.dtype
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


def test_rope_broadcast_cos_and_unbatched_input():
    q, k, cos, sin, _ = rope_inputs(3, 4, 4, 4, 16, torch.bfloat16, "cpu", batch_cos=False)
    out_q, out_k = apply_rope_triton(q, k, cos, sin)  # cos [1, T, D] shared by the batch
    ref_q, ref_k = apply_rope_ref(q, k, cos, sin)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    out_q, out_k = apply_rope_triton(q[0], k[0], cos[0], sin[0])  # [T, H, D] with cos [T, D]
    ref_q, ref_k = apply_rope_ref(q[0], k[0], cos[0], sin[0])
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_on_the_halves_of_a_fused_projection(dtype):
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(2, 3, 2 * 2500, generator=g) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_within_one_ulp(silu_mul_triton(gate, up, block=1024), silu_mul_ref(gate, up), silu_mul_carried(gate, up))


def test_empty_inputs_launch_nothing():
    x = torch.empty(0, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    assert rms_norm_triton(x, w, 1e-5).shape == (0, 64)
    assert silu_mul_triton(x, x).shape == (0, 64)


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 64, 4099])
def test_gpu_elementwise_at_devstral_shapes(dtype, rows):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(rows)
    x = torch.randn(rows, 5120, device=dev, generator=g).to(dtype)
    delta = torch.randn(rows, 5120, device=dev, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(5120, device=dev, generator=g)).to(dtype)
    assert_within_one_ulp(rms_norm_triton(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), rms_norm_carried(x, w, 1e-5))
    normed, residual = add_rms_norm_triton(x, delta, w, 1e-5)
    ref_normed, ref_residual = add_rms_norm_ref(x, delta, w, 1e-5)
    assert torch.equal(residual, ref_residual)
    assert_within_one_ulp(normed, ref_normed, rms_norm_carried(ref_residual, w, 1e-5))
    gate_up = torch.randn(rows, 2 * 32768 if rows < 4000 else 2 * 4096, device=dev, generator=g).to(dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    assert_within_one_ulp(silu_mul_triton(gate, up), silu_mul_ref(gate, up), silu_mul_carried(gate, up))
    q, k, cos, sin, q_scale = rope_inputs(1, rows, 32, 8, 128, dtype, dev)
    for qs in (None, q_scale):
        out_q, out_k = apply_rope_triton(q, k, cos, sin, qs)
        ref_q, ref_k = apply_rope_ref(q, k, cos, sin, qs)
        assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


@pytest.mark.gpu
def test_gpu_elementwise_kernels_replay_in_a_cuda_graph():
    dev, dtype = "cuda", torch.bfloat16
    x = torch.randn(8, 5120, device=dev, dtype=dtype)
    delta = torch.randn_like(x)
    w = torch.randn(5120, device=dev, dtype=dtype)
    gate_up = torch.randn(8, 2 * 4096, device=dev, dtype=dtype)
    q, k, cos, sin, q_scale = rope_inputs(1, 8, 32, 8, 128, dtype, dev)

    def step():
        normed, residual = add_rms_norm_triton(x, delta, w, 1e-5)
        return (normed, residual, rms_norm_triton(x, w, 1e-5), silu_mul_triton(*gate_up.chunk(2, -1)),
                *apply_rope_triton(q, k, cos, sin, q_scale))

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t in (x, delta, w, gate_up, q, k):  # new inputs, same buffers
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    refs = (*add_rms_norm_ref(x, delta, w, 1e-5), rms_norm_ref(x, w, 1e-5), silu_mul_ref(*gate_up.chunk(2, -1)),
            *apply_rope_ref(q, k, cos, sin, q_scale))
    gate, up = gate_up.chunk(2, -1)
    carried = (rms_norm_carried(refs[1], w, 1e-5), None, rms_norm_carried(x, w, 1e-5), silu_mul_carried(gate, up),
               None, None)
    for out, ref, c in zip(outs, refs, carried, strict=True):
        assert_within_one_ulp(out, ref, c)
    assert torch.equal(outs[1], refs[1]) and torch.equal(outs[4], refs[4]) and torch.equal(outs[5], refs[5])
