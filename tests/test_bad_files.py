"""Every bad file a user can hand devstral: exit code 2, one line on stderr naming the file and the key or
tensor, no traceback. A table in the spirit of a fuzzer: each row breaks one thing in an otherwise valid
model folder, GGUF, adapter, dataset or recipe, and runs the command that reads it."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from devstral.cli import main
from devstral.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_files")
    from devstral.formats.gguf_write import export_gguf

    hf = make_tiny_checkpoint(root / "hf")
    out = {"hf": hf, "mistral": make_tiny_checkpoint(root / "mistral", layout="mistral"),
           "sharded": make_tiny_checkpoint(root / "sharded", shards=2)}
    for qtype in ("F32", "Q8_0"):
        out[qtype] = export_gguf(hf, root / f"m-{qtype}.gguf", qtype)
    return out


# ------------------------------------------------------------------------------------------ mutations

def _json(folder: Path, name: str, edit: Callable[[dict], object]) -> None:
    path = folder / name
    data = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(edit(data)))


def setv(name: str, key: str, value: object) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        _json(folder, name, lambda d: {**d, key: value})
    return mutate


def write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return mutate


def poison(tensor: str, value: float, file: str = "model.safetensors") -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        sd = load_file(str(folder / file))
        sd[tensor] = sd[tensor].clone()
        sd[tensor].view(-1)[7] = value
        save_file(sd, str(folder / file), metadata={"format": "pt"})
    return mutate


def safetensors_header(header: bytes) -> Callable[[Path], None]:
    return write("model.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 64)


def adapter(edit_config: Callable[[dict], object] | None = None, value: float | None = None):
    """A valid one-module LoRA adapter in PEFT's format, then one thing broken."""
    def mutate(folder: Path) -> None:
        a = folder / "adapter"
        a.mkdir()
        cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}
        (a / "adapter_config.json").write_text(json.dumps(edit_config(cfg) if edit_config else cfg))
        key = "base_model.model.model.layers.0.self_attn.q_proj"
        lora_a, lora_b = torch.zeros(2, 64), torch.zeros(64, 2)
        if value is not None:
            lora_b[3, 1] = value
        save_file({f"{key}.lora_A.weight": lora_a, f"{key}.lora_B.weight": lora_b},
                  str(a / "adapter_model.safetensors"))
    return mutate


def patch_gguf(field: str | None = None, value: int | None = None, tensor: str | None = None,
               scale_nan: bool = False):
    """Edit a GGUF in place through gguf-py's own reader: one metadata value or one tensor's bytes."""
    def mutate(path: Path) -> None:
        import numpy as np
        from gguf import GGUFReader

        r = GGUFReader(path, "r+")
        if field is not None:
            f = r.fields[field]
            f.parts[f.data[0]][0] = value
        if tensor is not None:
            t = next(t for t in r.tensors if t.name == tensor)
            if scale_nan:  # Q8_0: the first two bytes of a block are its fp16 scale
                t.data.reshape(-1, 34)[5, :2] = np.frombuffer(np.float16("nan").tobytes(), np.uint8)
            else:
                t.data.reshape(-1)[3] = np.nan
        r.data.flush()
    return mutate


DEEP = "[" * 200_000
NOT_UTF8 = b'{"model_type": "mistral", "name": "caf\xe9"}'

