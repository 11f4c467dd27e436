"""Full-parameter training (`devstral finetune --full`, and pretraining from a fresh init): every weight
learns, kept in fp32 (bf16 autocast on CUDA does the math), and the result is a whole model folder
instead of an adapter."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from devstral.train.export import _TOKENIZER_FILES, hf_config, vision_parts, with_vision


def full_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter once (a tied lm_head is the embedding), all set to learn."""
    params = list(model.parameters())  # nn.Module deduplicates shared tensors
    for p in params:
        p.requires_grad_(True)
    return params


def weights_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to checkpoint: our (HF) names, a tied head stored once."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("rotary")}
    if model.lm_head.weight is model.model.embed_tokens.weight:
        state.pop("lm_head.weight", None)
    return state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in state.items():
            params[name].copy_(tensor)


def save_model_folder(model: torch.nn.Module, base: Path, dest: Path, *, dtype: torch.dtype = torch.bfloat16,
                      projector: dict[str, torch.Tensor] | None = None) -> Path:
    """config.json + model.safetensors (HF names, `dtype`) + the base folder's tokenizer files, atomically;
    a multimodal base's vision tower and projector (or `projector`, trained) come along."""
    from safetensors.torch import save_file

    parts = vision_parts(base)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".model."))
    try:
        weights = ((k, v.to(dtype)) for k, v in weights_state(model).items())
        if parts is not None:
            weights = with_vision(parts, weights, dtype, projector)
        save_file({k: v.contiguous() for k, v in weights}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(base, parts, dtype), indent=2) + "\n", encoding="utf-8")
        for pattern in _TOKENIZER_FILES:
            for f in base.glob(pattern):
                if f.is_file() and f.parent.resolve() != dest.resolve():
                    shutil.copy2(f, tmp / f.name)
        for f in tmp.iterdir():
            os.replace(f, dest / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
