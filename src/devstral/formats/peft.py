"""LoRA adapters in PEFT's on-disk format: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's for MistralForCausalLM with the adapter name stripped, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (A [r, in], B [out, r]).
`apply_adapter` wraps a loaded model for inference without merging; `merged_state` adds the updates to
the original 16-bit weights read back from disk.

A vision projector trained beside the LoRA (`finetune --train-projector`) is saved as PEFT saves a
`modules_to_save` module: its whole weights under `base_model.model.model.multi_modal_projector.*`
(Mistral3ForConditionalGeneration's path), with "multi_modal_projector" in `modules_to_save`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from devstral.errors import DevstralError
from devstral.formats.finite import check_finite
from devstral.tmpfiles import temp_path

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<which>lora_[AB])(?:\.[^.]+)?\.weight$")
PROJECTOR = "multi_modal_projector"
_PROJECTOR_KEY = re.compile(r"^(?:base_model\.model\.)?model\.multi_modal_projector\.(?:modules_to_save\.[^.]+\.)?"
                            r"(?P<name>.+)$")


@dataclass
class AdapterConfig:
    r: int
    lora_alpha: float
    target_modules: list[str]
    lora_dropout: float = 0.0
    use_rslora: bool = False
    base_model_name_or_path: str | None = None
    modules_to_save: list[str] | None = None  # [PROJECTOR] when the vision projector trained

    def to_peft_json(self) -> dict[str, Any]:
        """Every field PEFT writes for a plain LoRA on a causal LM, with its defaults."""
        return {
            "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none", "corda_config": None, "eva_config": None, "exclude_modules": None,
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
            "lora_alpha": self.lora_alpha, "lora_bias": False, "lora_dropout": self.lora_dropout,
            "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": self.modules_to_save,
            "peft_type": "LORA", "r": self.r, "rank_pattern": {}, "revision": None,
            "target_modules": sorted(self.target_modules), "task_type": "CAUSAL_LM",
            "trainable_token_indices": None, "use_dora": False, "use_rslora": self.use_rslora,
        }

    @classmethod
    def read(cls, folder: Path) -> AdapterConfig:
        from devstral.config import read_json

        path = folder / CONFIG_NAME
        if not path.is_file():
            raise DevstralError(f"{folder}: not a LoRA adapter (no {CONFIG_NAME})")
        d = read_json(path)
        if not isinstance(d, dict):
            raise DevstralError(f"{path}: expected a JSON object")
        if d.get("peft_type", "LORA") != "LORA":
            raise DevstralError(f"{path}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
        for unsupported in ("use_dora", "rank_pattern", "alpha_pattern", "layer_replication"):
            if d.get(unsupported):
                raise DevstralError(f"{path}: {unsupported} is not supported")
        if d.get("bias", "none") != "none" or d.get("fan_in_fan_out"):
            raise DevstralError(f"{path}: only bias='none' and fan_in_fan_out=false adapters are supported")
        values = {}
        for key, kind, default in (("r", int, None), ("lora_alpha", float, None), ("lora_dropout", float, 0.0)):
            v = d.get(key, default)
            if v is None:
                raise DevstralError(f"{path}: missing field {key!r}")
            if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and v != int(v)):
                raise DevstralError(f"{path}: {key} must be {'an integer' if kind is int else 'a number'}, "
                                    f"got {v!r}")
            values[key] = kind(v)
        if values["r"] <= 0:
            raise DevstralError(f"{path}: r must be a positive integer, got {values['r']}")
        targets = d.get("target_modules") or []
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise DevstralError(f"{path}: target_modules must be a list of module names")
        saved = d.get("modules_to_save") or None
        if saved is not None and (not isinstance(saved, list) or [m for m in saved if m != PROJECTOR]):
            raise DevstralError(f"{path}: modules_to_save {saved!r} is not supported (only {PROJECTOR!r})")
        return cls(r=values["r"], lora_alpha=values["lora_alpha"], target_modules=list(targets),
                   lora_dropout=values["lora_dropout"], use_rslora=d.get("use_rslora") is True,
                   base_model_name_or_path=d.get("base_model_name_or_path"), modules_to_save=saved)


def peft_key(module_name: str, which: str) -> str:
    """'model.layers.0.self_attn.q_proj', 'lora_A' -> PEFT's saved key."""
    return f"{PREFIX}{module_name}.{which}.weight"


