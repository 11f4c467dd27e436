"""Linear layers (and embeddings) whose weight stays quantized in memory.

`GGUFWeight` holds one [n, k] GGUF tensor in the form its device computes with:
  * CPU (or CUDA without Triton): the file's blocks; forward dequantizes a band of output rows at a
    time with the exact codecs (bounded scratch), so a Q4_K_M model keeps about its file size in RAM.
  * CUDA, Q4_K/Q5_K/Q6_K/Q8_0: repacked once at load into the planar layout (kernels/gguf_pack.py,
    the file's bytes plus alignment) and multiplied by the Triton kernels (kernels/gguf_linear.py).
  * CUDA, any other type: dequantized once at load to the compute dtype; `fallback_notice` reports
    those tensors and what they cost, in one line.
`QuantLinear` and the GGUF token embedding wrap a GGUFWeight; a tied output head shares its
embedding's GGUFWeight, so the weight is stored once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType
from torch import nn

from devstral.errors import DevstralError
from devstral.quant.codec import dequantize
from devstral.quant.layout import row_bytes

if TYPE_CHECKING:  # the kernels are imported lazily here, where they run: the type only
    from devstral.kernels.gguf_pack import PackedGGUF

DEFAULT_CHUNK_BYTES = 16 << 20  # float32 scratch per band of rows (dequantizing needs a few times more)


def cuda_kernels(device: torch.device) -> bool:
    """Use the Triton kernels for weights on this device?"""
    if device.type != "cuda":
        return False
    from devstral.kernels import triton_available

    return triton_available()


class GGUFWeight(nn.Module):
    def __init__(self, raw: torch.Tensor, qtype: QType, n: int, k: int, *, name: str = "?",
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.qtype, self.n, self.k, self.name = QType(qtype), int(n), int(k), name
        per_row = row_bytes(self.qtype, self.k, name=name)
        raw = raw.reshape(-1)
        if raw.dtype != torch.uint8:
            raw = raw.view(torch.uint8)
        if raw.numel() != per_row * self.n:
            dequantize(raw, self.qtype, (self.n, self.k), name=name)  # raises the codec's error
        device = torch.device(device) if device is not None else raw.device
        self.file_bytes = raw.numel()
        self._packed = None
        self.mode = "blocks"
        if cuda_kernels(device):
            from devstral.kernels.gguf_pack import SUPPORTED, pack
            from devstral.kernels.gguf_splitk import counters

            counters(device)  # the split-K counters exist before any CUDA-graph capture
            try:
                if self.qtype in SUPPORTED:
                    self._packed = pack(raw.reshape(self.n, per_row), self.qtype, self.n, self.k, name=name,
                                        device=device)
                    self.register_buffer("planar", self._packed.buf, persistent=False)
                    self.mode = "planar"
                else:
                    dense = dequantize(raw.cpu(), self.qtype, (self.n, self.k), name=name)
                    self.register_buffer("dense", dense.to(device=device, dtype=dtype), persistent=False)
                    self.mode = "dense"
            except torch.OutOfMemoryError:
                what = "repacking" if self.qtype in SUPPORTED else f"dequantizing {self.qtype.name} to {dtype}"
                raise DevstralError(f"out of GPU memory {what} tensor {name}: use a smaller quantization, a "
                                    "GPU with more memory, or --device cpu") from None
        else:
            self.register_buffer("raw", raw.reshape(self.n, per_row).to(device), persistent=False)

    def share_rows_of(self, fused, start: int) -> None:
        """Drop this weight's own planar buffer for rows start.. of `fused` (a PackedGGUF holding this
        weight's rows among others, see fuse_quant)."""
        self._packed = fused.row_slice(start, start + self.n)
        self._buffers["planar"] = fused.buf  # one tensor object for every member: counted once

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self._packed is not None:
            self._packed = self._packed.rebind(self.planar)
        return out

    @property
    def packed(self):
        return self._packed

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def nbytes(self) -> int:
        if self.mode == "planar":
            return self._packed.nbytes()  # its own rows only, when it views a fused weight
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def rows(self, start: int = 0, stop: int | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows start..stop dequantized (exactly: the CUDA kernel matches the codec bit for bit)."""
        stop = self.n if stop is None else stop
        if self.mode == "planar":
            from devstral.kernels.gguf_dequant import dequantize as gpu_dequantize

            return gpu_dequantize(self._packed, start=start, stop=stop, dtype=dtype)
        if self.mode == "dense":
            return self.dense[start:stop].to(dtype)
        return dequantize(self.raw[start:stop], self.qtype, (stop - start, self.k), name=self.name).to(dtype)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows by index (embedding lookups): [len(ids), k]."""
        ids = ids.reshape(-1)
        if self.mode == "planar":
            from devstral.kernels.gguf_dequant import dequantize as gpu_dequantize

            return gpu_dequantize(self._packed, rows=ids.to(self.device), dtype=dtype)
        if self.mode == "dense":
            return F.embedding(ids.to(self.device), self.dense).to(dtype)
        rows = self.raw.index_select(0, ids.to(self.raw.device))
        return dequantize(rows.cpu(), self.qtype, (ids.numel(), self.k), name=self.name).to(device=ids.device,
                                                                                           dtype=dtype)


class QuantLinear(nn.Module):
    def __init__(self, raw: torch.Tensor | None, qtype: QType, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None, *, name: str = "?", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 weight: GGUFWeight | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.qtype = QType(qtype)
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.name = name
        self.weight_q = weight if weight is not None else GGUFWeight(raw, qtype, out_features, in_features,
                                                                     name=name, dtype=dtype)
        self.register_buffer("bias", bias, persistent=False)
        self.rows_per_chunk = max(1, chunk_bytes // (4 * self.in_features))
        # (add into, zero): int64 [1, out] buffers for one-row outputs in fixed point (quant/fixed_deltas.py)
        self.fixed_out: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fixed_group: list[QuantLinear] | None = None  # every layer sharing those buffers

    @property
    def raw(self) -> torch.Tensor:
        """The GGUF blocks [out, bytes per row] (CPU mode; on CUDA the weight is planar or dense)."""
        return self.weight_q.raw

    def dequantized_weight(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.weight_q.rows(start, stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_q
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if w.mode == "planar":
            if x.requires_grad and torch.is_grad_enabled():  # the kernels have no backward
                return F.linear(x, w.rows(dtype=x.dtype), bias)
            from devstral.kernels.gguf_linear import linear

            return linear(x, w.packed, self.bias, fixed=self._fixed(x, self.in_features))
        if w.mode == "dense":
            return F.linear(x, w.dense.to(x.dtype), bias)
        if self.out_features <= self.rows_per_chunk:
            return F.linear(x, self.dequantized_weight().to(device=x.device, dtype=x.dtype), bias)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, self.rows_per_chunk):
            stop = min(start + self.rows_per_chunk, self.out_features)
            wb = self.dequantized_weight(start, stop).to(device=x.device, dtype=x.dtype)
            out[..., start:stop] = F.linear(x, wb, None if bias is None else bias[start:stop])
        return out

    def forward_glu(self, pre: torch.Tensor) -> torch.Tensor:
        """forward(silu(gate) * up) from a gate/up projection's [.., gate | up] output: the planar GEMV
        applies the SwiGLU in its activation quantization (one launch fewer a layer), else silu_mul."""
        if self.weight_q.mode == "planar" and not (pre.requires_grad and torch.is_grad_enabled()):
            from devstral.kernels.gguf_linear import linear

            return linear(pre, self.weight_q.packed, self.bias, glu=True,
                          fixed=self._fixed(pre, 2 * self.in_features))
        from devstral.kernels.silu_mul import silu_mul

        return self(silu_mul(pre[..., :self.in_features], pre[..., self.in_features:]))

    def _fixed(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fixed-point buffers when this call is one activation row (fixed_deltas' protocol)."""
        return self.fixed_out if self.fixed_out is not None and x.numel() == k else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={self.qtype.name}, {self.weight_q.mode}, bias={self.bias is not None}")


class PackedProjection:
    """Several QuantLinears of one input as one planar weight (inference): at decode sizes q/k/v or
    gate/up run as one kernel launch instead of two or three; larger batches run each member's rows
    on their own, because those paths dequantize a band of rows into a bounded scratch and a fused
    weight too large for one band would cost a copy of the output. Returns one output per member.
    Deliberately not an nn.Module: the members keep their modules (names, LoRA, export) and view
    its rows."""

    FUSED_MAX_ROWS = 8  # the decode GEMVs' range (kernels/gguf_config.DECODE_MS)

    def __init__(self, packed, parts):
        self.packed, self.parts = packed, parts

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from devstral.kernels.gguf_linear import linear

        if x.numel() // x.shape[-1] > self.FUSED_MAX_ROWS:
            return tuple(linear(x, p) for p in self.parts)
        return linear(x, self.packed).split([p.n for p in self.parts], dim=-1)

    def joined(self, x: torch.Tensor) -> torch.Tensor | None:
        """The members' outputs side by side in one tensor [.., sum of rows] where one launch makes them
        (decode sizes), else None."""
        from devstral.kernels.gguf_linear import linear

        return None if x.numel() // x.shape[-1] > self.FUSED_MAX_ROWS else linear(x, self.packed)


class PairedProjection:
    """Two projections of one input whose weights cannot share one planar weight (their types differ:
    q and a fused k/v, or a fused q/k and v) -- each a planar QuantLinear or a PackedProjection -- as one
    launch at decode sizes (gguf_gemv_wide.gemv_pair): where both weights' plans are int8 streaming GEMVs,
    each keeps its tile width, sub-blocks a tile and split, in one grid, with the register-prefetch loop.
    Otherwise, and above the decode sizes, each member runs as it would alone. Returns every member's
    outputs in order (a PackedProjection's parts split). On unless DEVSTRAL_PAIR_GEMV=0 (pairs_projections())."""

    FUSED_MAX_ROWS = PackedProjection.FUSED_MAX_ROWS

    def __init__(self, first, second):
        self.members = (first, second)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cfgs = self._configs(x)
        if cfgs is None:
            return tuple(out for member in self.members for out in _outputs(member, x))
        from devstral.kernels.gguf_gemv_wide import gemv_pair

        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        packs = [_packed(member) for member in self.members]
        outs = [torch.empty(x2.shape[0], p.n, dtype=x.dtype, device=x.device) for p in packs]
        gemv_pair(x2, packs[0], cfgs[0], outs[0], packs[1], cfgs[1], outs[1])
        result = []
        for member, out in zip(self.members, outs, strict=True):
            out = out.reshape(*lead, out.shape[-1])
            result += out.split([p.n for p in member.parts], dim=-1) if isinstance(member, PackedProjection) else [out]
        return tuple(result)

    def _configs(self, x: torch.Tensor) -> tuple[dict, dict] | None:
        """Each weight's split-K constants for the paired launch, or None where it does not apply."""
        return self.configs_at(x.numel() // x.shape[-1], x.device)

    def configs_at(self, rows: int, device: torch.device) -> tuple[dict, dict] | None:
        """_configs for an input of `rows` rows on `device`."""
        from devstral.kernels import gguf_config
        from devstral.kernels.gguf_gemv_wide import bm_for, pairs_with

        if rows == 0 or rows > self.FUSED_MAX_ROWS:
            return None
        sms = gguf_config.sm_count(device) if device.type == "cuda" else 132
        cfgs = []
        for p in (_packed(member) for member in self.members):
            kind, cfg = gguf_config.gguf_plan(p.qtype.name, rows, p.n, p.k, device)
            if kind not in gguf_config.WIDE_INT8_KINDS or cfg.get("num_warps", 4) != 4:
                return None
            sub_block = 16 if p.qtype.name == "Q6_K" else 32
            # a stream-K plan has no split: the split-K rule's (about two programs an SM)
            split = cfg.get("split_k") or gguf_config.split_k(-(-p.n // cfg["bn"]), p.k // sub_block // cfg["ns"], sms)
            cfgs.append(dict(bn=cfg["bn"], ns=cfg["ns"], bm=bm_for(rows), split_k=split, num_warps=4))
        return (cfgs[0], cfgs[1]) if pairs_with(*cfgs) else None


def _packed(member):
    return member.packed if isinstance(member, PackedProjection) else member.weight_q.packed


def _planar_pack(m) -> PackedGGUF | None:
    """The planar GGUF weight of a PackedProjection or a planar QuantLinear, else None."""
    if isinstance(m, PackedProjection):
        return m.packed
    return m.weight_q.packed if type(m) is QuantLinear and m.weight_q.mode == "planar" else None


def _outputs(member, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return member(x) if isinstance(member, PackedProjection) else (member(x),)


def pairs_projections() -> bool:
    """Attention projections of different types share one launch (PairedProjection); DEVSTRAL_PAIR_GEMV=0
    turns it off (H200 decode: Devstral Q4_K_M 192.3 -> 195.4 tok/s, Mixtral Q4_K_M 293.3 -> 306.1)."""
    return os.environ.get("DEVSTRAL_PAIR_GEMV", "1") != "0"


def pair_quant(first, second) -> PairedProjection | None:
    """A PairedProjection of two planar projections (QuantLinear or PackedProjection) with one K and the
    int8 row dot, when pairs_projections(); else None."""
    from devstral.kernels.gguf_config import WIDE_INT8_TYPES

    packs = [_planar_pack(first), _planar_pack(second)]
    if not pairs_projections() or None in packs or any(getattr(m, "bias", None) is not None for m in (first, second)):
        return None
    if packs[0].k != packs[1].k or any(p.qtype.name not in WIDE_INT8_TYPES for p in packs):
        return None
    return PairedProjection(first, second)


def norm_writes_xq() -> bool:
    """Whether a norm whose output feeds int8 GEMVs also writes their quantized activations (decode_xq_layouts,
    kernels/rms_norm_triton.py: one launch fewer per such norm); DEVSTRAL_NORM_XQ=0 turns it off (for A/B runs)."""
    return os.environ.get("DEVSTRAL_NORM_XQ", "1") != "0"


def attention_xq_layouts(o_proj: nn.Module) -> dict[int, tuple[int, ...]]:
    """{rows: the gguf_xq layout o_proj quantizes its input in at that decode size}, where it does: what the decode
    attention's merge pass writes beside its output (kernels/paged_attention_triton.py: one launch fewer a
    layer). Empty when DEVSTRAL_ATTN_XQ=0 (for A/B runs)."""
    from devstral.kernels import gguf_config

    if os.environ.get("DEVSTRAL_ATTN_XQ", "1") == "0":
        return {}
    at = {r: decode_xq_layouts(o_proj, rows=(r,)) for r in range(1, gguf_config.DECODE_MS[-1] + 1)}
    return {r: layouts for r, layouts in at.items() if layouts}


def decode_xq_layouts(*projections, rows: Iterable[int] | None = None) -> tuple[int, ...]:
    """The gguf_xq layouts in which these projections of one input quantize it once (gguf_xq.quantize) at some
    decode size (1 to 8 rows, gguf_config.DECODE_MS; `rows`: at these row counts only): planar QuantLinears and
    PackedProjections whose plan there is "wide_xq" or "wide_tma", a PairedProjection where it pairs (else its
    members as they run alone). Other projections add none. What the norm before them writes beside its output
    (RMSNorm.xq_layouts)."""
    from devstral.kernels import gguf_config, gguf_xq
    from devstral.kernels.gguf_decode import qt_code

    rows = range(1, gguf_config.DECODE_MS[-1] + 1) if rows is None else tuple(rows)
    layouts = []

    def add(m) -> None:
        if isinstance(m, PairedProjection):
            packs = [_packed(member) for member in m.members]
            if any(m.configs_at(r, packs[0].device) is not None for r in rows):
                layouts.extend(gguf_xq.layout_for(qt_code(p.qtype)) for p in packs)
            for member in m.members:
                add(member)
            return
        p = _planar_pack(m)
        if p is not None and any(gguf_config.gguf_plan(p.qtype.name, r, p.n, p.k, p.device)[0] in ("wide_xq", "wide_tma")
                                 for r in rows):
            layouts.append(gguf_xq.layout_for(qt_code(p.qtype)))

    for projection in projections:
        add(projection)
    return tuple(dict.fromkeys(layouts))


def folds_swiglu(down: nn.Module) -> bool:
    """Whether an MLP hands this down projection the [gate | up] rows (QuantLinear.forward_glu) rather
    than silu_mul's output; DEVSTRAL_FOLD_SWIGLU=0 turns it off (for A/B runs)."""
    return type(down) is QuantLinear and os.environ.get("DEVSTRAL_FOLD_SWIGLU", "1") != "0"


def fuse_quant(*linears: nn.Module) -> PackedProjection | None:
    """One planar weight for these QuantLinears when they can share one (all planar on one device, one
    type and K, no bias, not fused already), their rows copied in order; each member then views its
    rows of it, so memory does not grow. None otherwise."""
    if not all(type(m) is QuantLinear and m.bias is None and m.weight_q.mode == "planar" for m in linears):
        return None
    packs = [m.weight_q.packed for m in linears]
    if any(p.rows_of is not None for p in packs) or len({(p.qtype, p.k, p.device) for p in packs}) != 1:
        return None
    from devstral.kernels.gguf_pack import concat_rows

    fused = concat_rows(packs)
    row = 0
    for m, p in zip(linears, packs, strict=True):
        m.weight_q.share_rows_of(fused, row)
        row += p.n
    return PackedProjection(fused, [m.weight_q.packed for m in linears])


def fallback_notice(model: nn.Module) -> str | None:
    """One line naming the GGUF tensors held dense on the GPU (no kernel for their type), or None."""
    seen, names, types, extra = set(), [], set(), 0
    for module in model.modules():
        if isinstance(module, GGUFWeight) and module.mode == "dense" and id(module) not in seen:
            seen.add(id(module))
            names.append(module.name)
            types.add(module.qtype.name)
            extra += module.nbytes() - module.file_bytes
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"note: no CUDA kernel for {'/'.join(sorted(types))}: {len(names)} tensors ({shown}) were "
            f"dequantized at load, {extra / (1 << 20):.0f} MiB more GPU memory than in the file")
