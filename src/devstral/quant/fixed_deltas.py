"""The o and down projections' batch-1 decode outputs as int64 fixed point (kernels/fixed_point.py), read by the
add + RMSNorm after each. `DEVSTRAL_FIXED_DELTAS`: unset (auto) on where every o and down is a K-quant, `1` on
for any model that can, `0` off.

Why: their split-K GEMVs spend the end of every launch on the last-arriver sum (a counter round trip, then the
partials read back); the splits can instead add into fixed point and leave. Measured in the engine (H200,
Devstral-Small-shape GGUFs, benchmarks/results/decode_ab_s23_h200.json, one lease): Q4_K_M 216.53 / 216.42 ->
218.06 / 217.92 tok/s (+0.7%; the GEMVs 3842 -> 3705 us a step, the norms 272 -> 370: the atomics' drain and
the 8-byte read land on the norm); Q8_0 151.05 -> 150.03 (-0.7%: its Q8_0 o and down, split 4 and 7, gained
3 us a layer and their norms lost 3.4). Hence the K-quant rule of the default.

The protocol: two [1, dim] int64 buffers per model, A and B. Every block's o_proj adds into A and zeroes B, its
down_proj adds into B and zeroes A; the norm after each reads the buffer just filled. A buffer is zeroed by the
GEMV of the other kind, after that GEMV's dependent-launch wait, so after the norm that read it has finished, and
before the next GEMV that adds into it runs. It holds only when every block runs o then down through a plan that
writes fixed point, one activation row at a time: `install` gives the buffers out only then (dense blocks, planar
GGUF o/down without bias, a fixed-point plan at one row, one process), and QuantLinear uses them only for one
row. Other row counts (prefill, batched decode) write ordinary outputs and leave both buffers alone; A is zero
after every full batch-1 forward, and B is zeroed by the first block's o before any down adds into it. A layer
wrapped afterwards (a LoRA adapter: its forward adds to the base's output) would break the chain, so wrapping one
releases the whole model's (`release`, model/lora.py).
"""

from __future__ import annotations

import os
import sys

import torch

from devstral.errors import DevstralError
from devstral.kernels.gguf_linear import fixed_plan
from devstral.quant.linear import QuantLinear

AUTO_QTYPES = frozenset({"Q4_K", "Q5_K", "Q6_K"})  # where the default turns it on (measured: Q4_K_M won, Q8_0 lost)


def setting() -> str:
    """'auto' (unset), 'on' (1) or 'off' (0)."""
    raw = os.environ.get("DEVSTRAL_FIXED_DELTAS")
    if raw is None or raw == "":
        return "auto"
    if raw not in ("0", "1"):
        raise DevstralError(f"DEVSTRAL_FIXED_DELTAS={raw!r}: 1 (on), 0 (off), or unset (on for K-quant o/down)")
    return "on" if raw == "1" else "off"


def install(model: torch.nn.Module) -> bool:
    """Give every block's o_proj and down_proj its (add into, zero) buffers where the protocol holds (and, by
    default, where every one of them is a K-quant); False (nothing changed) otherwise -- with a one-line note saying
    why when the switch is on. Called at fuse time, before any CUDA-graph capture."""
    how = setting()
    if how == "off":
        return False
    pairs, reason = _pairs(model)
    if reason is not None:
        if how == "on" and reason not in _NOTED:  # fuse_projections runs once per engine: say it once
            _NOTED.add(reason)
            print(f"note: DEVSTRAL_FIXED_DELTAS=1 has no effect: {reason}", file=sys.stderr)
        return False
    if how == "auto" and any(m.qtype.name not in AUTO_QTYPES for pair in pairs for m in pair):
        return False
    a, b = torch.zeros(2, 1, pairs[0][0].out_features, dtype=torch.int64, device=pairs[0][0].weight_q.device)
    members = [m for pair in pairs for m in pair]
    for o, down in pairs:
        o.fixed_out, down.fixed_out = (a, b), (b, a)
    for m in members:
        m.fixed_group = members
    return True


_NOTED: set[str] = set()


def _pairs(model: torch.nn.Module) -> tuple[list, str | None]:
    """Every block's (o_proj, down_proj), or the reason the protocol cannot hold."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        return [], "the model is split over several processes"
    pairs = []
    for i, block in enumerate(model.model.layers):
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            return [], f"layer {i} is a mixture of experts (only dense blocks)"
        for name, m in (("self_attn.o_proj", block.self_attn.o_proj), ("mlp.down_proj", mlp.down_proj)):
            if not _fixable(m):
                return [], (f"layers.{i}.{name} is not a GGUF layer on the GPU without bias whose one-row kernel "
                            "adds into fixed point")
        pairs.append((block.self_attn.o_proj, mlp.down_proj))
    return pairs, None if pairs else "the model has no layers"


def release(module: torch.nn.Module) -> None:
    """Back to ordinary outputs for every layer that shares this one's buffers (all or none keep the protocol)."""
    for m in getattr(module, "fixed_group", None) or ():
        m.fixed_out, m.fixed_group = None, None


def _fixable(m) -> bool:
    return (type(m) is QuantLinear and m.bias is None and m.weight_q.mode == "planar"
            and fixed_plan(m.weight_q.packed, m.weight_q.device))
