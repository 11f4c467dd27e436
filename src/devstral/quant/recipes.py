"""Which GGML type each tensor gets for a file type (Q4_K_M, ...), following llama.cpp's llama-quant.cpp.

Tensor names are GGUF names (`blk.N.attn_v.weight`, `token_embd.weight`, `output.weight`, ...);
shapes are PyTorch shapes, so shape[-1] is the row length that must hold whole blocks.
"""

from __future__ import annotations

import re

from gguf import GGMLQuantizationType as QType

from devstral.errors import DevstralError
from devstral.quant.codec import QUANTIZABLE
from devstral.quant.imatrix import read_imatrix
from devstral.quant.layout import block_info

__all__ = ["FILE_TYPES", "choose_type", "fallback_type", "parse_tensor_type_override", "read_imatrix",
           "use_more_bits"]

# file type -> the type most tensors get
FILE_TYPES: dict[str, QType] = {
    "F32": QType.F32, "F16": QType.F16, "BF16": QType.BF16,
    "Q8_0": QType.Q8_0, "Q6_K": QType.Q6_K,
    "Q5_K_M": QType.Q5_K, "Q5_K_S": QType.Q5_K, "Q4_K_M": QType.Q4_K, "Q4_K_S": QType.Q4_K,
    "Q5_0": QType.Q5_0, "Q4_0": QType.Q4_0,
}

# llama-quant.cpp tensor_type_fallback: a 256-block type on a row that is not a multiple of 256
_FALLBACK: dict[QType, QType] = {
    QType.Q2_K: QType.Q4_0, QType.Q3_K: QType.Q4_0, QType.Q4_K: QType.Q5_0,
    QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0, QType.IQ4_XS: QType.IQ4_NL,
}

_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers llama.cpp's _M mixes give more bits: the first and last eighth, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fallback_type(qtype: QType, n_cols: int, *, name: str = "?") -> QType:
    """The type llama.cpp uses instead of `qtype` when rows of `n_cols` do not hold whole blocks."""
    block_size, _ = block_info(qtype)
    if n_cols % block_size == 0:
        return qtype
    if qtype not in _FALLBACK:
        raise DevstralError(f"tensor {name}: row length {n_cols} does not fit {qtype.name} blocks "
                            f"and {qtype.name} has no fallback type")
    fallback = _FALLBACK[qtype]
    return fallback if n_cols % block_info(fallback)[0] == 0 else QType.F16


def _is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    # llama-quant.cpp tensor_allows_quantization, the parts that apply to dense Mistral/llama models
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def _layer(name: str) -> int:
    m = _LAYER.search(name)
    if not m:
        raise DevstralError(f"tensor {name}: cannot tell its layer (expected 'blk.N.' in the name)")
    return int(m.group(1))


def _mix(name: str, qtype: QType, n_cols: int, ftype: str, n_layers: int, tied: bool,
         has_imatrix: bool, n_experts: int = 0) -> QType:
    """llama_tensor_get_type_impl for the file types in FILE_TYPES.

    Mixture-of-experts models: `ffn_down_exps` follows the ffn_down rule with its layer read from the
    name (as llama.cpp's layer_info does when n_expert > 1), `ffn_gate_exps` / `ffn_up_exps` keep the
    file type, and with exactly 8 experts llama.cpp spends the bits the experts save on attention:
    attn_v and attn_k become Q8_0, attn_output Q5_K in the Q4_K mixes."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if n_cols % block_info(qtype)[0]:
            return QType.Q8_0
        return qtype if qtype is QType.Q8_0 else QType.Q6_K
    if name == "token_embd.weight":
        return qtype
    if any(k in name for k in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")):
        i = _layer(name)
        if n_experts == 8:
            return QType.Q8_0
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            return QType.Q6_K
        if ftype == "Q4_K_S" and i < 4:
            return QType.Q5_K
        return qtype
    if "attn_k.weight" in name and n_experts == 8:
        return QType.Q8_0
    if "attn_output.weight" in name and n_experts == 8 and ftype in ("Q4_K_S", "Q4_K_M"):
        return QType.Q5_K
    if "ffn_down" in name:
        i = _layer(name)
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            return QType.Q6_K
        if ftype == "Q4_K_S" and i < n_layers // 8:
            return QType.Q5_K
        if ftype in ("Q4_0", "Q5_0") and has_imatrix and i < n_layers // 8:
            return QType.Q4_1 if ftype == "Q4_0" else QType.Q5_1
    return qtype


def choose_type(name: str, shape: tuple[int, ...], ftype: str, n_layers: int,
                overrides: list[tuple[re.Pattern, QType]], *, tied_embeddings: bool = False,
                has_imatrix: bool = False, n_experts: int = 0) -> QType:
    """The GGML type for one tensor of a `ftype` file (llama_tensor_get_type).

    Norms, 1-D tensors and non-weights stay F32. `overrides` are (pattern, type) pairs from
    --tensor-type; the first pattern found in the name wins and replaces the mix rule. Rows that
    do not hold whole blocks of the chosen type fall back to a 32-block type (or F16).
    `tied_embeddings`: the model has no output.weight, so token_embd is quantized like it.
    `n_experts`: the model's expert count (0 for a dense model); the router (ffn_gate_inp) stays F32.
    """
    key = ftype.upper()
    if key not in FILE_TYPES:
        raise DevstralError(f"unknown quantization type {ftype!r}; choose one of {', '.join(FILE_TYPES)}")
    shape = tuple(int(s) for s in shape)
    if not _is_quantizable(name, shape):
        return QType.F32
    default = FILE_TYPES[key]
    if default in (QType.F32, QType.F16, QType.BF16):
        return default
    for pattern, qtype in overrides:
        if pattern.search(name):
            chosen = qtype
            break
    else:
        chosen = _mix(name, default, shape[-1], key, n_layers, tied_embeddings, has_imatrix, n_experts)
    return fallback_type(chosen, shape[-1], name=name)


def parse_tensor_type_override(value: str) -> tuple[re.Pattern, QType]:
    """`REGEX=TYPE` as llama-quantize's --tensor-type takes it (pattern lowercased, type any case)."""
    pattern, sep, type_name = value.partition("=")
    if not sep:
        raise DevstralError(f"--tensor-type {value!r}: expected REGEX=TYPE, e.g. 'attn_v=q8_0'")
    if not pattern:
        raise DevstralError(f"--tensor-type {value!r}: missing tensor name pattern before '='")
    if not type_name:
        raise DevstralError(f"--tensor-type {value!r}: missing quantization type after '='")
    try:
        qtype = QType[type_name.strip().upper()]
    except KeyError:
        raise DevstralError(f"--tensor-type {value!r}: unknown type {type_name!r}") from None
    if qtype not in QUANTIZABLE:
        supported = ", ".join(sorted(t.name for t in QUANTIZABLE))
        raise DevstralError(f"--tensor-type {value!r}: cannot quantize to {qtype.name}; supported: {supported}")
    try:
        compiled = re.compile(pattern.lower())
    except re.error as e:
        raise DevstralError(f"--tensor-type {value!r}: bad regular expression: {e}") from None
    return compiled, qtype
