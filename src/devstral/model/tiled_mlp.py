"""A token-wise residual branch (the SwiGLU MLP) trained in tiles of tokens, so that its wide
intermediates exist for one tile at a time.

The dense MLP of Devstral-Small is 32768 wide: autograd keeps gate, up and silu(gate) * up for backward
(3 x 64 KB per token in bf16) and backward adds their gradients, about 380 KB per token at its peak, which
dominates a long sequence's activation memory once the layer inputs are checkpointed and offloaded.
Here the branch keeps only its input: forward runs tile by tile with nothing saved, and backward runs,
per tile, the forward again with autograd on and its backward, writing that tile's input gradient and
summing the parameter gradients (in fp32) over the tiles. Every token's arithmetic is the same as the
untiled branch's; only the sums over tokens of the weight gradients are split into per-tile partial sums.

Under gradient checkpointing the block's recomputation (train: the checkpoint's second forward) does not
need the branch's output, only what it saves (its input), so there it skips the matmuls
(`recomputing()`; in a checkpoint of several layers only in the last one, whose output nothing in the
rerun uses: `output_needed()`); the tiles' forward in backward is then the only recomputation, and a checkpointed
step does the same matmul work as with the untiled branch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch

_local = threading.local()


@contextlib.contextmanager
def _recomputing_set(on: bool):
    before = getattr(_local, "on", False)
    _local.on = on
    try:
        yield
    finally:
        _local.on = before


def recomputing():
    """The block runs again to rebuild what backward saved (torch.utils.checkpoint's recomputation)."""
    return _recomputing_set(True)


def output_needed():
    """A block whose output the rerun needs (a checkpoint of several layers: all but the last)."""
    return _recomputing_set(False)


def is_recomputing() -> bool:
    return getattr(_local, "on", False)


def checkpoint_contexts():
    """`context_fn` for torch.utils.checkpoint: nothing around the forward, `recomputing()` around its rerun."""
    return contextlib.nullcontext(), recomputing()


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _TiledRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int, *params: torch.Tensor):
        dev = x.device.type
        ctx.fn, ctx.tile, ctx.params, ctx.autocast = fn, tile, params, _autocast_state(dev)
        ctx.save_for_backward(x)
        enabled, low = ctx.autocast
        if is_recomputing():  # the checkpoint's rerun keeps only the saved input; this output is discarded
            return x.new_empty(x.shape, dtype=low if enabled else x.dtype)
        rows = x.reshape(-1, x.shape[-1])
        out = None
        for start in range(0, rows.shape[0], tile):
            y = fn(rows[start:start + tile])
            if out is None:
                out = y.new_empty((rows.shape[0], y.shape[-1]))
            out[start:start + tile] = y
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        fn, tile, params = ctx.fn, ctx.tile, ctx.params
        need_x, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        wanted = [p for p, n in zip(params, need_p, strict=True) if n]
        rows, grows = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = torch.empty_like(rows) if need_x else None
        sums: list[torch.Tensor | None] = [None] * len(wanted)
        tiles = range(0, rows.shape[0], tile)
        enabled, low = ctx.autocast
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=low, enabled=enabled):
            for start in tiles:
                xt = rows[start:start + tile].detach().requires_grad_(need_x)
                y = fn(xt)
                got = torch.autograd.grad(y, ([xt] if need_x else []) + wanted, grows[start:start + tile],
                                          allow_unused=True)
                if need_x:
                    grad_x[start:start + tile] = got[0]
                    got = got[1:]
                for i, g in enumerate(got):
                    if g is None:
                        continue
                    if len(tiles) == 1:
                        sums[i] = g
                    elif sums[i] is None:
                        sums[i] = g.to(torch.promote_types(g.dtype, torch.float32))  # fp32 (or wider) partial sums
                    else:
                        sums[i] += g
        out_p = iter(None if s is None else s.to(p.dtype) for s, p in zip(sums, wanted, strict=True))
        grads_p = [next(out_p) if n else None for n in need_p]
        return (None if grad_x is None else grad_x.view(x.shape), None, None, *grads_p)


def tiled_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int,
               params: list[torch.Tensor]) -> torch.Tensor:
    """fn(x) for a token-wise `fn` ([rows, d] -> [rows, d_out], each row independent of the others), run
    `tile` rows at a time and keeping only x for backward. `params`: the tensors fn uses that need gradients
    (they get them as if fn had run on all rows at once). fn must draw no random numbers."""
    return _TiledRows.apply(x, fn, tile, *params)


def worth_tiling(x: torch.Tensor, tile: int | None) -> bool:
    """Tiling pays (and is needed) only when gradients are recorded and there is more than one tile."""
    return bool(tile) and torch.is_grad_enabled() and x.numel() // max(x.shape[-1], 1) > tile
