"""NF4 (4-bit NormalFloat) weights, laid out the way bitsandbytes stores them, and a linear that uses them.

Blockwise: each block of 64 consecutive weights (row-major) keeps one absmax; each weight becomes the
index of the nearest of 16 code values (bitsandbytes' published NF4 table) after dividing by that absmax.
Two indices share a byte, the first in the high nibble. Double quantization stores the absmax values
minus their mean as 8-bit indices into bitsandbytes' signed dynamic map, in blocks of 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256  # double quantization of the absmax values

# bitsandbytes' NF4 code values (functional.py / kernels.cu), in index order 0..15.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True, max_exponent_bits=7)).

    For each decade 10^-6 .. 10^0 the map holds the midpoints of an even split of [0.1, 1] scaled by that
    decade, with both signs; the number of splits doubles per decade. Plus 0 and 1, padded with zeros to
    256 entries and sorted.
    """
    values: list[float] = []
    exponent_bits, non_sign_bits = 7, 7
    for i in range(exponent_bits):
        n = int(2 ** (i + non_sign_bits - exponent_bits) + 1)
        edges = torch.linspace(0.1, 1, n, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(exponent_bits - 1) + i)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)


def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (ties go to the lower index), via the midpoints of the sorted code."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(values, mids, right=False).to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (uint8 indices into the dynamic map, fp32 absmax per block)."""
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    code = dynamic_map_signed().to(x.device)
    return _nearest(scaled, code).reshape(-1)[: x.numel()], absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, n: int,
                              blocksize: int = ABSMAX_BLOCKSIZE) -> torch.Tensor:
    code = dynamic_map_signed().to(q.device)
    values = code[q.long()]
    pad = (-values.numel()) % blocksize
    values = torch.cat([values, values.new_zeros(pad)]).view(-1, blocksize) * absmax[:, None]
    return values.reshape(-1)[:n]


@dataclass
class NF4Tensor:
    """A weight in NF4: packed nibbles plus the per-block absmax (optionally itself 8-bit quantized)."""

    packed: torch.Tensor  # uint8 [ceil(numel/2)]
    shape: tuple[int, ...]
    absmax: torch.Tensor | None  # fp32 [n_blocks] without double quantization
    absmax_q: torch.Tensor | None = None  # uint8 [n_blocks] with double quantization
    absmax_scale: torch.Tensor | None = None  # fp32 [ceil(n_blocks/256)]
    absmax_offset: float = 0.0
    blocksize: int = BLOCKSIZE

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def block_absmax(self) -> torch.Tensor:
        if self.absmax is not None:
            return self.absmax
        assert self.absmax_q is not None and self.absmax_scale is not None
        n_blocks = self.absmax_q.numel()
        return dequantize_blockwise_8bit(self.absmax_q, self.absmax_scale, n_blocks) + self.absmax_offset

    def nbytes(self) -> int:
        tensors = [self.packed, self.absmax, self.absmax_q, self.absmax_scale]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize_nf4(w: torch.Tensor, *, blocksize: int = BLOCKSIZE, double_quant: bool = False) -> NF4Tensor:
    blocks = _blocks(w, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    idx = _nearest(scaled, nf4_code(w.device)).reshape(-1)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    packed = (idx[0::2] << 4) | idx[1::2]
    out = NF4Tensor(packed=packed, shape=tuple(w.shape), absmax=absmax, blocksize=blocksize)
    if double_quant:
        # bitsandbytes centres the absmax values on their mean before the 8-bit blockwise quantization.
        offset = float(absmax.mean())
        q, scale = quantize_blockwise_8bit(absmax - offset)
        out.absmax, out.absmax_q, out.absmax_scale, out.absmax_offset = None, q, scale, offset
    return out


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    idx = torch.stack([t.packed >> 4, t.packed & 0x0F], dim=1).reshape(-1)[: _padded(t.numel, t.blocksize)]
    values = nf4_code(t.packed.device)[idx.long()].view(-1, t.blocksize) * t.block_absmax()[:, None]
    return values.reshape(-1)[: t.numel].view(t.shape).to(dtype)


def _cuda_kernels(t: torch.Tensor) -> bool:
    from devstral.quant.linear import cuda_kernels

    return cuda_kernels(t.device)


def _padded(n: int, blocksize: int) -> int:
    return n + (-n) % blocksize


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized in forward and again in backward, so no full-precision copy is kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.weight_nf4_dequantized(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen bias-free linear whose weight lives in NF4; the matmul runs in the input's (autocast) dtype."""

    def __init__(self, weight: torch.Tensor, *, double_quant: bool = False, blocksize: int = BLOCKSIZE):
        super().__init__()
        self._store(quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant))

    @classmethod
    def from_nf4(cls, q: NF4Tensor) -> NF4Linear:
        """A layer over weights that are already NF4 (a bitsandbytes-4bit checkpoint), used as they are."""
        if len(q.shape) != 2:
            raise ValueError(f"an NF4 linear weight must be 2-D, got shape {list(q.shape)}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._store(q)
        return layer

    def _store(self, q: NF4Tensor) -> None:
        self.out_features, self.in_features = q.shape
        self.blocksize, self.absmax_offset, self.double_quant = q.blocksize, q.absmax_offset, q.absmax is None
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax if q.absmax is not None else q.absmax_q)
        self.register_buffer("absmax_scale", q.absmax_scale)

    def nf4(self) -> NF4Tensor:
        if self.double_quant:
            return NF4Tensor(self.packed, (self.out_features, self.in_features), None, self.absmax,
                             self.absmax_scale, self.absmax_offset, self.blocksize)
        return NF4Tensor(self.packed, (self.out_features, self.in_features), self.absmax, blocksize=self.blocksize)

    def weight_nf4_dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if _cuda_kernels(self.packed):
            from devstral.kernels import nf4_kernels

            return nf4_kernels.dequantize(self.nf4(), dtype)
        return dequantize_nf4(self.nf4(), dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T: on CUDA a Triton NF4 GEMV for a few rows (kernels/nf4_kernels.py), else dequantize."""
        if _cuda_kernels(x):
            from devstral.kernels import nf4_kernels
            from devstral.kernels.gguf_config import nf4_plan

            t = self.nf4()
            x2 = x.reshape(-1, self.in_features)
            kind, cfg = nf4_plan(x2.shape[0], self.out_features, self.in_features, x.device)
            # (inside _NF4Matmul.forward autograd is off; its backward uses the dequantized weight)
            if kind == "gemv" and nf4_kernels.gemv_supported(t) and x2.shape[0] > 0:
                out = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
                nf4_kernels.gemv(x2.contiguous(), t, None, out, **cfg)
                return out.reshape(*x.shape[:-1], self.out_features)
        return x @ self.weight_nf4_dequantized(x.dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            return _NF4Matmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, double_quant={self.double_quant}"