def save_adapter(model: nn.Module, folder: Path, config: AdapterConfig, *,
                 projector: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter atomically (each file to a temp name in the folder, then renamed)."""

    from devstral.model.lora import lora_state

    save_adapter_state(lora_state(model), folder, config, projector=projector)


def save_adapter_state(state: dict[str, torch.Tensor], folder: Path, config: AdapterConfig, *,
                       projector: dict[str, torch.Tensor] | None = None) -> None:
    """The same from lora_state()'s dict ('<module>.lora_A.weight' -> tensor), e.g. gathered from FSDP shards.
    `projector`: a trained vision projector's state dict (our names, which are HF's), saved as PEFT's
    modules_to_save."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, t in state.items():
        module, which, _ = key.rsplit(".", 2)
        tensors[peft_key(module, which)] = t.detach().float().cpu().contiguous()
    if not tensors:
        raise DevstralError("the model has no LoRA layers to save")
    if projector:
        config.modules_to_save = [PROJECTOR]
        tensors |= {f"{PREFIX}model.{PROJECTOR}.{k}": t.detach().float().cpu().contiguous() for k, t in projector.items()}
    _atomic(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(config.to_peft_json(), indent=2, sort_keys=True)
    _atomic(folder / CONFIG_NAME, lambda p: Path(p).write_text(text + "\n", encoding="utf-8"))


def _atomic(path: Path, write) -> None:
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_adapter(folder: Path) -> tuple[AdapterConfig, dict[str, dict[str, torch.Tensor]]]:
    """(config, {module name: {'lora_A': A, 'lora_B': B}}) with module names as in our model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise DevstralError(f"--adapter {folder}: no such folder")
    cfg = AdapterConfig.read(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise DevstralError(f"{folder}: adapter_model.bin (pickle) is not supported; save with safetensors")
        raise DevstralError(f"{folder}: no {WEIGHTS_NAME}")
    try:
        raw = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise DevstralError(f"{weights}: corrupt or unreadable safetensors file: {e}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        if _PROJECTOR_KEY.match(key):
            continue  # read_projector's
        m = _KEY.match(key)
        if m is None:
            raise DevstralError(f"{weights}: tensor {key} is not a LoRA A/B weight (only plain LoRA is supported)")
        check_finite(tensor, key, weights)
        module = m["module"]
        # Adapters saved from Mistral3ForConditionalGeneration put the text model under language_model.
        module = module.replace("model.language_model.", "model.").replace("language_model.model.", "model.")
        pairs.setdefault(module, {})[m["which"]] = tensor
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in ab else "lora_A"
            raise DevstralError(f"{weights}: {peft_key(module, missing)} is missing")
    if not pairs:
        raise DevstralError(f"{weights}: the adapter holds no tensors")
    return cfg, pairs


def read_projector(folder: Path) -> dict[str, torch.Tensor]:
    """A trained vision projector saved with the adapter ({name inside multi_modal_projector: tensor}),
    or {} when the adapter has none."""
    from safetensors import safe_open

    weights = Path(folder) / WEIGHTS_NAME
    out = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
            m = _PROJECTOR_KEY.match(key)
            if m:
                out[m["name"]] = f.get_tensor(key)
                check_finite(out[m["name"]], key, weights)
    return out


def apply_projector(vision: nn.Module | None, folder: Path) -> bool:
    """Put an adapter's trained projector into a loaded vision model; False when there is none (or no
    vision model to take it). One line naming the tensor for a projector that does not fit this model."""
    state = read_projector(folder)
    if not state:
        return False
    weights = Path(folder) / WEIGHTS_NAME
    if vision is None:  # text only (--no-vision, a text model): nothing to put it in, and nothing needs it
        import sys

        print(f"note: {weights} holds a trained vision projector; no vision encoder is loaded, so it is not used",
              file=sys.stderr)
        return False
    target = vision.multi_modal_projector
    own = dict(target.named_parameters())
    for name, tensor in state.items():
        if name not in own or tuple(own[name].shape) != tuple(tensor.shape):
            shape = list(own[name].shape) if name in own else None
            raise DevstralError(f"{weights}: projector tensor {name} {list(tensor.shape)} does not fit this model's "
                                f"projector ({shape or 'no such tensor'})")
    missing = sorted(set(own) - set(state))
    if missing:
        raise DevstralError(f"{weights}: projector tensor {missing[0]} is missing")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor.to(own[name].dtype))
    return True


def _check_shapes(weights: Path, module: str, base: nn.Module, a: torch.Tensor, b: torch.Tensor, r: int) -> None:
    in_f, out_f = base.in_features, base.out_features
    if a.dim() != 2 or a.shape[0] != r or a.shape[1] != in_f:
        raise DevstralError(f"{weights}: tensor {peft_key(module, 'lora_A')} has shape {list(a.shape)} but this "
                            f"model needs [{r}, {in_f}] (adapter made for a different base model?)")
    if b.dim() != 2 or b.shape[0] != out_f or b.shape[1] != r:
        raise DevstralError(f"{weights}: tensor {peft_key(module, 'lora_B')} has shape {list(b.shape)} but this "
                            f"model needs [{out_f}, {r}] (adapter made for a different base model?)")


def _base_module(net: nn.Module, weights: Path, module: str) -> nn.Module:
    try:
        base = net.get_submodule(module)
    except AttributeError:
        raise DevstralError(f"{weights}: tensor {peft_key(module, 'lora_A')} targets {module}, which this model "
                            "does not have (adapter made for a different base model?)") from None
    if not hasattr(base, "in_features"):
        raise DevstralError(f"{weights}: {module} is not a linear layer")
    return base


_STACKED_EXPERTS = re.compile(r"^(?P<layer>model\.layers\.\d+)\.mlp\.experts(?:\.base_layer)*$")


def split_expert_parameters(pairs: dict[str, dict[str, torch.Tensor]], r: int, model_cfg: Any,
                            weights: Path) -> None:
    """PEFT's LoRA on transformers' stacked Mixtral experts -> LoRA on our per-expert linears, in place.

    transformers 5 keeps Mixtral's experts as `mlp.experts.gate_up_proj` [E, 2H, D] and `down_proj`
    [E, D, H]; PEFT adapts them with `target_parameters`: lora_A [r*E, in], lora_B [out, r*E], expert
    e's update being B.view(out, r, E)[..., e] @ A.view(E, r, in)[e] (two targeted parameters nest, the
    first under `experts.base_layer.`). Each entry is told apart by its shapes and becomes expert e's
    w1 (gate rows of B), w3 (up rows) or w2 pairs, with the same A_e: the same update, exactly."""
    for module in [m for m in pairs if _STACKED_EXPERTS.match(m)]:
        ab = pairs.pop(module)
        layer = _STACKED_EXPERTS.match(module)["layer"]
        n, d, h = model_cfg.n_experts, model_cfg.dim, model_cfg.hidden_dim
        a, b = ab["lora_A"], ab["lora_B"]
        shapes = (tuple(a.shape), tuple(b.shape))
        if n and shapes == ((r * n, d), (2 * h, r * n)):
            parts = {"w1": slice(0, h), "w3": slice(h, 2 * h)}
        elif n and shapes == ((r * n, h), (d, r * n)):
            parts = {"w2": slice(0, d)}
        else:
            raise DevstralError(f"{weights}: tensor {peft_key(module, 'lora_A')} has shape {list(a.shape)} (lora_B "
                                f"{list(b.shape)}), which fits no expert weight of this model (adapter made for a "
                                "different base model?)")
        a_e, b_e = a.reshape(n, r, a.shape[1]), b.reshape(b.shape[0], r, n)
        for e in range(n):
            for w, rows in parts.items():
                target = f"{layer}.block_sparse_moe.experts.{e}.{w}"
                if target in pairs:
                    raise DevstralError(f"{weights}: two LoRA updates for {target}")
                pairs[target] = {"lora_A": a_e[e].contiguous(), "lora_B": b_e[rows, :, e].contiguous()}


def apply_adapter(net: nn.Module, folder: Path, *, trainable: bool = False) -> AdapterConfig:
    """Wrap the targeted linears of a loaded model with the adapter's LoRA layers (no merging)."""
    from devstral.model.lora import LoRALinear

    folder = Path(folder)
    cfg, pairs = read_adapter(folder)
    weights = folder / WEIGHTS_NAME
    if getattr(net, "config", None) is not None:
        split_expert_parameters(pairs, cfg.r, net.config, weights)
    # Check everything before changing the model, so a bad adapter leaves it untouched.
    bases = {}
    for module, ab in pairs.items():
        base = _base_module(net, weights, module)
        if isinstance(base, LoRALinear):
            raise DevstralError(f"{module} already has a LoRA adapter")
        _check_shapes(weights, module, base, ab["lora_A"], ab["lora_B"], cfg.r)
        bases[module] = base
    param = next(net.parameters())
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    for module, base in bases.items():
        parent_name, _, leaf = module.rpartition(".")
        lora = LoRALinear(base, cfg.r, cfg.lora_alpha, rslora=cfg.use_rslora, dtype=torch.float32 if trainable
                          else dtype, init=False)
        with torch.no_grad():
            lora.lora_A.weight.copy_(pairs[module]["lora_A"])
            lora.lora_B.weight.copy_(pairs[module]["lora_B"])
        lora.requires_grad_(trainable)
        setattr(net.get_submodule(parent_name), leaf, lora)
    return cfg


