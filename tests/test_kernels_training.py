"""The training kernels (RMSNorm, add + RMSNorm, RoPE, silu * up: Triton forward + hand-written backward)
against plain PyTorch autograd of their references (kernels/rms_norm.py, rope.py, silu_mul.py).

The oracle for gradients is the reference's autograd in float64 on the same inputs ("truth"): the
kernels compute in float32 and round once, so every gradient must be within one unit in the last
place of the truth (plus float32 noise), and no further from it than the reference's own autograd in
the 2-byte dtype is. Forward values must match the reference as the inference kernels do.
CPU: Triton's interpreter at small odd shapes. GPU (`-m gpu`): Devstral-Small shapes, compiled, and
the same checks against Liger-Kernel 0.8.5's RMSNorm, RoPE and SiLU-mul when it is installed.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from devstral.kernels.rms_norm import add_rms_norm_ref, rms_norm_ref  # noqa: E402
from devstral.kernels.rms_norm_autograd import add_rms_norm_autograd, rms_norm_autograd  # noqa: E402
from devstral.kernels.rope import apply_rope_ref  # noqa: E402
from devstral.kernels.rope_autograd import apply_rope_autograd  # noqa: E402
from devstral.kernels.silu_mul import silu_mul_ref  # noqa: E402
from devstral.kernels.silu_mul_autograd import silu_mul_autograd  # noqa: E402
from test_kernels_elementwise import (  # noqa: E402
    assert_within_one_ulp,
    rms_norm_carried,
    rope_inputs,
    silu_mul_carried,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def grads(fn, inputs: list[torch.Tensor], upstream: list[torch.Tensor], *, dtype=None):
    """(outputs, input grads) of fn(*inputs) with the upstream gradients; inputs cast to `dtype` first."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward([o for o in outs], [u.to(o.dtype) for o, u in zip(outs, upstream, strict=True)])
    return outs, [t.grad for t in leaves if t.requires_grad]


def assert_grad_close_to_truth(got: torch.Tensor, truth: torch.Tensor, ref: torch.Tensor | None = None) -> None:
    """Within one ulp of the float64 truth (float32: 1e-5 relative) plus float32 noise on the largest
    element; and, for 2-byte dtypes, no further from the truth than the reference's autograd."""
    assert got.dtype == (ref.dtype if ref is not None else got.dtype) and got.shape == truth.shape
    rtol = 1e-5 if got.dtype == torch.float32 else torch.finfo(got.dtype).eps
    scale = truth.abs().max().item()
    err = (got.double() - truth).abs()
    bound = rtol * truth.abs() + 2e-6 * scale + torch.finfo(got.dtype).tiny
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g} (scale {scale:.3g})"
    if ref is not None and got.dtype != torch.float32:
        assert_no_further_from_truth(got, ref, truth)


def assert_no_further_from_truth(got: torch.Tensor, other: torch.Tensor, truth: torch.Tensor) -> None:
    """got's error (2-norm) against the truth is at most other's, or at most what rounding the truth
    once to got's dtype costs (~0.29 eps ||truth||; 0.5 eps allows for it)."""
    err = (got.double() - truth).norm().item()
    other_err = (other.double() - truth).norm().item()
    floor = 0.5 * torch.finfo(got.dtype).eps * truth.norm().item()
    assert err <= max(1.02 * other_err, floor), (err, other_err, floor)


def add_rms_norm_truth(dtype):
    """add + RMSNorm in float64 whose residual is the 2-byte sum the forward really computes (the
    rounding passes gradients through, as autograd treats a cast)."""
    def fn(x, delta, w, eps):
        r = x + delta
        r = r + (r.to(dtype).double() - r).detach()
        return rms_norm_ref(r, w, eps), r
    return fn


def _rand(shape, dtype, g, scale=1.0, device="cpu"):
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


