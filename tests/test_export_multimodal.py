"""A model folder written from a multimodal base (mistral3, Devstral Small 2's layout) stays multimodal:
the merged LoRA folder and the full fine-tune's folder load in transformers' Mistral3ForConditionalGeneration
with every tensor, and give, with images, the logits of the model they were written from (the base with
its adapter, or the trained model); devstral loads them with their vision tower too.
"""

from __future__ import annotations

import pytest
import torch

import devstral
from devstral.config import ModelConfig
from devstral.formats.peft import AdapterConfig, save_adapter
from devstral.loader import build_model
from devstral.model.lora import inject_lora, lora_modules, parse_targets
from devstral.testing import make_tiny_checkpoint

transformers = pytest.importorskip("transformers")

from test_vision import ask, hf_logits, mistral_common_encoding, png  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m3") / "m3", arch="ministral3", wrap_mistral3=True, seed=5)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A random (non-zero) LoRA on q, v and down."""
    cfg = ModelConfig.from_dir(base)
    net = build_model(base, cfg, dtype=torch.float32, device=torch.device("cpu"))
    targets = parse_targets("q,v,down")
    inject_lora(net, targets, r=4, alpha=8, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in lora_modules(net).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter(net, folder, AdapterConfig(r=4, lora_alpha=8, target_modules=targets,
                                            base_model_name_or_path=str(base)))
    return folder


def _transformers(folder):
    model, info = transformers.Mistral3ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _image_request(base):
    messages = ask(png(37, 29, 7), text="What is this?")
    return messages, mistral_common_encoding(base, messages)


def test_merged_folder_keeps_the_vision_tower(base, adapter, tmp_path):
    from devstral.train.export import write_merged

    merged = write_merged(base, adapter, tmp_path / "merged", dtype=torch.float32)
    messages, encoded = _image_request(base)
    theirs = hf_logits(_transformers(merged), encoded)
    ours = devstral.load(base, adapter=adapter, dtype="fp32", device="cpu", backend="torch", max_context=256)
    ids = ours.tokenizer.encode_chat(messages, system_prompt=None)
    assert (ours.logits(ids) - theirs).abs().max().item() <= 1e-4
    plain = hf_logits(_transformers(base), encoded)
    assert (plain - theirs).abs().max().item() > 1e-2  # the adapter is in the merged weights
    again = devstral.load(merged, dtype="fp32", device="cpu", backend="torch", max_context=256)
    assert again.vision is not None
    assert (again.logits(ids) - theirs).abs().max().item() <= 1e-4
    # finetune --merge --gguf: the mmproj beside the GGUF comes from merged/, which carries the base's tower
    import gguf

    from devstral.train.export import export_gguf

    export_gguf(merged, tmp_path / "m.gguf", "Q8_0")
    mm = {t.name: t for t in gguf.GGUFReader(tmp_path / "mmproj-m.gguf").tensors}
    want = _transformers(base).model.multi_modal_projector.linear_2.weight.detach()
    got = torch.from_numpy(mm["mm.2.weight"].data.copy()).float().reshape(want.shape)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_full_model_folder_keeps_the_vision_tower(base, tmp_path):
    """save_model_folder of a decoder whose weights changed: transformers sees the changed decoder and
    the base's tower and projector; a trained projector replaces the base's."""
    from safetensors import safe_open

    from devstral.train.full import save_model_folder

    cfg = ModelConfig.from_dir(base)
    net = build_model(base, cfg, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        net.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        key = next(k for k in f.keys() if "multi_modal_projector" in k and k.endswith("linear_2.weight"))  # noqa: SIM118
        trained = {"linear_2.weight": f.get_tensor(key) * 0.5}
    out = save_model_folder(net, base, tmp_path / "full", dtype=torch.float32, projector=trained)
    messages, encoded = _image_request(base)
    hf = _transformers(out)
    torch.testing.assert_close(hf.model.multi_modal_projector.linear_2.weight, trained["linear_2.weight"])
    theirs = hf_logits(hf, encoded)
    again = devstral.load(out, dtype="fp32", device="cpu", backend="torch", max_context=256)
    assert again.vision is not None
    ids = again.tokenizer.encode_chat(messages, system_prompt=None)
    assert (again.logits(ids) - theirs).abs().max().item() <= 1e-4
    assert (hf_logits(_transformers(base), encoded) - theirs).abs().max().item() > 1e-3
    # finetune --full --gguf: the mmproj beside the GGUF comes from this folder, trained projector included
    import gguf

    from devstral.train.export import export_gguf

    export_gguf(out, tmp_path / "m.gguf", "Q8_0")
    mm = {t.name: t for t in gguf.GGUFReader(tmp_path / "mmproj-m.gguf").tensors}
    got = torch.from_numpy(mm["mm.2.weight"].data.copy()).float().reshape(trained["linear_2.weight"].shape)
    torch.testing.assert_close(got, trained["linear_2.weight"], rtol=1e-3, atol=1e-3)


def test_a_text_base_still_writes_a_text_folder(tmp_path):
    from devstral.train.export import vision_parts

    text = make_tiny_checkpoint(tmp_path / "t")
    assert vision_parts(text) is None
