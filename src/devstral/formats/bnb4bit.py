"""bitsandbytes-4bit safetensors checkpoints (transformers' `quantization_config`, unsloth's `-bnb-4bit` repos).

Each quantized linear `X.weight` is stored by transformers' Linear4bit as
  X.weight                         the packed NF4 bytes, [numel/2, 1] (quant_storage may be wider than uint8)
  X.weight.absmax                  fp32 per 64 weights, or uint8 indices when double-quantized
  X.weight.quant_map               the 16 NF4 code values
  X.weight.nested_absmax           (double quant) fp32 scale per 256 absmax values
  X.weight.nested_quant_map        (double quant) the signed 8-bit dynamic map
  X.weight.quant_state.bitsandbytes__nf4   JSON bytes: quant_type, blocksize, shape, nested_offset, ...
which is exactly model/nf4.py's layout, so the bytes become an NF4Linear as they are, with no requantization.
The two maps are checked against the tables our NF4 code (and its kernels) use; a checkpoint with any
other map, FP4 or LLM.int8 weights is refused in one line naming the format.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from devstral.config import ModelConfig, read_json
from devstral.errors import DevstralError
from devstral.model.nf4 import ABSMAX_BLOCKSIZE, NF4Linear, NF4Tensor, dynamic_map_signed, nf4_code

_STATE = "quant_state.bitsandbytes__"
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_INT8_PARTS = ("SCB", "weight_format")  # what LLM.int8's Linear8bitLt writes beside its int8 weight


def bnb_quantization(folder: Path) -> dict | None:
    """The checkpoint's bitsandbytes quantization_config (4-bit NF4 only), or None for an unquantized model."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    qc = read_json(path).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
        return None
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise DevstralError(f"{path}: quantization_config is bitsandbytes LLM.int8 (8-bit), which devstral does not "
                            "load; use the 16-bit model or its bnb-4bit NF4 version")
    kind = qc.get("bnb_4bit_quant_type", "fp4")  # transformers' default when the key is absent
    if kind != "nf4":
        raise DevstralError(f"{path}: quantization_config.bnb_4bit_quant_type is {kind!r}; only bitsandbytes NF4 "
                            "4-bit checkpoints load (FP4 does not)")
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise DevstralError(f"{path}: quantization_config.bnb_4bit_quant_storage is {storage!r}; only uint8 "
                            "storage loads")
    return qc


def iter_model_weights(folder: Path, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device | str,
                       notice: bool = True,
                       shard: tuple[int, int] | None = None) -> Iterator[tuple[str, torch.Tensor | NF4Linear]]:
    """The loaders' one source of weights: plain tensors, plus NF4Linear layers from a bnb-4bit checkpoint.
    `notice`: say so when vision tensors are skipped (False when the vision encoder loads them)."""
    from devstral.formats.safetensors import iter_tensors

    if bnb_quantization(folder) is None:
        yield from iter_tensors(folder, cfg, dtype=dtype, device=device, notice=notice, shard=shard)
    elif shard is not None:
        raise DevstralError(f"{folder}: a bitsandbytes 4-bit checkpoint cannot be split with --tensor-parallel "
                            "(its blocks run across the split); use the 16-bit model, or fp8 with --quantize-on-load")
    else:
        yield from iter_bnb_weights(folder, cfg, dtype=dtype, device=device)


def _split(name: str) -> tuple[str, str]:
    """'...q_proj.weight.absmax' -> ('...q_proj.weight', 'absmax'); a plain tensor -> (name, '')."""
    for part in _PARTS + _INT8_PARTS:
        if name.endswith(".weight." + part):
            return name[: -len(part) - 1], part
    head, sep, kind = name.partition("." + _STATE)
    if sep:
        return head, _STATE + kind
    return name, ""


def _keep_dtype(name: str) -> bool:
    return _split(name)[1] != ""


