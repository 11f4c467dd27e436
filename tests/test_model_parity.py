"""Our one model definition against transformers' reference implementations (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

import devstral
from devstral.testing import make_tiny_checkpoint

transformers = pytest.importorskip("transformers")


def hf_logits(folder, ids, cls_name="AutoModelForCausalLM"):
    cls = getattr(transformers, cls_name)
    model = cls.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def random_ids(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(1000, vocab, (n - 1,), generator=g).tolist()


def test_mistral_logits_match_transformers(tiny_hf):
    llm = devstral.load(tiny_hf, dtype="fp32")
    ids = random_ids(40, llm.config.vocab_size)
    ours, ref = llm.logits(ids), hf_logits(tiny_hf, ids)
    assert ref.std() > 0.1  # not flat
    assert (ours - ref).abs().max().item() <= 1e-4


def test_ministral3_yarn_regime_matches_transformers(tiny_ministral3):
    llm = devstral.load(tiny_ministral3, dtype="fp32")
    cfg = llm.config
    assert cfg.arch == "ministral3" and cfg.yarn is not None
    # Beyond original_max_position_embeddings (64): YaRN frequencies and a query temperature > 1 apply.
    n = 3 * cfg.yarn.original_max_position_embeddings + 7
    ids = random_ids(n, cfg.vocab_size, seed=1)
    ours, ref = llm.logits(ids), hf_logits(tiny_ministral3, ids)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_sliding_window_matches_transformers(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "sw", arch="mistral", sliding_window=8, seed=3)
    llm = devstral.load(folder, dtype="fp32")
    assert llm.config.sliding_window == 8
    ids = random_ids(40, llm.config.vocab_size, seed=2)
    ours, ref = llm.logits(ids), hf_logits(folder, ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    # and the window really matters: without it the logits differ
    no_window = make_tiny_checkpoint(tmp_path / "nw", arch="mistral", seed=3)
    assert (devstral.load(no_window, dtype="fp32").logits(ids) - ours).abs().max() > 1e-3


def test_sliding_window_with_kv_cache_equals_full(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "sw", arch="mistral", sliding_window=8, seed=3)
    llm = devstral.load(folder, dtype="fp32")
    check_cached_decode_equals_full(llm, random_ids(30, llm.config.vocab_size, seed=4))


def test_hf_and_mistral_layouts_identical(tiny_hf, tiny_mistral_layout):
    a = devstral.load(tiny_hf, dtype="fp32")
    b = devstral.load(tiny_mistral_layout, dtype="fp32")
    assert a.config.as_dict() == b.config.as_dict() | {"max_position_embeddings": a.config.max_position_embeddings}
    ids = random_ids(25, a.config.vocab_size)
    assert torch.equal(a.logits(ids), b.logits(ids))


def test_ministral3_mistral_layout_matches_hf(tmp_path):
    hf = make_tiny_checkpoint(tmp_path / "hf", layout="hf", arch="ministral3", seed=5, yarn=None)
    mi = make_tiny_checkpoint(tmp_path / "mi", layout="mistral", arch="ministral3", seed=5, yarn=None)
    a, b = devstral.load(hf, dtype="fp32"), devstral.load(mi, dtype="fp32")
    ids = random_ids(150, a.config.vocab_size, seed=6)
    assert torch.equal(a.logits(ids), b.logits(ids))


def test_mistral3_wrapper_text_path_equals_the_text_model(tmp_path, tiny_ministral3, capfd):
    """Devstral Small 2's layout: the vision tower loads beside the decoder (tests/test_vision.py), and
    text-only logits are the plain decoder's; --no-vision skips the tower with a one-line notice."""
    wrapped = make_tiny_checkpoint(tmp_path / "m3", arch="ministral3", seed=1, wrap_mistral3=True)
    llm = devstral.load(wrapped, dtype="fp32")
    assert llm.vision is not None and capfd.readouterr().err == ""
    text = devstral.load(wrapped, dtype="fp32", vision=False)
    err = capfd.readouterr().err
    n = sum(1 for _ in llm.vision.parameters())
    assert text.vision is None and f"skipped {n} vision-tower tensors" in err and len(err.strip().splitlines()) == 1
    ids = random_ids(20, llm.config.vocab_size)
    reference = devstral.load(tiny_ministral3, dtype="fp32").logits(ids)
    assert torch.equal(llm.logits(ids), reference) and torch.equal(text.logits(ids), reference)


