"""--quantize-on-load {q8_0,q4_k,fp8}: quantize a safetensors model tensor by tensor as it loads.

Tensors stream from disk one at a time (formats/safetensors.iter_tensors); each linear weight is
quantized on the target device the moment it arrives and its 16-bit copy is dropped, so the peak is
the quantized model plus one 16-bit tensor: a 24B model fits a GPU that could not hold its bf16
weights. Embeddings and norms stay in the compute dtype.

What each choice does (fast: no importance search, no imatrix):
* q8_0: llama.cpp's Q8_0 exactly (per 32 weights, d = max|w| / 127, round to nearest); the bytes
  equal quant.quantize(w, Q8_0). Kept in the planar layout for the GGUF kernels.
* q4_k: Q4_K blocks from one least-squares pass instead of llama.cpp's 20-candidate search: each
  32-weight sub-block starts from its min/max, the levels it gives are refit once (scale and min by
  least squares), then the eight scales and mins are stored as 6-bit multiples of two fp16s and
  the weights requantized against them. The output head uses q8_0 (like llama.cpp's Q4_K_M, which
  keeps it at higher precision). Rows must be multiples of 256 weights, else q8_0 is used.
* fp8: e4m3 with one fp32 scale per output channel (kernels/fp8_linear.py); torch._scaled_mm for
  large batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType as QType
from torch import nn

from devstral.errors import DevstralError
from devstral.quant.kquants import _f16_pair, _pack_k4_scales, _requantize_affine  # the codec's own packing
from devstral.quant.legacy import quantize_q8_0

KINDS = ("q8_0", "q4_k", "fp8")
_CHUNK_WEIGHTS = 1 << 24  # fp32 temporaries per chunk stay a few hundred MB at most


def parse_kind(kind: str | None) -> str | None:
    if kind is None or kind == "" or kind == "none":
        return None
    k = kind.lower()
    if k not in KINDS:
        raise DevstralError(f"--quantize-on-load: unknown value {kind!r} (choose {', '.join(KINDS)})")
    return k


def quantize_q4_k_fast(rows: torch.Tensor) -> torch.Tensor:
    """float32 [R, C] (C % 256 == 0) -> Q4_K blocks uint8 [R, C / 256 * 144], one refit per sub-block."""
    x = rows.reshape(-1, 8, 32)
    n = x.shape[0]
    xmin = x.amin(dim=2).clamp(max=0)
    xmax = x.amax(dim=2)
    span = xmax - xmin
    flat = span <= 0
    scale = torch.where(flat, 0, span / 15)
    levels = torch.round((x - xmin[..., None]) / torch.where(flat, 1, scale)[..., None]).clamp_(0, 15)
    # least squares for x ~ s * L - m over the sub-block, with the levels fixed
    sl, sl2 = levels.sum(2), (levels * levels).sum(2)
    sx, sxl = x.sum(2), (x * levels).sum(2)
    det = 32 * sl2 - sl * sl
    ok = det > 0
    s_fit = (32 * sxl - sx * sl) / torch.where(ok, det, 1)
    m_fit = (s_fit * sl - sx) / 32
    good = ok & (s_fit > 0) & (m_fit >= 0)
    scale = torch.where(good, s_fit, scale)
    the_min = torch.where(good, m_fit, -xmin)
    max_scale = scale.amax(dim=1, keepdim=True)
    max_min = the_min.amax(dim=1, keepdim=True)
    ls = torch.round(torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, 1), 0) * scale)
    lm = torch.round(torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, 1), 0) * the_min)
    ls, lm = ls.clamp_(0, 63).long(), lm.clamp_(0, 63).long()
    d = (max_scale.squeeze(1) / 63).to(torch.float16)
    dmin = (max_min.squeeze(1) / 63).to(torch.float16)
    q = _requantize_affine(rows, ls, lm, d, dmin, 15).reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    blocks = torch.cat((_f16_pair(d), _f16_pair(dmin), _pack_k4_scales(ls, lm), qs), dim=1)
    return blocks.reshape(rows.shape[0], -1)


def quantize_rows(w: torch.Tensor, qtype: QType) -> torch.Tensor:
    """[N, K] float on any device -> GGUF blocks uint8 [N, bytes per row] on that device, in row chunks."""
    n, k = w.shape
    per = {QType.Q8_0: 34 * (k // 32), QType.Q4_K: 144 * (k // 256)}[qtype]
    fn = quantize_q8_0 if qtype == QType.Q8_0 else (lambda r, _imatrix=None: quantize_q4_k_fast(r))
    out = torch.empty(n, per, dtype=torch.uint8, device=w.device)
    step = max(1, _CHUNK_WEIGHTS // k)
    for r0 in range(0, n, step):
        chunk = w[r0:r0 + step].float()
        if not torch.isfinite(chunk).all():
            raise DevstralError(f"non-finite weights in rows {r0}..{r0 + len(chunk) - 1}: cannot quantize them")
        out[r0:r0 + step] = fn(chunk)
    return out


def _type_for(kind: str, name: str, k: int) -> QType | None:
    if kind == "q4_k" and k % 256 == 0 and name != "lm_head.weight":
        return QType.Q4_K
    if k % 32 == 0:
        return QType.Q8_0
    return None


def make_setter(kind: str, *, dtype: torch.dtype, default: Callable) -> Callable[[nn.Module, str, torch.Tensor], None]:
    """A replacement for the loader's "set this parameter": linear weights are swapped for their
    quantized module; everything else goes through `default`."""
    from devstral.quant.linear import QuantLinear

    def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if attr == "bias" and not isinstance(module, nn.Linear) and hasattr(module, "bias"):
            module.bias = tensor.to(dtype)  # a bias that arrives after its (already quantized) weight
            return
        if attr != "weight" or not isinstance(module, nn.Linear) or tensor.dim() != 2:
            default(model, name, tensor)
            return
        n, k = tensor.shape
        bias = module.bias if module.bias is not None and not module.bias.is_meta else None
        if kind == "fp8":
            from devstral.kernels.fp8_linear import FP8Linear

            new: nn.Module = FP8Linear(tensor, bias, name=name)
        else:
            qtype = _type_for(kind, name, k)
            if qtype is None:
                default(model, name, tensor)
                return
            new = QuantLinear(quantize_rows(tensor, qtype), qtype, n, k, bias, name=name, dtype=dtype)
        del tensor
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)

    return set_tensor