def iter_bnb_weights(folder: Path, cfg: ModelConfig, *, dtype: torch.dtype,
                     device: torch.device | str) -> Iterator[tuple[str, torch.Tensor | NF4Linear]]:
    """(our name, tensor) for unquantized tensors and (X.weight, NF4Linear) for each quantized linear, in
    file order; the parts of one weight are held only until the last of them has been read."""
    from devstral.formats.safetensors import iter_tensors

    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in iter_tensors(folder, cfg, dtype=dtype, device=device, keep_dtype=_keep_dtype):
        weight, part = _split(name)
        if part in _INT8_PARTS:
            raise DevstralError(f"{folder}: tensor {name} is bitsandbytes LLM.int8 (8-bit) data, which devstral "
                                "does not load; use the 16-bit model or its bnb-4bit NF4 version")
        if part.startswith(_STATE) and part != _STATE + "nf4":
            raise DevstralError(f"{folder}: tensor {weight} is bitsandbytes {part[len(_STATE):].upper()}; only "
                                "NF4 4-bit checkpoints load")
        if not part and weight not in pending and not _looks_packed(t):
            yield name, t
            continue
        parts = pending.setdefault(weight, {})
        parts[part or "weight"] = t
        layer = _assemble(folder, weight, parts)
        if layer is not None:
            del pending[weight]
            yield weight, layer
    if pending:
        weight, parts = next(iter(pending.items()))
        need = _needed(folder, weight, parts) if _STATE + "nf4" in parts else ["quant_state.bitsandbytes__nf4"]
        missing = [p for p in need if p not in parts]
        raise DevstralError(f"{folder}: tensor {weight} is bitsandbytes-4bit but {weight}.{missing[0]} is missing")


def _looks_packed(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and t.dim() == 2 and t.shape[1] == 1


def _state(folder: Path, weight: str, raw: torch.Tensor) -> dict:
    try:
        state = json.loads(bytes(raw.cpu().numpy().tobytes()).decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError
        return state
    except (ValueError, UnicodeDecodeError):
        raise DevstralError(f"{folder}: {weight}.quant_state.bitsandbytes__nf4 is not valid JSON") from None


def _needed(folder: Path, weight: str, parts: dict[str, torch.Tensor]) -> list[str]:
    state = _state(folder, weight, parts[_STATE + "nf4"])
    need = ["weight", "absmax", "quant_map"]
    return need + ["nested_absmax", "nested_quant_map"] if "nested_offset" in state else need


def _assemble(folder: Path, weight: str, parts: dict[str, torch.Tensor]) -> NF4Linear | None:
    if _STATE + "nf4" not in parts or any(p not in parts for p in _needed(folder, weight, parts)):
        return None
    state = _state(folder, weight, parts[_STATE + "nf4"])
    where = f"{folder}: {weight}.quant_state"
    try:
        shape = tuple(int(d) for d in state["shape"])
        blocksize = int(state["blocksize"])
    except (KeyError, TypeError, ValueError):
        raise DevstralError(f"{where} lacks a valid shape/blocksize") from None
    if state.get("quant_type", "nf4") != "nf4":
        raise DevstralError(f"{where}: quant_type is {state.get('quant_type')!r}; only NF4 loads")
    if len(shape) != 2 or blocksize <= 0 or blocksize % 2:
        raise DevstralError(f"{where}: shape {list(shape)} / blocksize {blocksize} is not a 2-D NF4 weight")
    numel = shape[0] * shape[1]
    n_blocks = -(-numel // blocksize)
    packed = parts["weight"].contiguous().view(torch.uint8).reshape(-1)
    if packed.numel() != -(-numel // 2):
        raise DevstralError(f"{folder}: {weight} holds {packed.numel()} bytes, but shape {list(shape)} packs "
                            f"into {-(-numel // 2)}")
    _same_table(folder, f"{weight}.quant_map", parts["quant_map"], nf4_code())
    absmax = parts["absmax"].reshape(-1)
    if absmax.numel() != n_blocks:
        raise DevstralError(f"{folder}: {weight}.absmax has {absmax.numel()} values, expected {n_blocks}")
    q = NF4Tensor(packed=packed, shape=shape, absmax=None, blocksize=blocksize)
    if "nested_offset" in state:
        if int(state.get("nested_blocksize", ABSMAX_BLOCKSIZE)) != ABSMAX_BLOCKSIZE:
            raise DevstralError(f"{where}: nested_blocksize {state.get('nested_blocksize')} is not supported "
                                f"(only {ABSMAX_BLOCKSIZE})")
        _same_table(folder, f"{weight}.nested_quant_map", parts["nested_quant_map"], dynamic_map_signed())
        scale = parts["nested_absmax"].reshape(-1).float()
        if absmax.dtype != torch.uint8 or scale.numel() != -(-n_blocks // ABSMAX_BLOCKSIZE):
            raise DevstralError(f"{folder}: {weight}.absmax / nested_absmax do not match a double-quantized "
                                f"NF4 weight of shape {list(shape)}")
        q.absmax_q, q.absmax_scale, q.absmax_offset = absmax, scale, float(state["nested_offset"])
    else:
        q.absmax = absmax.float()
    return NF4Linear.from_nf4(q)


def _same_table(folder: Path, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got = got.reshape(-1).float().cpu()
    if got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=1e-7):
        raise DevstralError(f"{folder}: {name} is not bitsandbytes' standard table; a custom map is not supported")