def test_sharded_checkpoint_loads(tmp_path, tiny_hf):
    sharded = make_tiny_checkpoint(tmp_path / "sh", shards=3)
    ids = random_ids(10, 4096)
    assert torch.equal(devstral.load(sharded, dtype="fp32").logits(ids), devstral.load(tiny_hf, dtype="fp32").logits(ids))


def check_cached_decode_equals_full(llm, ids):
    """Decode one token at a time through the engine's paged KV cache == one full forward (no cache)."""
    full = llm.logits(ids)
    cached = llm.engine.teacher_forced_logits(ids, chunk=1)
    assert (cached - full).abs().max().item() <= 1e-4


def test_kv_cached_decode_equals_full_recompute(tiny_ministral3):
    llm = devstral.load(tiny_ministral3, dtype="fp32")
    check_cached_decode_equals_full(llm, random_ids(150, llm.config.vocab_size, seed=7))


def test_bf16_runs_close_to_fp32(tiny_hf):
    ids = random_ids(20, 4096)
    a = devstral.load(tiny_hf, dtype="fp32").logits(ids)
    b = devstral.load(tiny_hf, dtype="bf16").logits(ids)
    assert b.dtype == torch.float32
    rel = (a - b).norm() / a.norm()
    assert rel < 3e-2


def test_tied_embeddings_match_transformers(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "tied", tie_embeddings=True, seed=9)
    llm = devstral.load(folder, dtype="fp32")
    assert llm.model.lm_head.weight is llm.model.model.embed_tokens.weight
    ids = random_ids(20, llm.config.vocab_size, seed=9)
    assert (llm.logits(ids) - hf_logits(folder, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fixture", ["tiny_hf", "tiny_ministral3", "yarn_factor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_cos_sin_are_transformers_bits(request, tmp_path, fixture, dtype):
    """cos and sin for positions far past the trained range (int64 and int32 positions), plain RoPE and YaRN's
    scaled frequencies, with an attention factor of 1 and of 1.25: bit for bit transformers' rotary embedding,
    which builds them as float32 angles, both halves concatenated, times the factor, then rounded to the dtype."""
    if fixture == "yarn_factor":
        from devstral.config import YarnScaling

        folder = make_tiny_checkpoint(tmp_path / "m3", layout="hf", arch="ministral3", seed=2, yarn=YarnScaling(
            factor=4.0, original_max_position_embeddings=64, attention_factor=1.25))
    else:
        folder = request.getfixturevalue(fixture)
    model = devstral.load(folder, dtype="fp32").model
    assert model.rotary.attention_factor == (1.25 if fixture == "yarn_factor" else 1.0)
    hf_cfg = transformers.AutoConfig.from_pretrained(folder)
    hf_cfg = getattr(hf_cfg, "text_config", hf_cfg)
    module = transformers.models.mistral.modeling_mistral if hf_cfg.model_type == "mistral" else \
        transformers.models.ministral3.modeling_ministral3
    rotary = next(getattr(module, name) for name in dir(module) if name.endswith("RotaryEmbedding"))(hf_cfg)
    positions = torch.cat([torch.arange(0, 300), torch.arange(100_000, 100_300, 7), torch.tensor([2 ** 20 - 1])])[None]
    for pos in (positions, positions.to(torch.int32)):
        cos, sin = model.rotary(pos, dtype)
        ref_cos, ref_sin = rotary(torch.zeros(1, dtype=dtype), positions)
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin), (fixture, pos.dtype)