# ---------------------------------------------------------------- CPU, through the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_values_and_grads(dtype, weight_grad):
    g = torch.Generator().manual_seed(11)
    x = _rand((3, 7, 100), dtype, g, 3.0)
    w = (1 + 0.1 * torch.randn(100, generator=g)).to(dtype).requires_grad_(weight_grad)
    x.requires_grad_(True)
    up = _rand((3, 7, 100), dtype, g)
    (out,), got = grads(lambda a, b: rms_norm_autograd(a, b, 1e-5), [x, w], [up])
    (want,), ref = grads(lambda a, b: rms_norm_ref(a, b, 1e-5), [x, w], [up])
    _, truth = grads(lambda a, b: rms_norm_ref(a, b, 1e-5), [x, w], [up], dtype=torch.float64)
    assert_within_one_ulp(out, want, rms_norm_carried(x.detach(), w.detach(), 1e-5))
    assert len(got) == len(truth) == (2 if weight_grad else 1)
    for a, b, t in zip(got, ref, truth, strict=True):
        assert_grad_close_to_truth(a, t, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_values_and_grads_of_both_outputs(dtype):
    """The block uses both the normed row and the residual: each gets its own upstream gradient."""
    g = torch.Generator().manual_seed(12)
    x = _rand((5, 1, 72), dtype, g, 2.0).requires_grad_()
    delta = _rand((5, 1, 72), dtype, g, 2.0).requires_grad_()
    w = (1 + 0.1 * torch.randn(72, generator=g)).to(dtype).requires_grad_()
    ups = [_rand((5, 1, 72), dtype, g), _rand((5, 1, 72), dtype, g)]
    (normed, residual), got = grads(lambda a, d, b: add_rms_norm_autograd(a, d, b, 1e-6), [x, delta, w], ups)
    (want_n, want_r), ref = grads(lambda a, d, b: add_rms_norm_ref(a, d, b, 1e-6), [x, delta, w], ups)
    _, truth = grads(lambda a, d, b: add_rms_norm_truth(dtype)(a, d, b, 1e-6), [x, delta, w], ups,
                     dtype=torch.float64)
    assert torch.equal(residual, want_r)
    assert_within_one_ulp(normed, want_n, rms_norm_carried(want_r, w.detach(), 1e-6))
    for a, b, t in zip(got, ref, truth, strict=True):
        assert_grad_close_to_truth(a, t, b)


def test_add_rms_norm_when_only_the_norm_is_used():
    g = torch.Generator().manual_seed(13)
    x, delta = _rand((4, 40), torch.float32, g).requires_grad_(), _rand((4, 40), torch.float32, g).requires_grad_()
    w, u = torch.ones(40), _rand((4, 40), torch.float32, g)
    (add_rms_norm_autograd(x, delta, w, 1e-5)[0] * u).sum().backward()
    x2, d2 = x.detach().clone().requires_grad_(), delta.detach().clone().requires_grad_()
    (add_rms_norm_ref(x2, d2, w, 1e-5)[0] * u).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta.grad, d2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_q_scale", [False, True])
def test_rope_values_and_grads(dtype, with_q_scale):
    q, k, cos, sin, q_scale = rope_inputs(2, 5, 6, 2, 32, dtype, "cpu")
    qs = q_scale if with_q_scale else None
    q, k = q.contiguous().requires_grad_(), k.contiguous().requires_grad_()
    g = torch.Generator().manual_seed(14)
    ups = [_rand(q.shape, dtype, g), _rand(k.shape, dtype, g)]
    (oq, ok), got = grads(lambda a, b: apply_rope_autograd(a, b, cos, sin, qs), [q, k], ups)
    (wq, wk), ref = grads(lambda a, b: apply_rope_ref(a, b, cos, sin, qs), [q, k], ups)
    qs64 = None if qs is None else qs.to(dtype).double()  # the forward rounds q_scale to q's dtype
    _, truth = grads(lambda a, b: apply_rope_ref(a, b, cos.double(), sin.double(), qs64), [q, k], ups,
                     dtype=torch.float64)
    assert torch.equal(oq, wq) and torch.equal(ok, wk)  # the inference kernel's forward: bit for bit
    for a, b, t in zip(got, ref, truth, strict=True):
        assert_grad_close_to_truth(a, t, b)


def test_rope_when_only_queries_are_used():
    q, k, cos, sin, _ = rope_inputs(1, 3, 4, 2, 16, torch.float32, "cpu")
    q, k = q.contiguous().requires_grad_(), k.contiguous().requires_grad_()
    apply_rope_autograd(q, k, cos, sin)[0].sum().backward()
    q2 = q.detach().clone().requires_grad_()
    apply_rope_ref(q2, k.detach(), cos, sin)[0].sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-6, atol=1e-6)
    assert k.grad is not None and not k.grad.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_values_and_grads(dtype):
    g = torch.Generator().manual_seed(15)
    gate = _rand((3, 2, 2500), dtype, g, 4.0).requires_grad_()
    up = _rand((3, 2, 2500), dtype, g, 2.0).requires_grad_()
    ups = [_rand((3, 2, 2500), dtype, g)]
    (out,), got = grads(silu_mul_autograd, [gate, up], ups)
    (want,), ref = grads(silu_mul_ref, [gate, up], ups)
    _, truth = grads(silu_mul_ref, [gate, up], ups, dtype=torch.float64)
    assert_within_one_ulp(out, want, silu_mul_carried(gate.detach(), up.detach()))
    for a, b, t in zip(got, ref, truth, strict=True):
        assert_grad_close_to_truth(a, t, b)


