"""The base model for training: our one Transformer, filled from disk, with NF4 base linears for QLoRA.

For QLoRA each targeted weight is quantized the moment it is read, so the full 16-bit model never sits
in (GPU) memory at once. A bitsandbytes-4bit checkpoint's linears arrive already in NF4 and stay so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from devstral.config import ModelConfig
from devstral.errors import DevstralError
from devstral.model.nf4 import NF4Linear
from devstral.model.rope import Rotary
from devstral.model.transformer import Transformer


def load_base(folder: Path, cfg: ModelConfig, *, device: torch.device, dtype: torch.dtype,
              nf4_targets: list[str] | None = None, double_quant: bool = True) -> Transformer:
    from devstral.formats.bnb4bit import iter_model_weights
    from devstral.formats.safetensors import check_config_against_weights

    check_config_against_weights(folder, cfg)  # before building anything from the config's sizes
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    loaded: set[str] = set()
    for name, tensor in iter_model_weights(folder, cfg, device=device, dtype=dtype):
        if name not in expected:
            raise DevstralError(f"{folder}: unexpected tensor {name!r} in the weights")
        shape = (tensor.out_features, tensor.in_features) if isinstance(tensor, NF4Linear) else tuple(tensor.shape)
        if shape != expected[name]:
            raise DevstralError(f"{folder}: tensor {name} has shape {list(shape)} but the config "
                                f"implies {list(expected[name])}")
        module_name, _, attr = name.rpartition(".")
        parent_name, _, leaf = module_name.rpartition(".")
        if isinstance(tensor, NF4Linear):  # a bitsandbytes-4bit checkpoint: its NF4 bytes are used as they are
            setattr(model.get_submodule(parent_name), leaf, tensor)
        elif nf4_targets and leaf in nf4_targets and attr == "weight" and parent_name.startswith("model.layers."):
            setattr(model.get_submodule(parent_name), leaf, NF4Linear(tensor, double_quant=double_quant))
        else:
            setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
        loaded.add(name)
        del tensor
    if "lm_head.weight" not in loaded and "model.embed_tokens.weight" in loaded:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(set(expected) - loaded)
    if missing:
        raise DevstralError(f"{folder}: tensor {missing[0]} is missing from the weights")
    model.rotary = Rotary(cfg).to(device)
    return model.requires_grad_(False)