# (id, which base, mutation, command (M = the model, D = data), needles in the one error line)
RUN = ["run", "hi", "-n", "1", "--model", "M"]
CASES = [
    # config.json
    ("config-is-a-list", "hf", write("config.json", "[1, 2]"), RUN, ["config.json", "JSON object"]),
    ("config-not-utf8", "hf", write("config.json", NOT_UTF8), RUN, ["config.json", "UTF-8"]),
    ("config-utf16", "hf", write("config.json", '{"a": 1}'.encode("utf-16")), RUN, ["config.json", "UTF-8"]),
    ("config-empty", "hf", write("config.json", ""), RUN, ["config.json", "line 1"]),
    ("config-nested-deep", "hf", write("config.json", DEEP), RUN, ["config.json"]),
    ("rms_norm_eps-string", "hf", setv("config.json", "rms_norm_eps", "x"), RUN, ["config.json", "rms_norm_eps"]),
    ("rms_norm_eps-nan", "hf", setv("config.json", "rms_norm_eps", float("nan")), RUN, ["rms_norm_eps"]),
    ("rms_norm_eps-negative", "hf", setv("config.json", "rms_norm_eps", -1e-5), RUN, ["rms_norm_eps"]),
    ("layers-1e9", "hf", setv("config.json", "num_hidden_layers", 1e9), RUN, ["config.json", "num_hidden_layers"]),
    ("layers-int-huge", "hf", setv("config.json", "num_hidden_layers", 10**9), RUN, ["num_hidden_layers"]),
    ("layers-more-than-weights", "hf", setv("config.json", "num_hidden_layers", 3), RUN,
     ["num_hidden_layers", "2 layers"]),
    ("layers-string", "hf", setv("config.json", "num_hidden_layers", "2"), RUN, ["num_hidden_layers", "integer"]),
    ("layers-bool", "hf", setv("config.json", "num_hidden_layers", True), RUN, ["num_hidden_layers"]),
    ("hidden_size-huge", "hf", setv("config.json", "hidden_size", 10**12), RUN, ["hidden_size", "embed_tokens"]),
    ("intermediate_size-wrong", "hf", setv("config.json", "intermediate_size", 10**7), RUN,
     ["intermediate_size", "gate_proj"]),
    ("vocab_size-negative", "hf", setv("config.json", "vocab_size", -1), RUN, ["vocab_size"]),
    ("vocab_size-wrong", "hf", setv("config.json", "vocab_size", 5000), RUN, ["vocab_size", "embed_tokens"]),
    ("heads-zero", "hf", lambda f: _json(f, "config.json", lambda d: {**d, "num_attention_heads": 0, "head_dim": None}),
     RUN, ["num_attention_heads"]),
    ("kv-heads-indivisible", "hf", setv("config.json", "num_key_value_heads", 3), RUN, ["num_attention_heads"]),
    ("head_dim-odd", "hf", setv("config.json", "head_dim", 15), RUN, ["head_dim"]),
    ("max_position-huge", "hf", setv("config.json", "max_position_embeddings", 1e30), RUN,
     ["max_position_embeddings"]),
    ("rope_theta-string", "hf", lambda f: _json(f, "config.json", lambda d: {
        **d, "rope_theta": "big", "rope_parameters": None}), RUN, ["rope_theta"]),
    ("rope_parameters-string", "hf", setv("config.json", "rope_parameters", "yarn"), RUN, ["rope_parameters"]),
    ("yarn-factor-string", "hf", setv("config.json", "rope_parameters", {
        "rope_type": "yarn", "factor": "x", "original_max_position_embeddings": 64}), RUN, ["rope_parameters", "factor"]),
    ("tie-string", "hf", setv("config.json", "tie_word_embeddings", "yes"), RUN, ["tie_word_embeddings"]),
    ("eos-out-of-vocab", "hf", setv("config.json", "eos_token_id", 10**6), RUN, ["eos_token_id"]),
    ("sliding_window-string", "hf", setv("config.json", "sliding_window", "x"), RUN, ["sliding_window"]),
    ("model_type-number", "hf", setv("config.json", "model_type", 5), RUN, ["config.json", "model_type"]),
    ("text_config-list", "hf", lambda f: _json(f, "config.json", lambda d: {"model_type": "mistral3",
                                                                            "text_config": []}), RUN, ["text_config"]),
    # params.json (Mistral's layout)
    ("params-is-a-list", "mistral", write("params.json", "[]"), RUN, ["params.json", "JSON object"]),
    ("params-norm_eps-string", "mistral", setv("params.json", "norm_eps", "x"), RUN, ["params.json", "norm_eps"]),
    ("params-n_layers-wrong", "mistral", setv("params.json", "n_layers", 7), RUN, ["params.json", "n_layers"]),
    # generation_config.json
    ("gen-temperature-string", "hf", setv("generation_config.json", "temperature", "hot"), RUN,
     ["generation_config.json", "temperature"]),
    ("gen-top_k-float", "hf", setv("generation_config.json", "top_k", 1.5), RUN, ["generation_config.json", "top_k"]),
    ("gen-top_p-range", "hf", setv("generation_config.json", "top_p", 2), RUN, ["generation_config.json", "top_p"]),
    ("gen-repetition_penalty-list", "hf", setv("generation_config.json", "repetition_penalty", [1]), RUN,
     ["repetition_penalty"]),
    ("gen-do_sample-string", "hf", setv("generation_config.json", "do_sample", "no"), RUN, ["do_sample"]),
    ("gen-is-a-list", "hf", write("generation_config.json", "[]"), RUN, ["generation_config.json", "JSON object"]),
    ("gen-not-utf8", "hf", write("generation_config.json", NOT_UTF8), RUN, ["generation_config.json", "UTF-8"]),
    # weights
    ("weight-nan", "hf", poison("model.layers.1.mlp.up_proj.weight", float("nan")), RUN,
     ["model.safetensors", "model.layers.1.mlp.up_proj.weight", "NaN"]),
    ("weight-inf", "hf", poison("model.embed_tokens.weight", float("-inf")), RUN,
     ["model.embed_tokens.weight", "infinite"]),
    ("weight-nan-mistral-layout", "mistral", poison("layers.0.attention.wq.weight", float("nan"),
                                                    "consolidated.safetensors"), RUN, ["layers.0.attention.wq.weight"]),
    ("header-negative-shape", "hf", safetensors_header(
        b'{"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}'), RUN, ["model.safetensors", "corrupt"]),
    ("header-float-shape", "hf", safetensors_header(
        b'{"a":{"dtype":"F32","shape":[4.0],"data_offsets":[0,16]}}'), RUN, ["model.safetensors", "corrupt"]),
    ("header-nested-deep", "hf", safetensors_header(DEEP.encode()), RUN, ["model.safetensors", "corrupt"]),
    ("header-not-utf8", "hf", safetensors_header(b'{"\xff": 1}'), RUN, ["model.safetensors", "corrupt"]),
    ("index-weight_map-list", "sharded", setv("model.safetensors.index.json", "weight_map", []), RUN,
     ["model.safetensors.index.json", "weight_map"]),
    ("index-not-utf8", "sharded", write("model.safetensors.index.json", NOT_UTF8), RUN,
     ["model.safetensors.index.json", "UTF-8"]),
    ("index-path-outside", "sharded", setv("model.safetensors.index.json", "weight_map",
                                           {"x": "../model-00001-of-00002.safetensors"}), RUN,
     ["model.safetensors.index.json", "../"]),
    # tokenizer and system prompt
    ("tekken-not-utf8", "hf", write("tekken.json", NOT_UTF8), RUN, ["tekken.json"]),
    ("tekken-is-a-list", "hf", write("tekken.json", "[]"), RUN, ["tekken.json"]),
    ("system-prompt-not-utf8", "hf", write("SYSTEM_PROMPT.txt", b"You are \xff"), RUN,
     ["SYSTEM_PROMPT.txt", "UTF-8"]),
    # adapters
    ("adapter-config-list", "hf", adapter(lambda c: [c]), [*RUN, "--adapter", "M/adapter"], ["adapter_config.json"]),
    ("adapter-r-string", "hf", adapter(lambda c: {**c, "r": "x"}), [*RUN, "--adapter", "M/adapter"],
     ["adapter_config.json", "r must"]),
    ("adapter-dropout-string", "hf", adapter(lambda c: {**c, "lora_dropout": "x"}), [*RUN, "--adapter", "M/adapter"],
     ["adapter_config.json", "lora_dropout"]),
    ("adapter-nan", "hf", adapter(value=float("nan")), [*RUN, "--adapter", "M/adapter"],
     ["adapter_model.safetensors", "lora_B", "NaN"]),
    # quantize reads the same files
    ("quantize-weight-nan", "hf", poison("model.layers.0.mlp.down_proj.weight", float("nan")),
     ["quantize", "M", "M/out.gguf", "--type", "Q8_0", "--no-progress"], ["model.layers.0.mlp.down_proj.weight", "NaN"]),
    ("quantize-layers-1e9", "hf", setv("config.json", "num_hidden_layers", 10**9),
     ["quantize", "M", "M/out.gguf", "--type", "Q8_0", "--no-progress"], ["num_hidden_layers"]),
    # finetune data and recipes
    ("jsonl-not-utf8", "hf", write("train.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "\xff"}\n'),
     ["finetune", "--model", "M", "--data", "M/train.jsonl", "--output", "M/out", "--max-steps", "1"],
     ["train.jsonl:3", "UTF-8"]),
    ("jsonl-nested-deep", "hf", write("train.jsonl", '{"text": "a"}\n' + DEEP + "\n"),
     ["finetune", "--model", "M", "--data", "M/train.jsonl", "--output", "M/out", "--max-steps", "1"],
     ["train.jsonl:2"]),
    ("recipe-binary", "hf", write("recipe.yaml", bytes(range(256)) * 4),
     ["finetune", "--config", "M/recipe.yaml"], ["--config", "recipe.yaml", "UTF-8"]),
    ("recipe-control-chars", "hf", write("recipe.yaml", "lr: 1\x00\x01\n"),
     ["finetune", "--config", "M/recipe.yaml"], ["recipe.yaml", "YAML"]),
    ("recipe-list-for-number", "hf", write("recipe.yaml", "lr: [1, 2]\n"),
     ["finetune", "--config", "M/recipe.yaml"], ["recipe.yaml", "lr"]),
    ("recipe-mapping-for-path", "hf", write("recipe.yaml", "model: {a: 1}\n"),
     ["finetune", "--config", "M/recipe.yaml"], ["recipe.yaml", "model"]),
    # template requests
    ("request-not-utf8", "hf", write("req.json", b'{"messages": [{"role": "user", "content": "\xff"}]}'),
     ["template", "--model", "M", "--request", "M/req.json"], ["req.json", "UTF-8"]),
    # GGUF
    ("gguf-nan-f32", "F32", patch_gguf(tensor="blk.0.attn_norm.weight"), RUN,
     [".gguf", "blk.0.attn_norm.weight", "NaN"]),
    ("gguf-nan-q8_0-scale", "Q8_0", patch_gguf(tensor="blk.1.ffn_up.weight", scale_nan=True), RUN,
     [".gguf", "blk.1.ffn_up.weight", "scale"]),
    ("gguf-block_count-wrong", "F32", patch_gguf(field="llama.block_count", value=3), RUN,
     ["llama.block_count", "2 layers"]),
    ("gguf-block_count-huge", "Q8_0", patch_gguf(field="llama.block_count", value=10**8), RUN,
     ["llama.block_count"]),
    ("gguf-rms-eps-negative", "F32", patch_gguf(field="llama.attention.layer_norm_rms_epsilon", value=-1), RUN,
     ["layer_norm_rms_epsilon"]),
]


def test_the_table_is_big():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,kind,mutate,command,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(base, tmp_path, capsys, case_id, kind, mutate, command, needles):
    src = base[kind]
    target = tmp_path / src.name
    if src.is_dir():
        shutil.copytree(src, target)
    else:
        shutil.copy(src, target)
    mutate(target)
    args = [a.replace("M", str(target), 1) if a == "M" or a.startswith("M/") else a for a in command]
    code = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
