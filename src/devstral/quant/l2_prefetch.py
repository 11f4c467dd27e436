"""Which weights a decode GEMV asks L2 for on behalf of the next one (kernels/l2_prefetch.py): the o projection
asks for the first rows of gate/up, `DEVSTRAL_L2_PREFETCH_MB` megabytes of them (0: off).

Between o's start and gate/up's, a layer's chain is the o GEMV's tail and the add + RMSNorm: a few us in
which DRAM moves little. gate/up's programs start in row order, so the first R rows of its weight are what its
first programs read; with them in L2 those programs finish sooner and the launch needs that many fewer bytes
from DRAM. R is the budget over the bytes a row takes in every field of the planar weight (words, scales, ...),
rounded down to 16 rows (every span then a multiple of 16 bytes, as the bulk prefetch needs).
`DEVSTRAL_L2_PREFETCH_AT`: `wait` (default) issues after o's dependent-launch wait, `early` before it, behind
o's own weight loads. A hint only: no output changes, and a layer wrapped later (LoRA) keeps it harmlessly.
"""

from __future__ import annotations

import os

import torch

from devstral.errors import DevstralError
from devstral.kernels import gguf_config
from devstral.kernels.gguf_pack import PackedGGUF
from devstral.kernels.l2_prefetch import MAX_SPANS
from devstral.quant.linear import PackedProjection, QuantLinear

MODES = {"wait": 1, "early": 2}
ROW_ALIGN = 16


def budget_bytes() -> int:
    raw = os.environ.get("DEVSTRAL_L2_PREFETCH_MB", "0")
    try:
        mb = float(raw)
    except ValueError:
        raise DevstralError(f"DEVSTRAL_L2_PREFETCH_MB={raw!r}: a number of megabytes (0 turns it off)") from None
    if mb < 0:
        raise DevstralError(f"DEVSTRAL_L2_PREFETCH_MB={raw!r}: a number of megabytes (0 turns it off)")
    return int(mb * (1 << 20))


def mode() -> int:
    raw = os.environ.get("DEVSTRAL_L2_PREFETCH_AT", "wait")
    if raw not in MODES:
        raise DevstralError(f"DEVSTRAL_L2_PREFETCH_AT={raw!r}: one of {', '.join(MODES)}")
    return MODES[raw]


def spans(p: PackedGGUF, budget: int) -> tuple[int, ...]:
    """(byte offset in p.buf, bytes) for rows 0..R-1 of every field of p, flattened; R from the budget."""
    fields = list(p.arrays.values())
    row_bytes = sum(a.stride(0) * a.element_size() for a in fields)
    rows = min(p.n, budget // row_bytes) // ROW_ALIGN * ROW_ALIGN
    if rows == 0 or len(fields) > MAX_SPANS:
        return ()
    base = p.buf.data_ptr()
    out = []
    for a in fields:
        off, size = a.data_ptr() - base, rows * a.stride(0) * a.element_size()
        if off % 16 or size % 16:  # the planar layout aligns every field; a bulk prefetch needs 16 bytes
            return ()
        out += [off, size]
    return tuple(out)


def install(model: torch.nn.Module) -> int:
    """Give every dense block's o_proj the first rows of its gate/up to prefetch; the number of blocks given.
    Called at fuse time (fuse_projections), after the weights reached their device."""
    budget = budget_bytes()
    if budget == 0:
        return 0
    how, given = mode(), 0
    for block in model.model.layers:
        o, target = block.self_attn.o_proj, _first_gemv(getattr(block, "mlp", None))
        if target is None or not _streams(o) or target.buf.device != o.weight_q.device:
            continue
        wanted = spans(target, budget)
        if wanted:
            o.l2_next, given = (target.buf, wanted, how), given + 1
    return given


def _first_gemv(mlp) -> PackedGGUF | None:
    """The planar weight the MLP's first decode GEMV reads: the fused gate/up, else gate_proj's."""
    if mlp is None:
        return None
    fused = getattr(mlp, "gate_up", None)
    if isinstance(fused, PackedProjection):
        return fused.packed
    gate = getattr(mlp, "gate_proj", None)
    return gate.weight_q.packed if type(gate) is QuantLinear and gate.weight_q.mode == "planar" else None


def _streams(m) -> bool:
    """Whether m's one-row decode runs the streaming GEMV's split-K launch (the one that carries the hint)."""
    if type(m) is not QuantLinear or m.weight_q.mode != "planar":
        return False
    p = m.weight_q.packed
    kind = gguf_config.gguf_plan(p.qtype.name, 1, p.n, p.k, p.buf.device)[0]
    return kind == "wide" or kind in gguf_config.WIDE_INT8_KINDS


__all__ = ["MODES", "budget_bytes", "install", "mode", "spans"]
