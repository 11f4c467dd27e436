"""Exports after training: merged bf16 safetensors (HF layout) and GGUF through the GGUF exporter.

The merge re-reads the ORIGINAL 16-bit weights from the base folder and adds B @ A * scale in fp32,
whatever the training used (QLoRA trains against NF4, but its update belongs to the 16-bit weights).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from devstral.tmpfiles import temp_path

SHARD_BYTES = 4 << 30
# Files that describe the tokenizer, the chat template and generation defaults; copied as they are.
_TOKENIZER_FILES = ("tekken*.json", "tokenizer.model*", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
                    "SYSTEM_PROMPT.txt")


def write_merged(base: Path, adapter: Path, dest: Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write base + adapter as a HF-layout folder (config.json, sharded safetensors, tokenizer files)."""
    from safetensors.torch import save_file

    from devstral.config import ModelConfig
    from devstral.formats.peft import merged_state

    cfg = ModelConfig.from_dir(base)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)  # ours by name: a killed run's folder is swept when finetune starts again
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in merged_state(base, adapter, dtype=dtype):
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
        hf = cfg.to_hf()
        hf["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
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


def export_gguf(model_dir: Path, out: Path, quant_type: str, *, base: Path | None = None,
                projector_from: Path | None = None) -> Path:
    """Hand the merged folder to the GGUF exporter (formats/gguf.py); it checks the type name. When the
    base model has a vision tower (fine-tuning trains the text decoder only), its projector is written
    beside as mmproj-OUT (F16), with the trained model's [IMG_BREAK] embedding: what `quantize` does.
    `projector_from`: an adapter folder holding a trained projector (--train-projector), used instead
    of the base's."""
    import sys

    from devstral.formats.gguf import export_gguf as write_gguf
    from devstral.formats.gguf_mmproj import export_mmproj

    path = Path(write_gguf(model_dir, out, quant_type))
    if base is not None:
        from devstral.formats.peft import read_projector

        trained = read_projector(projector_from) if projector_from is not None else None
        projector = export_mmproj(Path(base), path.with_name(f"mmproj-{path.name}"), embeddings_from=model_dir,
                                  projector=trained or None)
        if projector is not None:
            print(f"gguf vision projector: {projector}", file=sys.stderr)
    return path