def test_dispatch_takes_the_training_kernels_only_when_a_gradient_flows(monkeypatch):
    from devstral.kernels.rms_norm import rms_norm
    from devstral.kernels.rope import apply_rope
    from devstral.kernels.silu_mul import silu_mul

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 3, 16, requires_grad=True)
    w = torch.ones(16)
    assert "RMSNorm" in type(rms_norm(x, w, 1e-5).grad_fn).__name__
    assert "SiluMul" in type(silu_mul(x, x).grad_fn).__name__
    q = torch.randn(1, 3, 2, 16, requires_grad=True)
    cos, sin = torch.ones(1, 3, 16), torch.zeros(1, 3, 16)
    assert "Rope" in type(apply_rope(q, q, cos, sin)[0].grad_fn).__name__
    with torch.no_grad():
        assert rms_norm(x, w, 1e-5).grad_fn is None


def test_model_loss_and_grads_through_the_training_kernels(monkeypatch):
    """A LoRA step of a small Mistral through every training kernel (interpreted) equals the
    reference path's loss and LoRA gradients."""
    from devstral.config import ModelConfig
    from devstral.model.lora import inject_lora, parse_targets, trainable_parameters
    from devstral.model.transformer import Transformer

    cfg = ModelConfig(arch="mistral", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                      vocab_size=128, rope_theta=1e4, max_position_embeddings=256, norm_eps=1e-5)

    def run():
        torch.manual_seed(0)
        model = Transformer(cfg)
        inject_lora(model, parse_targets("all-linear"), 4, 8, seed=0)
        for m in model.modules():
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B.weight, std=0.05)
        params = trainable_parameters(model)
        for p in params:
            p.requires_grad_(True)
        tokens = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), tokens[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), [p.grad for p in params], logits.grad_fn

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ref_loss, ref_grads, _ = run()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    from devstral.kernels import rms_norm_autograd

    original = rms_norm_autograd._backward
    monkeypatch.setattr(rms_norm_autograd, "_backward", lambda *a: calls.append(1) or original(*a))
    loss, got, _ = run()
    assert calls, "the training kernels did not run"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- GPU
def _liger(name):
    try:
        import importlib

        return importlib.import_module(f"liger_kernel.ops.{name}")
    except ImportError:
        return None


