"""The paged KV cache: its quantized kinds against gguf-py's codecs, and attention through the pages
against the model's own full-sequence forward (no cache at all)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

import devstral
from devstral.kernels.kv_format import dequantize, quantize
from devstral.testing import make_tiny_checkpoint


@pytest.mark.parametrize("kind,qtype", [("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)])
def test_kv_quantizers_are_byte_identical_to_gguf_py(kind, qtype):
    """Our q8_0/q4_0 KV storage holds exactly the bytes of ggml's blocks (llama.cpp's --cache-type-k)."""
    x = torch.randn(7, 3, 128) * torch.logspace(-2, 1, 128)  # blocks of very different scales
    x[0, 0, :32] = 0  # an all-zero block
    values, scales = quantize(x, kind)
    ref = quants.quantize(x.numpy().reshape(-1, 128), qtype).reshape(-1, 34 if kind == "q8_0" else 18)
    ours = np.concatenate([scales.numpy().reshape(-1, 1).view(np.uint8),
                           values.numpy().reshape(-1, 32 if kind == "q8_0" else 16).view(np.uint8)], axis=1)
    assert np.array_equal(ours, ref)
    back = dequantize(values, scales, kind, torch.float32)
    assert np.allclose(back.numpy().reshape(-1, 128), quants.dequantize(ref.reshape(-1, 128 // 32 * ref.shape[1]),
                                                                          qtype).reshape(-1, 128))


def test_fp8_round_trip_is_within_e4m3_precision():
    x = torch.randn(5, 2, 64) * torch.tensor([1e-3, 1.0, 3e3])[:, None, None].repeat(2, 1, 1)[:5]
    back = dequantize(*quantize(x, "fp8"), "fp8", torch.float32)
    rel = ((back - x).abs() / x.abs().amax(-1, keepdim=True)).max()
    assert rel < 2 ** -4  # e4m3 keeps 3 mantissa bits: half a step is 1/16 of the top binade


@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("kv_m3"), arch="ministral3", head_dim=32, seed=8)


@pytest.mark.parametrize("chunk", [1, 5, 64, None])
def test_paged_attention_equals_the_full_forward(m3, chunk):
    """Teacher-forced logits through the pages (any chunking, decode-like chunk=1 included) equal the
    model's plain forward over the whole sequence, which uses no cache at all."""
    llm = devstral.load(m3, kv_cache_dtype="fp32", prefix_caching=False)
    ids = [1] + torch.randint(1000, 3000, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    full = llm.logits(ids)
    paged = llm.engine.teacher_forced_logits(ids, chunk=chunk)
    assert torch.allclose(paged, full, atol=1e-4, rtol=1e-4)


def test_sliding_window_through_the_pages(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "sw", arch="mistral", sliding_window=8, seed=3)
    llm = devstral.load(folder, kv_cache_dtype="fp32", prefix_caching=False)
    ids = [1] + list(range(1000, 1060))
    assert torch.allclose(llm.engine.teacher_forced_logits(ids, chunk=7), llm.logits(ids), atol=1e-4, rtol=1e-4)


def test_a_prefix_cache_hit_gives_the_cold_logits(m3):
    llm = devstral.load(m3, kv_cache_dtype="fp32")
    g = torch.Generator().manual_seed(1)
    turn1 = [1] + torch.randint(1000, 3000, (70,), generator=g).tolist()
    turn2 = turn1 + torch.randint(1000, 3000, (30,), generator=g).tolist()  # the next turn repeats the first
    llm.engine.teacher_forced_logits(turn1, chunk=16)
    warm = llm.engine.teacher_forced_logits(turn2, chunk=16)
    cold = llm.logits(turn2)
    cached = int(torch.isnan(warm[:, 0]).sum())
    assert cached == 64  # the 4 full 16-token blocks of turn 1 (70 tokens)
    assert torch.allclose(warm[cached:], cold[cached:], atol=1e-4, rtol=1e-4)


def _kl(p_logits, q_logits):
    p = torch.log_softmax(p_logits.float(), -1)
    q = torch.log_softmax(q_logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


@pytest.mark.parametrize("kind,max_kl", [("q8_0", 5e-3), ("q4_0", 5e-2)])
def test_quantized_kv_quality_against_bf16(m3, kind, max_kl, record_property):
    """Next-token KL of a quantized KV cache against bf16, decoding token by token."""
    bf = devstral.load(m3, dtype="bf16", kv_cache_dtype="bf16", prefix_caching=False)
    qk = devstral.load(m3, dtype="bf16", kv_cache_dtype=kind, prefix_caching=False)
    ids = [1] + torch.randint(1000, 3000, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    a, b = bf.engine.teacher_forced_logits(ids, chunk=1), qk.engine.teacher_forced_logits(ids, chunk=1)
    kl = _kl(a, b)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    record_property(f"{kind}_mean_kl", kl.mean().item())
    print(f"{kind} KV vs bf16: mean KL {kl.mean().item():.2e}, max {kl.max().item():.2e}, top-1 agree {agree:.3f}")
    assert kl.mean().item() < max_kl and agree >= 0.9


def test_kv_kind_errors(tiny_hf):
    with pytest.raises(devstral.DevstralError, match="kv-cache-dtype"):
        devstral.load(tiny_hf, kv_cache_dtype="q3")
    if not torch.cuda.is_available():
        with pytest.raises(devstral.DevstralError, match="fp8 needs a CUDA device"):
            devstral.load(tiny_hf, kv_cache_dtype="fp8")
