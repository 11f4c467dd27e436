"""Exports after training: merged bf16 safetensors (HF layout) and GGUF through the GGUF exporter.

The merge re-reads the ORIGINAL 16-bit weights from the base folder and adds B @ A * scale in fp32,
whatever the training used (QLoRA trains against NF4, but its update belongs to the 16-bit weights).

A multimodal base (mistral3: Devstral Small 2) stays multimodal: the folder gets the base's config.json,
the decoder under the base's names, and the base's vision tower and projector (the trained projector
in its place with --train-projector). Training never changes the tower.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from devstral.tmpfiles import temp_path

SHARD_BYTES = 4 << 30
# Files that describe the tokenizer, the chat template and generation defaults; copied as they are.
_TOKENIZER_FILES = ("tekken*.json", "tokenizer.model*", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
                    "SYSTEM_PROMPT.txt", "preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class VisionParts:
    """What a model folder written from a multimodal base keeps of it: its config.json, its vision
    tensors (name as the base writes it, file), and the prefixes its decoder and head go under
    (transformers 5: `model.language_model.` / `lm_head.`; 4.x: `language_model.model.` /
    `language_model.lm_head.`)."""

    config: dict
    vision: list[tuple[str, Path]]
    text_prefix: str
    head_prefix: str


def vision_parts(base: Path) -> VisionParts | None:
    """The base's VisionParts when it has a vision_config and vision tensors (HF layout), else None."""
    from devstral.config import read_json
    from devstral.formats.safetensors import read_header, vision_param_name, weight_files

    if not (base / "config.json").is_file():
        return None
    config = read_json(base / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("vision_config"), dict):
        return None
    layout, files = weight_files(base)
    if layout != "hf":
        return None
    vision, v4 = [], False
    for f in files:
        for entry in read_header(f):
            if vision_param_name(entry.name, layout):
                vision.append((entry.name, f))
            v4 = v4 or entry.name.startswith("language_model.")
    if not vision:
        return None
    return VisionParts(config, vision, *(("language_model.model.", "language_model.lm_head.") if v4
                                         else ("model.language_model.", "lm_head.")))


def with_vision(parts: VisionParts, decoder: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                projector: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The decoder's (our name, tensor) under the base's names, then the base's vision tensors in
    `dtype`; `projector` ({name inside multi_modal_projector: tensor}, trained) replaces the base's."""
    from safetensors import safe_open

    from devstral.formats.safetensors import vision_param_name

    for name, tensor in decoder:
        if name.startswith("model."):
            name = parts.text_prefix + name[len("model."):]
        elif name.startswith("lm_head."):
            name = parts.head_prefix + name[len("lm_head."):]
        yield name, tensor
    projector = projector or {}
    by_file: dict[Path, list[str]] = {}
    for name, f in parts.vision:
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for name in names:
                inner = vision_param_name(name, "hf").removeprefix("multi_modal_projector.")
                tensor = projector[inner] if inner in projector else h.get_tensor(name)
                yield name, tensor.to(dtype)


def hf_config(base: Path, parts: VisionParts | None, dtype: torch.dtype) -> dict:
    """config.json of a written folder: the decoder's HF config, or the multimodal base's own."""
    from devstral.config import ModelConfig

    hf = dict(parts.config) if parts is not None else ModelConfig.from_dir(base).to_hf()
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
    hf["torch_dtype"] = name
    if isinstance(hf.get("text_config"), dict):
        hf["text_config"] = {**hf["text_config"], "torch_dtype": name}
    return hf


def write_merged(base: Path, adapter: Path, dest: Path, *, dtype: torch.dtype = torch.bfloat16,
                 projector: dict[str, torch.Tensor] | None = None) -> Path:
    """Write base + adapter as a HF-layout folder (config.json, sharded safetensors, tokenizer files);
    a multimodal base's vision tower and projector (or `projector`, trained) come along."""
    from safetensors.torch import save_file

    from devstral.formats.peft import merged_state

    parts = vision_parts(base)
    tensors = merged_state(base, adapter, dtype=dtype)
    if parts is not None:
        tensors = with_vision(parts, tensors, dtype, projector)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)  # ours by name: a killed run's folder is swept when finetune starts again
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][name] = tensor.contiguous()
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map |= {n: fname for n in shard}
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config(base, parts, dtype), indent=2) + "\n",
                                         encoding="utf-8")
        for pattern in _TOKENIZER_FILES:
            for f in base.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def export_gguf(model_dir: Path, out: Path, quant_type: str) -> Path:
    """Hand a written folder (merged/ or a --full output) to the GGUF exporter (formats/gguf.py); it
    checks the type name. When the folder has a vision tower (a multimodal base's, carried along by
    write_merged / save_model_folder with the projector as trained), its mmproj-OUT (F16) is written
    beside, with the folder's [IMG_BREAK] embedding: what `quantize` does."""
    import sys

    from devstral.formats.gguf import export_gguf as write_gguf
    from devstral.formats.gguf_mmproj import export_mmproj

    path = Path(write_gguf(model_dir, out, quant_type))
    projector = export_mmproj(Path(model_dir), path.with_name(f"mmproj-{path.name}"))
    if projector is not None:
        print(f"gguf vision projector: {projector}", file=sys.stderr)
    return path
