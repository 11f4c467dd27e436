"""bitsandbytes-4bit checkpoints, made by transformers + bitsandbytes' CPU backend, loaded into our NF4 layers.

Oracles: bitsandbytes' own dequantization of each weight, and transformers' forward of the quantized model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from devstral.cli import main
from devstral.config import ModelConfig
from devstral.errors import DevstralError
from devstral.formats.bnb4bit import iter_model_weights
from devstral.loader import build_model
from devstral.model.nf4 import NF4Linear, dequantize_nf4
from devstral.train.model_setup import load_base

bnb_functional = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")


def _quantize(src: Path, dest: Path, **bnb: object):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **bnb),
        device_map="cpu", dtype=torch.float32)
    model.save_pretrained(dest)
    for f in src.iterdir():
        if f.name.startswith("tekken"):
            shutil.copy(f, dest / f.name)
    return model


def _bnb(tiny_hf, tmp_path_factory, double_quant: bool):
    dest = tmp_path_factory.mktemp("bnb")
    hf = _quantize(tiny_hf, dest, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                   bnb_4bit_use_double_quant=double_quant)
    return dest, hf, tiny_hf


@pytest.fixture(scope="module")
def bnb_model(tiny_hf, tmp_path_factory):
    """The unsloth-bnb-4bit kind: NF4 with double-quantized absmax."""
    return _bnb(tiny_hf, tmp_path_factory, True)


@pytest.fixture(scope="module")
def bnb_plain(tiny_hf, tmp_path_factory):
    return _bnb(tiny_hf, tmp_path_factory, False)


BOTH = pytest.mark.parametrize("which", ["bnb_model", "bnb_plain"])


@BOTH
def test_weights_equal_bitsandbytes_dequantization(which, request):
    folder, hf, _ = request.getfixturevalue(which)
    cfg = ModelConfig.from_dir(folder)
    layers = {name: t for name, t in iter_model_weights(folder, cfg, dtype=torch.float32, device="cpu")
              if isinstance(t, NF4Linear)}
    assert len(layers) == 7 * cfg.n_layers  # every linear of every block arrived as NF4
    for name, layer in layers.items():
        theirs = hf.get_submodule(name.removesuffix(".weight")).weight
        want = bnb_functional.dequantize_4bit(theirs.data, theirs.quant_state)
        assert layer.double_quant == (theirs.quant_state.nested is True)
        assert torch.equal(dequantize_nf4(layer.nf4()), want), name


@BOTH
def test_logits_equal_the_dequantized_reference(which, request):
    """transformers' fp32 model with every linear replaced by bitsandbytes' dequantization of its 4-bit
    weight is the reference (transformers' own 4-bit CPU forward rounds through bf16)."""
    from transformers import AutoModelForCausalLM

    folder, hf, original = request.getfixturevalue(which)
    ref = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    with torch.no_grad():
        for name, module in hf.named_modules():
            if hasattr(module, "quant_state") or type(module).__name__ == "Linear4bit":
                w = module.weight
                ref.get_submodule(name).weight.copy_(bnb_functional.dequantize_4bit(w.data, w.quant_state))
    cfg = ModelConfig.from_dir(folder)
    ours = build_model(folder, cfg, dtype=torch.float32, device=torch.device("cpu"))
    tokens = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(tokens).logits
        got = ours(tokens)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_qlora_base_from_bnb_checkpoint_trains(bnb_model, tmp_path):
    folder = bnb_model[0]
    cfg = ModelConfig.from_dir(folder)
    base = load_base(folder, cfg, device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(base.model.layers[0].mlp.down_proj, NF4Linear)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello there"}]}) + "\n")
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out),
                 "--max-steps", "2", "--no-progress"]) == 0
    assert (out / "adapter_model.safetensors").is_file()


def _with_config(folder: Path, dest: Path, **changes) -> Path:
    shutil.copytree(folder, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("changes, words", [
    ({"load_in_8bit": True, "load_in_4bit": False}, "LLM.int8"),
    ({"bnb_4bit_quant_type": "fp4"}, "FP4"),
])
def test_unsupported_bnb_kinds_refused_in_one_line(bnb_model, tmp_path, capsys, changes, words):
    folder = _with_config(bnb_model[0], tmp_path / "m", **changes)
    assert main(["run", "--model", str(folder), "--max-tokens", "1", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "config.json" in err[0]


def test_fp4_tensor_refused_even_when_config_says_nf4(bnb_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(bnb_model[0], folder)
    sd = load_file(folder / "model.safetensors")
    key = next(k for k in sd if k.endswith("quant_state.bitsandbytes__nf4"))
    sd[key.replace("__nf4", "__fp4")] = sd.pop(key)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DevstralError, match="FP4"):
        build_model(folder, ModelConfig.from_dir(folder), dtype=torch.float32, device=torch.device("cpu"))


def test_missing_part_named(bnb_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(bnb_model[0], folder)
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight.quant_map"]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DevstralError, match=r"up_proj\.weight\.quant_map is missing"):
        build_model(folder, ModelConfig.from_dir(folder), dtype=torch.float32, device=torch.device("cpu"))


def test_merge_into_a_4bit_base_refused(bnb_model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    assert main(["finetune", "--model", str(bnb_model[0]), "--data", str(data), "--output", str(tmp_path / "o"),
                 "--max-steps", "1", "--no-progress", "--merge"]) == 2
    assert "--merge needs the 16-bit base model" in capsys.readouterr().err