@pytest.mark.gpu
@pytest.mark.parametrize("weight_grad", [False, True])
def test_gpu_rms_norm_at_devstral_shape_and_against_liger(weight_grad):
    dev, dtype = "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(21)
    x = _rand((4099, 5120), dtype, g, 2.0, dev).requires_grad_()
    w = (1 + 0.1 * torch.randn(5120, generator=g)).to(dtype).to(dev).requires_grad_(weight_grad)
    up = _rand((4099, 5120), dtype, g, 1.0, dev)
    (out,), got = grads(lambda a, b: rms_norm_autograd(a, b, 1e-5), [x, w], [up])
    (want,), ref = grads(lambda a, b: rms_norm_ref(a, b, 1e-5), [x, w], [up])
    _, truth = grads(lambda a, b: rms_norm_ref(a, b, 1e-5), [x, w], [up], dtype=torch.float64)
    assert_within_one_ulp(out, want, rms_norm_carried(x.detach(), w.detach(), 1e-5))
    for a, b, t in zip(got, ref, truth, strict=True):
        assert_grad_close_to_truth(a, t, b)
    liger = _liger("rms_norm")
    if liger is None:
        pytest.skip("liger_kernel is not installed: the Liger comparison did not run")
    (lout,), lgot = grads(lambda a, b: liger.LigerRMSNormFunction.apply(a, b, 1e-5, 0.0, "llama", False), [x, w], [up])
    assert_within_one_ulp(lout, want, rms_norm_carried(x.detach(), w.detach(), 1e-5))
    for ours, theirs, t in zip(got, lgot, truth, strict=True):  # ours at least as close to the truth as Liger's
        assert_no_further_from_truth(ours, theirs, t)


@pytest.mark.gpu
def test_gpu_add_rms_norm_at_devstral_shape():
    dev, dtype = "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(22)
    x, delta = _rand((2048, 5120), dtype, g, 2.0, dev), _rand((2048, 5120), dtype, g, 2.0, dev)
    x.requires_grad_(), delta.requires_grad_()
    w = (1 + 0.1 * torch.randn(5120, generator=g)).to(dtype).to(dev)
    ups = [_rand((2048, 5120), dtype, g, 1.0, dev), _rand((2048, 5120), dtype, g, 1.0, dev)]
    (normed, residual), got = grads(lambda a, d: add_rms_norm_autograd(a, d, w, 1e-5), [x, delta], ups)
    (want_n, want_r), ref = grads(lambda a, d: add_rms_norm_ref(a, d, w, 1e-5), [x, delta], ups)
    _, truth = grads(lambda a, d: add_rms_norm_truth(dtype)(a, d, w.double(), 1e-5), [x, delta], ups,
                     dtype=torch.float64)
    assert torch.equal(residual, want_r)
    assert_within_one_ulp(normed, want_n, rms_norm_carried(want_r, w, 1e-5))
    for a, b, t in zip(got, ref, truth, strict=True):
        assert_grad_close_to_truth(a, t, b)


@pytest.mark.gpu
@pytest.mark.parametrize("with_q_scale", [False, True])
def test_gpu_rope_at_devstral_shape_and_against_liger(with_q_scale):
    dtype = torch.bfloat16
    q, k, cos, sin, q_scale = rope_inputs(1, 2048, 32, 8, 128, dtype, "cuda")
    qs = q_scale if with_q_scale else None
    q, k = q.contiguous().requires_grad_(), k.contiguous().requires_grad_()
    g = torch.Generator().manual_seed(23)
    ups = [_rand(q.shape, dtype, g, 1.0, "cuda"), _rand(k.shape, dtype, g, 1.0, "cuda")]
    (oq, ok), got = grads(lambda a, b: apply_rope_autograd(a, b, cos, sin, qs), [q, k], ups)
    (wq, wk), ref = grads(lambda a, b: apply_rope_ref(a, b, cos, sin, qs), [q, k], ups)
    qs64 = None if qs is None else qs.to(dtype).double()
    _, truth = grads(lambda a, b: apply_rope_ref(a, b, cos.double(), sin.double(), qs64), [q, k], ups,
                     dtype=torch.float64)
    assert torch.equal(oq, wq) and torch.equal(ok, wk)
    for a, b, t in zip(got, ref, truth, strict=True):
        assert_grad_close_to_truth(a, t, b)
    liger = _liger("rope")
    if liger is None or with_q_scale:  # Liger's RoPE has no query temperature
        return
    # Liger takes HF's [B, H, T, D] layout
    (lq, lk), lgot = grads(lambda a, b: liger.LigerRopeFunction.apply(a, b, cos, sin),
                           [q.transpose(1, 2), k.transpose(1, 2)], [u.transpose(1, 2) for u in ups])
    torch.testing.assert_close(lq.transpose(1, 2), wq, rtol=2 * torch.finfo(dtype).eps, atol=1e-2)
    for ours, theirs, t in zip(got, lgot, truth, strict=True):
        assert_no_further_from_truth(ours, theirs.transpose(1, 2), t)


