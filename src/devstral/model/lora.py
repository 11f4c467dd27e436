"""LoRA around the model's own linears, with PEFT's module names, initialisation and scaling.

Wrapping `q_proj` keeps the original as `q_proj.base_layer` and adds `q_proj.lora_A` / `q_proj.lora_B`
(nn.Linear, A: in->r, B: r->out), so parameter names are exactly PEFT's minus its `base_model.model.`
prefix and adapter name. A gets PEFT's default kaiming-uniform(a=sqrt(5)) init and B starts at zero, so
a fresh adapter leaves the model unchanged. Scale is alpha/r, or alpha/sqrt(r) with rsLoRA.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from devstral.errors import DevstralError

# Short names accepted by --target, and what "all-linear" means for our decoder (PEFT leaves lm_head out).
# Mixtral's expert linears keep their checkpoint (and PEFT) names w1 (gate), w3 (up), w2 (down); the router
# (`gate`) is never wrapped, as PEFT leaves it out of Mixtral's targets.
TARGET_ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                  "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
EXPERT_LINEAR = ("w1", "w2", "w3")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", *EXPERT_LINEAR)


def parse_targets(spec: str | Iterable[str]) -> list[str]:
    """'all-linear' or 'q,k,v' or ['q_proj', ...] -> module leaf names in our canonical order."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise DevstralError("--target: no modules given")
    if items == ["all-linear"]:
        return list(ALL_LINEAR)
    names = set()
    for item in items:
        if item == "experts":
            names.update(EXPERT_LINEAR)
            continue
        name = TARGET_ALIASES.get(item, item)
        if name not in ALL_LINEAR:
            raise DevstralError(f"--target: unknown module {item!r} (choose all-linear or a comma list of "
                                f"{', '.join(TARGET_ALIASES)}, experts)")
        names.add(name)
    return [n for n in ALL_LINEAR if n in names]


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """base(x) + B(A(dropout(x))) * scale, with the base layer frozen (an nn.Linear or an NF4Linear)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, *, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype = torch.float32, init: bool = True):
        super().__init__()
        if r <= 0:
            raise DevstralError(f"--lora-r must be a positive integer, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise DevstralError(f"--lora-dropout must be in [0, 1), got {dropout}")
        self.base_layer = base
        from devstral.quant.fixed_deltas import release

        release(base)  # its output is no longer the one a norm reads: no fixed point for the model's o/down
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        device = _device_of(base)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if init:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from devstral.kernels.lora_linear import fusable_base, lora_linear

        if (isinstance(self.lora_dropout, nn.Identity) or not self.training) and fusable_base(self.base_layer):
            # one autograd node that keeps only x (kernels/lora_linear.py); dropout needs its mask: unfused
            return lora_linear(x, self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling)
        return self.unfused(x)

    def unfused(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        a = self.lora_A.weight
        h = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(a.dtype)
        return out + (self.lora_B(self.lora_A(h)) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to the base weight, [out, in], in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}"


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(model: nn.Module, targets: list[str], r: int, alpha: float, *, dropout: float = 0.0,
                rslora: bool = False, dtype: torch.dtype = torch.float32, init: bool = True,
                seed: int | None = None) -> list[str]:
    """Wrap every linear whose leaf name is in `targets`; freeze everything else. Returns the wrapped names.

    With `seed`, the A matrices are drawn from their own generator so the adapter init does not depend on
    (or disturb) the global RNG state.
    """
    if r <= 0:
        raise DevstralError(f"--lora-r must be a positive integer, got {r}")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf not in targets or isinstance(module, LoRALinear) or not hasattr(module, "in_features"):
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, LoRALinear):
            continue
        lora = LoRALinear(module, r, alpha, dropout=dropout, rslora=rslora, dtype=dtype, init=init and seed is None)
        if init and seed is not None:
            g = torch.Generator().manual_seed(seed + len(wrapped))
            bound = 1.0 / math.sqrt(lora.in_features)  # kaiming_uniform(a=sqrt(5)) on an [r, in] matrix
            a = (torch.rand(lora.lora_A.weight.shape, generator=g) * 2 - 1) * bound
            with torch.no_grad():
                lora.lora_A.weight.copy_(a)
                lora.lora_B.weight.zero_()
        setattr(parent, leaf, lora)
        wrapped.append(name)
    if not wrapped:
        raise DevstralError(f"no linear layers named {', '.join(targets)} in the model")
    return wrapped


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our module names -> LoRA weights ('model.layers.0.self_attn.q_proj.lora_A.weight')."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out
