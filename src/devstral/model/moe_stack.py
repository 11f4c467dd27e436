"""Stacking a MoE layer's experts for the grouped kernels (kernels/moe_experts.py), without a second copy.

Plain linears: each projection's weights become one [E, N, K] tensor and every expert's `weight` a view
of its slice (as transformer.fused_weight does for q/k/v). GGUF experts (QuantLinear on the planar
layout, the rows of one llama.cpp `ffn_*_exps` tensor): the planar arrays are concatenated, each
expert's GGUFWeight reads its rows of the stack through a PackedRows view, and its own buffer is
released. Anything else (LoRA-wrapped experts, types without a planar layout, CPU blocks) keeps the
reference path.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from devstral.kernels import triton_available
from devstral.kernels.moe_experts import ExpertStack, PackedRows, stack_packed

PROJECTIONS = ("w1", "w3", "w2")  # gate, up, down


def _kernel_device(t: torch.Tensor) -> bool:
    return triton_available() and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _dense(mods: list[nn.Module]) -> bool:
    if not all(type(m) is nn.Linear and m.bias is None for m in mods):
        return False
    ws = [m.weight for m in mods]
    return (len({(w.dtype, w.device) for w in ws}) == 1 and ws[0].device.type != "meta"
            and ws[0].dtype in (torch.bfloat16, torch.float16, torch.float32) and _kernel_device(ws[0]))


def _planar(mods: list[nn.Module]) -> bool:
    from devstral.quant.linear import QuantLinear

    if not all(type(m) is QuantLinear and m.bias is None and m.weight_q.mode == "planar" for m in mods):
        return False
    return len({m.qtype for m in mods}) == 1 and _kernel_device(mods[0].weight_q.packed["q"])


def stack_experts(moe) -> ExpertStack | None:
    experts = list(moe.experts)
    cols = {name: [getattr(e, name) for e in experts] for name in PROJECTIONS}
    if all(_dense(mods) for mods in cols.values()):
        stacks = {name: _stack_dense(mods) for name, mods in cols.items()}
    elif all(_planar(mods) for mods in cols.values()):
        stacks = {name: _stack_planar(moe, name, mods) for name, mods in cols.items()}
    else:
        return None
    hidden, dim = experts[0].w1.out_features, experts[0].w1.in_features
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the experts' old buffers, before the engine plans its KV pool
    return ExpertStack(stacks["w1"], stacks["w3"], stacks["w2"], len(experts), hidden, dim)


def _stack_dense(mods: list[nn.Linear]) -> torch.Tensor:
    stack = torch.stack([m.weight.detach() for m in mods])
    for e, m in enumerate(mods):
        m.weight = nn.Parameter(stack[e], requires_grad=False)
    return stack


def _stack_planar(moe, name: str, mods: list) -> object:
    stack = stack_packed([m.weight_q.packed for m in mods])
    moe.register_buffer(f"stack_{name}", stack.buf, persistent=False)
    moe._stack_meta = getattr(moe, "_stack_meta", {})
    moe._stack_meta[name] = stack
    n = mods[0].out_features
    for e, m in enumerate(mods):
        w = m.weight_q
        w._packed = PackedRows(lambda moe=moe, name=name: moe._stack_meta[name], e * n, (e + 1) * n)
        w.planar = torch.empty(0, dtype=torch.uint8, device=stack.device)  # its bytes now live in the stack
    return stack


def rebind_stack(moe) -> None:
    """After the module moved: the stacks over the moved buffers (dense stacks are views of the experts')."""
    st = moe.stack
    if getattr(moe, "_stack_meta", None):
        for name in PROJECTIONS:
            old = moe._stack_meta[name]
            moe._stack_meta[name] = old.rebind(getattr(moe, f"stack_{name}"))
        st.gate, st.up, st.down = (moe._stack_meta[n] for n in PROJECTIONS)
    else:
        experts = list(moe.experts)
        st.gate, st.up, st.down = (_stack_dense([getattr(e, n) for e in experts]) for n in PROJECTIONS)