@pytest.mark.gpu
def test_gpu_silu_mul_at_devstral_shape_and_against_liger():
    dev, dtype = "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(24)
    gate, up = _rand((2048, 32768), dtype, g, 3.0, dev), _rand((2048, 32768), dtype, g, 1.0, dev)
    gate.requires_grad_(), up.requires_grad_()
    ups = [_rand((2048, 32768), dtype, g, 1.0, dev)]
    (out,), got = grads(silu_mul_autograd, [gate, up], ups)
    (want,), ref = grads(silu_mul_ref, [gate, up], ups)
    _, truth = grads(silu_mul_ref, [gate, up], ups, dtype=torch.float64)
    assert_within_one_ulp(out, want, silu_mul_carried(gate.detach(), up.detach()))
    for a, b, t in zip(got, ref, truth, strict=True):
        assert_grad_close_to_truth(a, t, b)
    liger = _liger("swiglu")
    if liger is None:
        pytest.skip("liger_kernel is not installed: the Liger comparison did not run")
    _, lgot = grads(liger.LigerSiLUMulFunction.apply, [gate, up], ups)
    for ours, theirs, t in zip(got, lgot, truth, strict=True):
        assert_no_further_from_truth(ours, theirs, t)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["ours", "liger"])
def test_gpu_training_kernels_in_a_lora_step_match_the_reference_path(monkeypatch, kernels):
    """A bf16 LoRA step of a 2-layer Devstral-width model: the Triton training kernels (ours everywhere,
    or with Liger's RoPE and fused linear + CE: kernels/train_backends.py) against the reference path
    (DEVSTRAL_NO_TRITON), same loss and LoRA gradients within bf16 noise."""
    if kernels == "liger":
        pytest.importorskip("liger_kernel")
    monkeypatch.setenv("DEVSTRAL_TRAIN_KERNELS", kernels)
    from devstral import kernels
    from devstral.config import ModelConfig
    from devstral.kernels.varlen_attention import Documents
    from devstral.model.lora import inject_lora, parse_targets, trainable_parameters
    from devstral.model.transformer import Transformer
    from devstral.train.batching import Batch
    from devstral.train.loss import summed_loss

    cfg = ModelConfig(arch="mistral", dim=5120, n_layers=2, n_heads=32, n_kv_heads=8, head_dim=128,
                      hidden_dim=8192, vocab_size=4096, rope_theta=1e6, max_position_embeddings=4096, norm_eps=1e-5)

    def run():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Transformer(cfg).to(torch.bfloat16)
        from devstral.model.rope import Rotary

        model.rotary = Rotary(cfg).cuda()
        inject_lora(model, parse_targets("all-linear"), 16, 16, seed=0)
        for m in model.modules():
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B.weight, std=0.01)
        params = trainable_parameters(model)
        for p in params:
            p.requires_grad_(True)
        tokens = torch.randint(0, 4096, (1, 1024), generator=torch.Generator().manual_seed(1)).cuda()
        batch = Batch(tokens, tokens.clone(), torch.arange(1024, device="cuda")[None], None, Documents((1024,)))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n = summed_loss(model, batch)
        (loss / n).backward()
        return float(loss) / n, torch.cat([p.grad.flatten() for p in params])

    loss, grad = run()
    monkeypatch.setenv("DEVSTRAL_NO_TRITON", "1")
    kernels.triton_available.cache_clear()
    try:
        ref_loss, ref_grad = run()
    finally:
        monkeypatch.delenv("DEVSTRAL_NO_TRITON")
        kernels.triton_available.cache_clear()
    assert abs(loss - ref_loss) <= 2e-3 * abs(ref_loss)
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() < 2e-2