def merged_state(base_folder: Path, adapter_folder: Path, *, dtype: torch.dtype = torch.bfloat16):
    """Yield (name, tensor) of the base model from disk with W += B @ A * scale, computed in fp32.

    The base weights come straight from the original safetensors (16-bit), never from a quantized copy.
    """
    from devstral.config import ModelConfig
    from devstral.formats.safetensors import iter_tensors
    from devstral.model.lora import lora_scaling

    cfg_model = ModelConfig.from_dir(base_folder)
    cfg, pairs = read_adapter(adapter_folder)
    split_expert_parameters(pairs, cfg.r, cfg_model, Path(adapter_folder) / WEIGHTS_NAME)
    scale = lora_scaling(cfg.r, cfg.lora_alpha, cfg.use_rslora)
    weights = Path(adapter_folder) / WEIGHTS_NAME
    used = set()
    for name, tensor in iter_tensors(base_folder, cfg_model, dtype=torch.float32, device="cpu"):
        module = name.removesuffix(".weight")
        if module in pairs:
            a, b = pairs[module]["lora_A"].float(), pairs[module]["lora_B"].float()
            out_f, in_f = tensor.shape
            if a.shape != (cfg.r, in_f) or b.shape != (out_f, cfg.r):
                raise DevstralError(f"{weights}: tensor {peft_key(module, 'lora_A')} / lora_B shapes "
                                    f"{list(a.shape)} / {list(b.shape)} do not fit {name} {list(tensor.shape)}")
            tensor = tensor + (b @ a) * scale
            used.add(module)
        yield name, tensor.to(dtype)
    unused = sorted(set(pairs) - used)
    if unused:
        raise DevstralError(f"{weights}: tensor {peft_key(unused[0], 'lora_A')} targets {unused[0]}, which "
                            "the base model does not have")
