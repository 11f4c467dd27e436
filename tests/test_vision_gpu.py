"""The vision encoder and image turns on CUDA: the bf16 encoder against the fp32 CPU reference (itself
equal to transformers' Pixtral + Mistral 3 projector, tests/test_vision.py), a batch of images against
each image alone, the engine's image prefill against the uncached forward, and a second turn with the
same screenshot served without running the encoder again.
Run on the GPU machine: `python -m pytest -m gpu tests/test_vision_gpu.py`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import devstral
from devstral.engine.sampling import SamplingParams
from devstral.model.vision import VisionModel
from devstral.model.vision_config import VisionConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_vision import ask, png  # noqa: E402

pytestmark = pytest.mark.gpu

# A Pixtral-shaped tower at a quarter of Devstral Small 2's width (14-pixel patches, 2x2 merge, SiLU MLP).
CONFIG = VisionConfig(hidden_size=256, intermediate_size=1024, n_layers=6, n_heads=8, patch_size=14,
                      image_size=448, rope_theta=10000.0, hidden_act="silu", spatial_merge_size=2,
                      projector_act="gelu", text_dim=512)


def _random_vision(seed: int = 0) -> VisionModel:
    g = torch.Generator().manual_seed(seed)
    model = VisionModel(CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "patch_conv" in name else 0.02))
    return model.eval()


def _images(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 224, 336, generator=g), torch.randn(3, 448, 140, generator=g)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_bf16_gpu_encoder_matches_the_fp32_cpu_reference(record_property):
    """Bound: relative Frobenius error <= 3e-2 per image and correlation >= 0.999. bf16 keeps 8 bits of
    mantissa (unit roundoff 2^-9 = 2e-3), rounded after every matmul, norm and residual add over 6
    layers: the same model in bf16 on the CPU measures 1.2-1.3% against fp32."""
    ref_model = _random_vision()
    images = _images()
    with torch.no_grad():
        ref = ref_model(images)
        gpu_model = _random_vision().to("cuda", torch.bfloat16)
        out = gpu_model([im.to("cuda") for im in images])
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        err = _rel(a.float().cpu(), b)
        corr = torch.corrcoef(torch.stack([a.float().cpu().flatten(), b.flatten()]))[0, 1].item()
        record_property("rel_error", err)
        assert err <= 3e-2 and corr >= 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_of_two_images_equals_each_alone(dtype):
    """Block-diagonal attention: in one call each image attends only to itself. The linear layers run
    over both images' patches at once, so cuBLAS may pick other kernels than for one image: equal up to
    the dtype's rounding (fp32 matmuls here may use TF32 in cuDNN's convolution)."""
    model = _random_vision().to("cuda", dtype)
    a, b = (im.to("cuda", dtype) for im in _images(seed=2))
    with torch.no_grad():
        both = model([a, b])
        alone = [model([a])[0], model([b])[0]]
    bound = 1e-3 if dtype == torch.float32 else 2e-2
    for x, y in zip(both, alone, strict=True):
        assert x.shape == y.shape
        assert _rel(x.float(), y.float()) <= bound


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from devstral.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("vision_gpu") / "m3", arch="ministral3", wrap_mistral3=True,
                                seed=5, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=512)


def test_engine_image_prefill_matches_the_uncached_forward(ckpt):
    """fp32 on CUDA: greedy tokens through the paged engine (image tokens cut across prefill chunks)
    equal greedy decoding by full forwards without a cache."""
    llm = devstral.load(ckpt, device="cuda", dtype="fp32", kv_cache_dtype="fp32", max_context=512,
                        max_batched_tokens=16)
    ids = llm.tokenizer.encode_chat(ask(png(45, 29, 3)), system_prompt=None)
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=4))
    seq = list(ids)
    for _ in range(4):
        from devstral.prompt.images import PromptIds

        seq.append(int(llm.logits(PromptIds(seq, ids.images))[-1].argmax()))
    assert out.token_ids == seq[len(ids):]


def test_second_turn_with_the_same_screenshot_does_not_run_the_encoder(ckpt, monkeypatch):
    """bf16 engine with CUDA graphs: the next turn repeats the screenshot; the prefix cache serves its
    tokens and the vision encoder is not called again (counted at VisionModel.forward). Another image of
    the same size is encoded, and not served from the first one's cache."""
    llm = devstral.load(ckpt, device="cuda", max_context=512)
    calls = []
    forward = VisionModel.forward
    monkeypatch.setattr(VisionModel, "forward", lambda self, images: calls.append(len(images)) or forward(self, images))
    greedy = SamplingParams(temperature=0, max_tokens=3)
    shot = png(45, 29, 4)
    first = llm.chat(ask(shot), sampling=greedy)
    assert calls == [1]
    image = llm.tokenizer.encode_chat(ask(shot)).images[0]
    history = [*ask(shot), first.message, {"role": "user", "content": "And the title bar?"}]
    second = llm.chat(history, sampling=greedy)
    assert calls == [1]
    assert second.usage["prompt_tokens_details"]["cached_tokens"] >= image.end - llm.engine.ec.block_size
    other = llm.chat(ask(png(45, 29, 5)), sampling=greedy)
    assert calls == [1, 1]
    assert other.usage["prompt_tokens_details"]["cached_tokens"] <= image.start
