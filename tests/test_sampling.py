"""The sampler against independent numpy reference implementations of each truncation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from devstral.engine.sampling import Sampler, SamplingParams, defaults_for_model
from devstral.errors import DevstralError


def reference_allowed(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Written from the definitions: k best; smallest prefix of the sorted distribution reaching p; p >= min_p*max."""
    z = logits / temperature
    order = np.argsort(-z, kind="stable")
    keep = set(order[:top_k].tolist()) if 0 < top_k < len(z) else set(range(len(z)))
    kept = [i for i in order if i in keep]
    pz = np.exp(z[kept] - z[kept].max())
    pz /= pz.sum()
    if top_p < 1.0:
        cum, chosen = 0.0, []
        for i, p in zip(kept, pz, strict=True):
            chosen.append(i)
            cum += p
            if cum >= top_p:
                break
        kept = chosen
    pz = np.exp(z[kept] - z[kept].max())
    pz /= pz.sum()
    if min_p > 0:
        kept = [i for i, p in zip(kept, pz, strict=True) if p >= min_p * pz.max()]
    return set(kept)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    temperature=st.floats(0.1, 2.0),
    top_k=st.integers(0, 40),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.5),
)
def test_truncation_matches_reference(seed, temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=50).astype(np.float32)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    out = Sampler(params).truncate(torch.from_numpy(logits) / temperature)
    ours = set(torch.nonzero(torch.isfinite(out)).flatten().tolist())
    ref = reference_allowed(logits.astype(np.float64), temperature, top_k, top_p, min_p)
    # Float ties at the top-p boundary can differ by one token, and a top-p within float32's epsilon of 1
    # may drop a tail whose whole mass float32 cannot represent; everything else must agree exactly.
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert ours == ref or len(ours ^ ref) == 1 or (ours <= ref and probs[sorted(ref - ours)].sum() < 1e-6)


def test_empirical_distribution_follows_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    sampler = Sampler(params)
    n = 20_000
    counts = np.bincount([sampler(logits, []) for _ in range(n)], minlength=5)
    expected = torch.softmax(logits / 0.7, -1).numpy() * n
    chi2 = (((counts - expected) ** 2) / expected).sum()
    assert chi2 < 20.5  # p ~ 0.0004 for 4 degrees of freedom


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.randn(100)
    for seed in range(3):
        assert Sampler(SamplingParams(temperature=0, seed=seed))(logits, []) == int(logits.argmax())


def test_repeat_penalty_as_llama_cpp():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    s = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=2))
    out = s.penalize(logits, history=[0, 0, 1, 3])  # window is the last 2: tokens 1 and 3
    assert out.tolist() == [2.0, -4.0, 1.0, 0.25]
    assert Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=-1)).penalize(logits, [0]).tolist()[0] == 1.0


def test_same_seed_same_stream():
    logits = torch.randn(1000)
    p = SamplingParams(temperature=1.0, seed=42)
    a, b = Sampler(p), Sampler(p)
    assert [a(logits, []) for _ in range(50)] == [b(logits, []) for _ in range(50)]


def test_devstral_defaults_and_generation_config(tmp_path):
    p = SamplingParams()
    assert (p.temperature, p.min_p, p.top_k, p.top_p, p.repeat_penalty) == (0.15, 0.01, 64, 0.95, 1.0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_p": 0.8,
                                                                 "repetition_penalty": 1.1}))
    d = defaults_for_model(tmp_path)
    assert (d.temperature, d.top_p, d.repeat_penalty, d.top_k) == (0.7, 0.8, 1.1, 64)
    assert d.updated(temperature=0.2, top_k=None).temperature == 0.2


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("min_p", 1.0),
                                         ("repeat_penalty", 0), ("max_tokens", -1)])
def test_invalid_params_are_named(field, value):
    with pytest.raises(DevstralError, match=field):
        SamplingParams(**{field: value})


@settings(max_examples=60, deadline=None)
@given(temperature=st.floats(0, 1e308), penalty=st.floats(1e-308, 1e308), seed=st.integers(0, 100),
       top_p=st.floats(5e-324, 1.0), min_p=st.floats(0.0, 0.999))
def test_extreme_values_never_break_sampling(temperature, penalty, seed, top_p, min_p):
    """Found by the server fuzzer: float32 overflow and underflow of temperature, penalty and top_p."""
    logits = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 20
    s = Sampler(SamplingParams(temperature=temperature, repeat_penalty=penalty, seed=seed, top_p=top_p,
                               min_p=min_p))
    token = s(logits, history=[1, 2, 3, 4])
    assert 0 <= token < 64
