"""Images in fine-tuning data: image_url parts (data URLs, paths relative to the JSONL) through the one
prompt encoder, the vision tower + projector in the training forward. Oracles: the inference forward
(LLM.logits, itself checked against transformers' Mistral3ForConditionalGeneration in test_vision.py) on
the same conversation, which the training forward at step 0 (LoRA B = 0) must equal; mistral-common's
encoding of the prompt; the assistant mask, which must leave every image token out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import devstral
from devstral.errors import DevstralError

sys.path.insert(0, str(Path(__file__).parent))
from test_vision import _ckpt, data_url, mistral_common_encoding, png  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _ckpt(tmp_path_factory.mktemp("train_images"))


@pytest.fixture(scope="module")
def llm(ckpt):
    return devstral.load(ckpt, dtype="fp32", device="cpu", backend="torch", max_context=512)


def _conversation(url: str, answer: str = "A grid of colours.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Look:"},
                                         {"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": answer}]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _examples(ckpt, path: Path, **kw):
    from devstral.config import ModelConfig
    from devstral.prompt.tokenizer import load_tokenizer
    from devstral.train.data import load_examples
    from devstral.train.trainer import _enable_images

    tok = load_tokenizer(ckpt)
    assert _enable_images(ckpt, ModelConfig.from_dir(ckpt), tok) is not None
    return load_examples(path, tok, max_seq_len=kw.pop("max_seq_len", 512), **kw)[0]


def test_image_paths_and_data_urls_encode_as_mistral_common_and_are_never_learned(ckpt, tmp_path):
    from devstral.train.data import IGNORE

    (tmp_path / "shots").mkdir()
    (tmp_path / "shots" / "a.png").write_bytes(png(37, 29, 1))
    data = _write(tmp_path / "d.jsonl", [{"messages": _conversation("shots/a.png")},
                                         {"messages": _conversation(data_url(png(37, 29, 1)))}])
    by_path, by_url = _examples(ckpt, data)
    assert by_path.ids == by_url.ids and by_path.labels == by_url.labels
    assert [im.digest for im in by_path.images] == [im.digest for im in by_url.images]
    prompt = mistral_common_encoding(ckpt, _conversation(data_url(png(37, 29, 1)))[:1])
    assert by_path.ids[:len(prompt.tokens)] == prompt.tokens
    image = by_path.images[0]
    torch.testing.assert_close(torch.from_numpy(image.pixels), torch.from_numpy(prompt.images[0]), rtol=0, atol=0)
    assert all(label == IGNORE for label in by_path.labels[image.start:image.end])
    learned = [i for i, label in enumerate(by_path.labels) if label != IGNORE]
    assert learned == list(range(len(prompt.tokens), len(by_path.ids)))  # the answer and its EOS, nothing else


def test_training_forward_at_step_zero_is_the_inference_forward(ckpt, llm, tmp_path):
    """Two image conversations packed in one row (the second at an offset) and a padded batch: every
    position's logits equal LLM.logits on that conversation alone."""
    from devstral.config import ModelConfig
    from devstral.formats.vision_checkpoint import build_vision
    from devstral.model.lora import inject_lora
    from devstral.prompt.images import PromptIds
    from devstral.train.batching import BatchPlan, collate
    from devstral.train.images import TrainingImages
    from devstral.train.model_setup import load_base
    from devstral.train.trainer import _enable_images

    data = _write(tmp_path / "d.jsonl", [{"messages": _conversation(data_url(png(37, 29, 2)), "Stripes.")},
                                         {"messages": _conversation(data_url(png(20, 44, 3)), "Dots, many.")}])
    examples = _examples(ckpt, data)
    cfg = ModelConfig.from_dir(ckpt)
    model = load_base(ckpt, cfg, device=torch.device("cpu"), dtype=torch.float32)
    inject_lora(model, ["q_proj", "v_proj", "down_proj"], 8, 16, dtype=torch.float32, seed=0)
    from devstral.prompt.tokenizer import load_tokenizer

    vc = _enable_images(ckpt, cfg, load_tokenizer(ckpt))
    images = TrainingImages(build_vision(ckpt, cfg, vc, dtype=torch.float32, device=torch.device("cpu")))
    reference = [llm.logits(PromptIds(ex.ids, ex.images)) for ex in examples]
    for plan, rows in ((BatchPlan(packing=True, max_seq_len=512), [[0, 1]]),
                       (BatchPlan(batch_size=2), [[1], [0]])):
        batch = collate(examples, rows, plan)
        with torch.no_grad():
            h = model.hidden_states(batch.tokens, batch.positions, documents=batch.documents,
                                    inject=images.inject(batch))
            logits = model.lm_head(h)
        for b, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(examples[i].ids)
                torch.testing.assert_close(logits[b, at:at + n], reference[i], rtol=1e-4, atol=1e-4)
                at += n


