"""Tensor names and q/k layout: ours (transformers' MistralForCausalLM) <-> llama.cpp's GGUF.

llama.cpp's rotary embedding pairs adjacent dimensions (2i, 2i+1) while our model pairs (i, i+d/2),
so q/k rows are permuted on the way out (permute_for_interleaved) and back on the way in.
"""

from __future__ import annotations

import re

import torch

from devstral.formats.safetensors import permute_for_interleaved, permute_for_rotate_half

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "block_sparse_moe.gate": "ffn_gate_inp"}
# llama.cpp stacks a MoE layer's experts into one 3-D tensor per projection: [experts, rows, cols]
EXPERT_STACKS = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}
_GGUF_STACK = re.compile(r"^blk\.(\d+)\.(ffn_(?:gate|up|down)_exps)\.weight$")
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_OURS_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def to_gguf_name(name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _OURS_LAYER.match(name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    return None


def from_gguf_name(name: str) -> str | None:
    if name in _GLOBAL_BACK:
        return _GLOBAL_BACK[name]
    m = _GGUF_LAYER.match(name)
    if m and m.group(2) in _LAYER_BACK:
        return f"model.layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}.weight"
    return None


def expert_parts(name: str, n_experts: int) -> tuple[str, ...] | None:
    """Our per-expert names that a stacked GGUF expert tensor holds, in order, or None for other tensors."""
    m = _GGUF_STACK.match(name)
    if not m:
        return None
    layer, w = m.group(1), EXPERT_STACKS[m.group(2)]
    return tuple(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" for e in range(n_experts))


def rotary_heads(gguf_name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """How many heads a q/k weight has (its rows get permuted), or None for other tensors."""
    if gguf_name.endswith(".attn_q.weight"):
        return n_heads
    if gguf_name.endswith(".attn_k.weight"):
        return n_kv_heads
    return None


def to_llama_cpp_layout(w: torch.Tensor, heads: int | None) -> torch.Tensor:
    return w if heads is None else permute_for_interleaved(w, heads)


def from_llama_cpp_layout(w: torch.Tensor, heads: int | None) -> torch.Tensor:
    return w if heads is None else permute_for_rotate_half(w, heads)


def rotate_half_row_order(n_rows: int, heads: int) -> torch.Tensor:
    """Row indices that turn llama.cpp's q/k row order into ours; works on packed rows of blocks too."""
    idx = torch.arange(n_rows).reshape(n_rows, 1)
    return permute_for_rotate_half(idx, heads).reshape(-1)
