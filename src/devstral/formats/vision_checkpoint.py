"""The vision encoder of a multimodal checkpoint: a mistral3 safetensors folder, or an mmproj GGUF.

Like the decoder (loader.build_model) it is built on the meta device and filled tensor by tensor;
every parameter must be present with the shape the config implies, and nothing unknown may be left.
"""

from __future__ import annotations

from pathlib import Path

import torch

from devstral.config import ModelConfig, read_json
from devstral.errors import DevstralError
from devstral.model.vision import VisionModel
from devstral.model.vision_config import VisionConfig


def vision_config_of(folder: Path, cfg: ModelConfig) -> VisionConfig | None:
    """The VisionConfig in a folder's config.json (mistral3 with a vision_config), else None."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    return VisionConfig.from_hf(read_json(path), text_dim=cfg.dim, text_norm_eps=cfg.norm_eps, source=str(path))


def has_vision_tensors(folder: Path) -> bool:
    from devstral.formats.safetensors import read_header, vision_param_name, weight_files

    layout, files = weight_files(folder)
    return any(vision_param_name(e.name, layout) for f in files for e in read_header(f))


def build_vision(folder: Path, cfg: ModelConfig, vc: VisionConfig, *, dtype: torch.dtype,
                 device: torch.device) -> VisionModel:
    from devstral.formats.safetensors import iter_tensors

    tensors = iter_tensors(folder, cfg, dtype=dtype, device=device, part="vision")
    return fill_vision(vc, tensors, where=str(folder))


def fill_vision(vc: VisionConfig, tensors, *, where: str) -> VisionModel:
    """A VisionModel from (our name, tensor) pairs; one line naming the tensor if any is off."""
    with torch.device("meta"):
        model = VisionModel(vc)
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in tensors:
        if name not in expected:
            raise DevstralError(f"{where}: unexpected vision tensor {name!r}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise DevstralError(f"{where}: vision tensor {name} has shape {list(tensor.shape)} but the config "
                                f"implies {list(expected[name].shape)}")
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise DevstralError(f"{where}: vision tensor {missing[0]} is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return model.eval().requires_grad_(False)