def test_finetune_with_images_learns_and_the_image_reaches_the_loss(ckpt, tmp_path):
    """`devstral finetune` on image conversations: the loss falls over a few steps, and it depends on
    the image (the same answers with other pictures give another step-0 loss)."""
    from devstral.train.config import TrainConfig
    from devstral.train.trainer import finetune

    (tmp_path / "a.png").write_bytes(png(37, 29, 4))
    (tmp_path / "b.png").write_bytes(png(37, 29, 5))
    runs = []
    for name in ("a.png", "b.png"):
        data = _write(tmp_path / f"{name}.jsonl", [{"messages": _conversation(name, "Stripes and dots.")}])
        result = finetune(TrainConfig(model=str(ckpt), data=str(data), output=str(tmp_path / f"out-{name}"),
                                      max_steps=4, lr=5e-3, device="cpu", progress=False, lora_r=4))
        runs.append(result.losses)
    assert runs[0][-1] < runs[0][0]
    assert abs(runs[0][0] - runs[1][0]) > 1e-6


@pytest.mark.parametrize("content, message", [
    ("missing.png", r"d\.jsonl:2: message 0: content part 1: .*missing\.png: No such file"),
    ("broken", r"d\.jsonl:2: message 0: content part 1: .*broken\.png: corrupt or truncated image"),
    ("https://example.com/x.png", r"d\.jsonl:2: message 0: content part 1: remote image URLs are not fetched in "
                                  r"training data"),
])
def test_bad_images_name_the_file_and_line(ckpt, tmp_path, content, message):
    (tmp_path / "broken.png").write_bytes(png(64, 64, 6)[:200])
    url = "broken.png" if content == "broken" else content
    data = _write(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "hello"}, {"messages": _conversation(url)}])
    with pytest.raises(DevstralError, match=message):
        _examples(ckpt, data)


def test_a_text_only_model_refuses_images_in_data(tiny_hf, tmp_path):
    from devstral.prompt.tokenizer import load_tokenizer
    from devstral.train.data import load_examples

    data = _write(tmp_path / "d.jsonl", [{"messages": _conversation(data_url(png(8, 8, 1)))}])
    with pytest.raises(DevstralError, match=r"d\.jsonl:1: message 0: content part 1: cannot take an image"):
        load_examples(data, load_tokenizer(tiny_hf), max_seq_len=128)


def test_truncation_never_cuts_an_image(ckpt, tmp_path):
    """--max-seq-len inside an image: the example ends before the image, which is dropped; the earlier
    answer is still learned."""
    from devstral.train.data import IGNORE

    first = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    data = _write(tmp_path / "d.jsonl", [{"messages": [*first, *_conversation(data_url(png(37, 29, 7)))]}])
    whole = _examples(ckpt, data)[0]
    image = whole.images[0]
    cut = _examples(ckpt, data, max_seq_len=image.start + 3)[0]
    assert cut.images == [] and cut.ids == whole.ids[:image.start]
    assert any(label != IGNORE for label in cut.labels)


def test_train_projector_saves_it_as_peft_modules_to_save(ckpt, tmp_path):
    """--train-projector: the projector learns (the tower does not); the adapter holds it as PEFT saves a
    modules_to_save module, which PEFT's own loader puts into transformers' Mistral3 projector; `load
    --adapter` and the mmproj export use the trained weights."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from safetensors.torch import load_file
    from transformers import Mistral3ForConditionalGeneration

    from devstral.formats.gguf_mmproj import export_mmproj, load_mmproj
    from devstral.formats.peft import read_projector
    from devstral.train.config import TrainConfig
    from devstral.train.trainer import finetune

    (tmp_path / "a.png").write_bytes(png(37, 29, 8))
    data = _write(tmp_path / "d.jsonl", [{"messages": _conversation("a.png", "Stripes and dots.")}])
    out = tmp_path / "out"
    finetune(TrainConfig(model=str(ckpt), data=str(data), output=str(out), max_steps=3, lr=1e-2, device="cpu",
                         progress=False, lora_r=4, target="q,v", train_projector=True))
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["multi_modal_projector"]
    trained = read_projector(out)
    base = devstral.load(ckpt, dtype="fp32", device="cpu", backend="torch", max_context=256)
    before = dict(base.vision.multi_modal_projector.named_parameters())
    assert set(trained) == set(before)
    assert any(not torch.equal(trained[k], before[k]) for k in trained)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in saved

    hf = Mistral3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                               modules_to_save=["multi_modal_projector"]))
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(out)))
    assert not [k for k in result.unexpected_keys if "multi_modal_projector" in k]
    theirs = peft_model.base_model.model.model.multi_modal_projector.modules_to_save["default"]
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0)

    tuned = devstral.load(ckpt, adapter=out, dtype="fp32", device="cpu", backend="torch", max_context=256)
    for name, p in tuned.vision.multi_modal_projector.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0)
    mmproj = export_mmproj(ckpt, tmp_path / "mmproj.gguf", ftype="F32", projector=trained)
    back = load_mmproj(mmproj, text_dim=tuned.config.dim, image_token_id=10, dtype=torch.float32,
                       device=torch.device("cpu"))
    for name, p in back.multi_modal_projector.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0)


def test_train_projector_without_images_is_refused(ckpt, tmp_path):
    from devstral.train.config import TrainConfig
    from devstral.train.trainer import finetune

    data = _write(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "hello"}])
    with pytest.raises(DevstralError, match="--train-projector: no example has an image"):
        finetune(TrainConfig(model=str(ckpt), data=str(data), output=str(tmp_path / "o"), max_steps=1,
                             device="cpu", progress=False, train_projector=True))
