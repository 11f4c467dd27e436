"""A GGUF file -> our Transformer, with quantized weights kept as GGUF blocks in memory.

Quantized linears become `QuantLinear` and a quantized token embedding `QuantEmbedding`, both over a
`GGUFWeight` (quant/linear.py): on CPU the blocks stay memory-mapped from the file, as llama.cpp does,
and are dequantized a band of rows at a time; on CUDA they are repacked for the Triton kernels.
Float tensors (norms, F16/F32 weights) are materialized in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as QType
from torch import nn

from devstral.config import ModelConfig
from devstral.errors import DevstralError
from devstral.formats.finite import check_finite, check_finite_blocks
from devstral.formats.gguf_config import config_from_gguf
from devstral.formats.gguf_names import expert_parts, from_gguf_name, rotary_heads, rotate_half_row_order
from devstral.formats.gguf_read import GGUFFile
from devstral.formats.gguf_tokenizer import GGUFTokenizer
from devstral.parallel.sharding import rank_slice

FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class QuantEmbedding(nn.Module):
    """Token embedding stored as GGUF blocks; a lookup dequantizes just the rows it needs (on CUDA with
    the Triton kernel, no host round trip)."""

    def __init__(self, raw: torch.Tensor, qtype: QType, num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype, *, name: str = "token_embd.weight"):
        super().__init__()
        from devstral.quant.linear import GGUFWeight

        self.qtype, self.num_embeddings, self.embedding_dim = QType(qtype), num_embeddings, embedding_dim
        self.dtype, self.name = dtype, name
        self.weight_q = GGUFWeight(raw, qtype, num_embeddings, embedding_dim, name=name, dtype=dtype)

    @property
    def raw(self) -> torch.Tensor:
        return self.weight_q.raw

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.weight_q.lookup(tokens, self.dtype).to(tokens.device)
        return out.reshape(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}, {self.weight_q.mode}"


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    """The same rule as safetensors models: bf16 on CUDA; on CPU fp32 for small models, bf16 for big ones
    (an F16 GGUF of a 24B model must not become 96 GB of fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    from devstral.devices import resolve_dtype

    return resolve_dtype(dtype, device, cfg)


def gguf_config(g: GGUFFile) -> ModelConfig:
    emb = g.infos.get("token_embd.weight")
    if emb is None:
        raise DevstralError(f"{g.path}: tensor token_embd.weight is missing")
    return config_from_gguf(g.metadata, source=str(g.path), vocab_size=emb.shape[0],
                            has_output="output.weight" in g.infos)


def check_gguf_config_against_tensors(g: GGUFFile, cfg: ModelConfig) -> None:
    """The metadata's sizes against the tensor table, before a model is built from them."""
    arch = g.metadata.get("general.architecture")
    layers = {int(m.group(1)) for name in g.tensor_names if (m := _BLOCK.match(name))}
    n_layers = max(layers) + 1 if layers else 0
    if n_layers != cfg.n_layers:
        raise DevstralError(f"{g.path}: {arch}.block_count is {cfg.n_layers} but the file holds {n_layers} layers")
    emb = g.infos["token_embd.weight"]
    if len(emb.shape) != 2 or emb.shape[1] != cfg.dim:
        raise DevstralError(f"{g.path}: {arch}.embedding_length is {cfg.dim} but token_embd.weight has shape "
                            f"{list(emb.shape)}")


def load_gguf_model(path: str | Path, *, device: torch.device | str = "cpu", dtype: str | torch.dtype = "auto",
                    shard: tuple[int, int] | None = None):
    """(Transformer, ModelConfig, GGUFTokenizer) from a .gguf file (or the first part of a split one).

    `shard=(rank, world)` keeps only that tensor-parallel rank's slice of each split weight
    (parallel/sharding.py), cut from the file's blocks: whole rows, or for row-parallel weights the
    same run of whole blocks in every row (the split must fall on a block boundary)."""
    from devstral.model.rope import Rotary
    from devstral.model.transformer import Transformer
    from devstral.quant.linear import QuantLinear, fallback_notice

    device = torch.device(device)
    g = GGUFFile(path)
    cfg = gguf_config(g)
    tokenizer = GGUFTokenizer(g.metadata, source=str(g.path))
    check_gguf_config_against_tensors(g, cfg)
    torch_dtype = _resolve_dtype(dtype, device, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    loaded: set[str] = set()
    skipped = []
    for gname in g.tensor_names:
        parts = expert_parts(gname, cfg.n_experts)
        if parts is not None:  # a stacked expert tensor: one module per expert, each its slice of rows
            _load_expert_stack(model, g, gname, parts, expected, device, torch_dtype)
            loaded.update(parts)
            continue
        ours = from_gguf_name(gname)
        if ours is None:
            if gname.startswith("blk."):
                raise DevstralError(f"{g.path}: unexpected tensor {gname} for architecture {g.architecture}")
            skipped.append(gname)
            continue
        info = g.info(gname)
        if info.shape != expected[ours]:
            raise DevstralError(f"{g.path}: tensor {gname} has shape {list(info.shape)} but the metadata implies "
                                f"{list(expected[ours])}")
        heads = rotary_heads(gname, cfg.n_heads, cfg.n_kv_heads)
        raw = g.raw_torch(gname).reshape(info.shape[0], -1)
        part = rank_slice(ours, info.shape, *shard) if shard is not None else None
        if heads is not None:
            order = rotate_half_row_order(info.shape[0], heads)
            if part is not None:  # a rank's rows are whole heads, and the reordering stays inside a head
                order = order[part.start:part.stop]
            raw = raw.index_select(0, order)
        elif part is not None and part.dim == 0:
            raw = raw[part.start:part.stop]
        if part is not None and part.dim == 1:
            raw = _column_blocks(raw, info.qtype, part, gname, shard[1])
        if part is not None:
            shape = list(info.shape)
            shape[part.dim] = part.stop - part.start
            info = dataclasses.replace(info, shape=tuple(shape))
        if info.qtype in FLOAT_TYPES or info.qtype not in _quantized_ok():
            from devstral.quant import dequantize

            w = dequantize(raw, info.qtype, info.shape, name=gname).to(device=device, dtype=torch_dtype)
            check_finite(w, gname, g.path)
            _set_parameter(model, ours, w)
        elif ours == "model.embed_tokens.weight":
            check_finite_blocks(raw, info.qtype, gname, g.path)
            model.model.embed_tokens = QuantEmbedding(raw.to(device), info.qtype, *info.shape, torch_dtype)
        else:
            check_finite_blocks(raw, info.qtype, gname, g.path)
            module_name = ours.rsplit(".", 1)[0]
            out_f, in_f = info.shape
            _set_module(model, module_name, QuantLinear(raw.to(device), info.qtype, out_f, in_f, name=gname,
                                                        dtype=torch_dtype))
        loaded.add(ours)
    if "lm_head.weight" not in loaded and "model.embed_tokens.weight" in loaded:
        emb = model.model.embed_tokens
        if isinstance(emb, QuantEmbedding):
            model.lm_head = QuantLinear(None, emb.qtype, emb.num_embeddings, emb.embedding_dim,
                                        name="token_embd.weight (tied output)", weight=emb.weight_q)
        else:
            model.lm_head.weight = emb.weight
        loaded.add("lm_head.weight")
    missing = sorted(set(expected) - loaded)
    if missing:
        raise DevstralError(f"{g.path}: tensor {missing[0]} is missing" +
                            (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if skipped:
        print(f"note: ignored {len(skipped)} tensors the text model does not use ({skipped[0]}, ...)",
              file=sys.stderr)
    notice = fallback_notice(model)
    if notice:
        print(notice, file=sys.stderr)
    model.rotary = Rotary(cfg).to(device)
    return model.eval().requires_grad_(False), cfg, tokenizer


def _column_blocks(raw: torch.Tensor, qtype: QType, part, name: str, world: int) -> torch.Tensor:
    """Columns part.start..part.stop of every row, as whole blocks of the row's bytes."""
    from devstral.quant.layout import block_info

    block, block_bytes = block_info(qtype)
    if part.start % block or part.stop % block:
        raise DevstralError(f"--tensor-parallel {world}: {name} ({QType(qtype).name}, {block}-weight blocks) would "
                            f"be split at column {part.stop - part.start}, inside a block; use a tensor-parallel "
                            "size that keeps whole blocks, or a safetensors model")
    return raw[:, part.start // block * block_bytes:part.stop // block * block_bytes]


def _load_expert_stack(model: nn.Module, g: GGUFFile, gname: str, parts: tuple[str, ...], expected: dict,
                       device: torch.device, torch_dtype: torch.dtype) -> None:
    from devstral.quant.linear import QuantLinear

    info = g.info(gname)
    want = (len(parts), *expected[parts[0]]) if parts and parts[0] in expected else None
    if want is None or tuple(info.shape) != want:
        raise DevstralError(f"{g.path}: tensor {gname} has shape {list(info.shape)} but the metadata implies "
                            f"{list(want) if want else 'no experts'}")
    n_exp, out_f, in_f = info.shape
    raw = g.raw_torch(gname).reshape(n_exp * out_f, -1)
    for e, ours in enumerate(parts):
        rows = raw[e * out_f:(e + 1) * out_f]
        if info.qtype in FLOAT_TYPES or info.qtype not in _quantized_ok():
            from devstral.quant import dequantize

            w = dequantize(rows, info.qtype, (out_f, in_f), name=f"{gname}[{e}]").to(device=device, dtype=torch_dtype)
            check_finite(w, f"{gname}[{e}]", g.path)
            _set_parameter(model, ours, w)
        else:
            check_finite_blocks(rows, info.qtype, f"{gname}[{e}]", g.path)
            _set_module(model, ours.rsplit(".", 1)[0], QuantLinear(rows.contiguous().to(device), info.qtype, out_f,
                                                                 in_f, name=f"{gname}[{e}]", dtype=torch_dtype))


def _quantized_ok() -> frozenset:
    from devstral.quant import DEQUANTIZABLE

    return DEQUANTIZABLE


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)
