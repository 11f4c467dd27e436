"""The Mistral decoder: the one network definition that inference and training share.

Module names mirror transformers' MistralForCausalLM (`model.layers.N.self_attn.q_proj`, `lm_head`,
...) so that HF checkpoints load by name and LoRA adapters use PEFT's key names unchanged.

Activations are token-major: [B, T, heads, head_dim]. Training passes whole sequences and a mask;
inference passes the engine's flattened batch ([1, N] tokens from many sequences) with a `cache`,
which stores the new keys/values and runs the attention over the paged KV cache (engine/attention.py).
The elementwise pieces (RMSNorm, RoPE, SwiGLU) and the decode-sized matmuls go through
`devstral.kernels`, which runs Triton on CUDA at inference (the matmuls only where a measured table
says it beats cuBLAS) and the plain-PyTorch reference everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from devstral.config import ModelConfig
from devstral.kernels.gemv import linear, run_linear
from devstral.kernels.rms_norm import add_rms_norm, rms_norm
from devstral.kernels.rope import apply_rope
from devstral.kernels.silu_mul import silu_mul
from devstral.kernels.varlen_attention import Documents, varlen_attention
from devstral.model.moe import MoE
from devstral.model.rope import Rotary
from devstral.model.tiled_mlp import checkpoint_contexts, output_needed, tiled_rows, worth_tiling
from devstral.quant.linear import (
    PackedProjection,
    attention_xq_layouts,
    decode_xq_layouts,
    folds_swiglu,
    fuse_quant,
    norm_writes_xq,
    pair_quant,
)


class AttentionCache(Protocol):
    """What the attention needs at inference (engine/attention.py implements it)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, q_scale: torch.Tensor | None, xq: tuple[int, ...] = ()) -> torch.Tensor:
        """Rotate q [B, T, H, D] and k [B, T, Hkv, D] (`apply_rope`'s arguments), store k/v and attend
        -> [B, T, H, D]. The cache rotates because on the GPU the rotation and its store of the keys are
        one kernel. xq: the gguf_xq layouts the o projection quantizes the output in, which a cache may
        write beside it (gguf_xq.offer); ignoring them is always correct."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # set by fuse (Block.fuse, Transformer.fuse_projections): the gguf_xq layouts the int8 GEMVs fed by
        # this norm quantize its output in; the Triton kernel writes them beside it at decode sizes
        self.xq_layouts: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.xq_layouts)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + delta), x + delta), fused on the GPU. x is always the residual stream, which a norm
        at least one GEMV back wrote, and delta the output of the kernel just before: so the kernel may
        read x before it waits for that one (x_settled, rms_norm_triton.py)."""
        return add_rms_norm(x, delta, self.weight, self.eps, self.xq_layouts, x_settled=True)


def fused_weight(*linears: nn.Module) -> torch.Tensor | None:
    """One [sum(out), in] weight whose row blocks the given linears' weights become views of, so that
    inference runs one matmul where the checkpoint has several (no extra memory). None when the
    modules are not plain nn.Linear of one dtype (LoRA-wrapped, quantized)."""
    if not all(type(m) is nn.Linear and m.bias is None for m in linears):
        return None
    weights = [m.weight for m in linears]
    if len({(w.dtype, w.device) for w in weights}) != 1 or weights[0].device.type == "meta":
        return None
    fused = torch.cat([w.detach() for w in weights])
    row = 0
    for m, w in zip(linears, weights, strict=True):
        m.weight = nn.Parameter(fused[row:row + w.shape[0]], requires_grad=w.requires_grad)
        row += w.shape[0]
    return fused


Projection = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _split_linear(x: torch.Tensor, weight: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    return linear(x, weight).split(sizes, dim=-1)


def fused_projection(*linears: nn.Module) -> Projection | None:
    """Inference: these projections of one input as one matmul -- plain linears through one fused
    weight, planar GGUF linears of one type through one planar weight (quant.linear.fuse_quant) --
    or None when their weights cannot be joined. Returns one output per projection, in order."""
    weight = fused_weight(*linears)
    if weight is not None:
        return partial(_split_linear, weight=weight, sizes=[m.weight.shape[0] for m in linears])
    return fuse_quant(*linears)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.window = cfg.sliding_window
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # set by fuse(): q/k/v as one matmul, or q/k as one when v cannot join (a GGUF Q4_K_M keeps
        # attn_v in Q6_K in some layers), or k/v as one when q cannot (an 8-expert Q4_K_M keeps attn_k
        # and attn_v in Q8_0, attn_q in Q4_K); their weights are views of the fused one
        self.qkv: Projection | None = None
        self.qk: Projection | None = None
        self.kv: Projection | None = None
        # set by Block.fuse: {rows: o_proj's int8 activation layouts there}, which the cache may write beside its output
        self.out_xq: dict[int, tuple[int, ...]] = {}

    def fuse(self) -> None:
        self.qkv = fused_projection(self.q_proj, self.k_proj, self.v_proj)
        if self.qkv is None:
            self.qk = fused_projection(self.q_proj, self.k_proj)
        if self.qkv is None and self.qk is None:
            self.kv = fused_projection(self.k_proj, self.v_proj)
        # the two groups left (types differ) in one launch at decode sizes, unless DEVSTRAL_PAIR_GEMV=0 (PairedProjection)
        if self.qk is not None:
            self.qkv = pair_quant(self.qk, self.v_proj)
        elif self.kv is not None:
            self.qkv = pair_quant(self.q_proj, self.kv)

    def xq_layouts(self) -> tuple[int, ...]:
        """The gguf_xq layouts project() quantizes its input in at decode sizes (quant.linear.decode_xq_layouts)."""
        if self.qkv is not None:
            return decode_xq_layouts(self.qkv)
        if self.qk is not None:
            return decode_xq_layouts(self.qk, self.v_proj)
        if self.kv is not None:
            return decode_xq_layouts(self.q_proj, self.kv)
        return decode_xq_layouts(self.q_proj, self.k_proj, self.v_proj)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not torch.is_grad_enabled():
            if self.qkv is not None:
                q, k, v = self.qkv(x)
                return q, k, v
            if self.qk is not None:
                q, k = self.qk(x)
                return q, k, run_linear(self.v_proj, x)
            if self.kv is not None:
                k, v = self.kv(x)
                return run_linear(self.q_proj, x), k, v
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, q_scale, mask, cache: AttentionCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if cache is not None:  # inference: the cache rotates q/k as it stores the keys
            out = cache.attend(self.layer, q, k, v, cos, sin, q_scale, self.out_xq.get(B * T, ()))
        else:
            q, k = apply_rope(q, k, cos, sin, q_scale)
            if isinstance(mask, Documents):  # training rows: each packed document attends only to itself
                out = varlen_attention(q, k, v, mask, self.window)
            else:
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     attn_mask=mask, enable_gqa=True).transpose(1, 2)
        return run_linear(self.o_proj, out.reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). In training, `tile_tokens` runs it in tiles of that many tokens
    (model/tiled_mlp.py): the hidden_dim-wide intermediates exist for one tile at a time."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.gate_up: Projection | None = None  # set by fuse()
        self.tile_tokens: int | None = None  # set by Transformer.tile_mlp()

    def fuse(self) -> None:
        self.gate_up = fused_projection(self.gate_proj, self.up_proj)

    def xq_layouts(self) -> tuple[int, ...]:
        """The gguf_xq layouts gate and up quantize the input in at decode sizes."""
        return decode_xq_layouts(self.gate_up) if self.gate_up is not None else decode_xq_layouts(
            self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if worth_tiling(x, self.tile_tokens) and self._tileable():
            return tiled_rows(self._swiglu, x, self.tile_tokens, [p for p in self.parameters() if p.requires_grad])
        return self._swiglu(x)

    def _tileable(self) -> bool:
        # a tile's forward runs again in backward: a dropout mask drawn there would differ from the forward's
        return not any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in self.modules())

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None and not torch.is_grad_enabled():
            if isinstance(self.gate_up, PackedProjection) and folds_swiglu(self.down_proj):
                pre = self.gate_up.joined(x)  # [gate | up]: down's GEMV applies the SwiGLU as it quantizes
                if pre is not None:
                    return self.down_proj.forward_glu(pre)
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return run_linear(self.down_proj, silu_mul(gate, up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.n_experts:  # Mixtral: a routed mixture of experts in place of the dense FFN
            self.block_sparse_moe = MoE(cfg)
        else:
            self.mlp = MLP(cfg)

    @property
    def ffn(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def fuse(self) -> None:
        """Inference: the attention's and the FFN's projections fused where their weights allow; each norm
        told the layouts its int8 GEMVs quantize its output in, so that it writes them itself at decode
        sizes (one gguf_xq launch fewer per norm) unless DEVSTRAL_NORM_XQ=0."""
        self.self_attn.fuse()
        self.ffn.fuse()
        xq = norm_writes_xq()
        self.input_layernorm.xq_layouts = self.self_attn.xq_layouts() if xq else ()
        self.post_attention_layernorm.xq_layouts = self.ffn.xq_layouts() if xq else ()
        self.self_attn.out_xq = attention_xq_layouts(self.self_attn.o_proj)

    def forward(self, x, cos, sin, q_scale, mask, cache, delta=None):
        """The residual stream x, plus `delta` (the block before's FFN output, not yet added) -> (the
        residual stream after attention, this block's FFN output or None). A dense FFN's skip connection
        is left to the next norm, which adds it in its own pass (one launch less per layer at decode);
        a MoE's is inside its last kernel."""
        if delta is None:
            normed = self.input_layernorm(x)
        else:
            normed, x = self.input_layernorm.add_and_norm(x, delta)
        h = self.self_attn(normed, cos, sin, q_scale, mask, cache)
        h, x = self.post_attention_layernorm.add_and_norm(x, h)
        if hasattr(self, "block_sparse_moe"):
            return self.block_sparse_moe(h, residual=x), None
        return x, self.mlp(h)


def _run_blocks(blocks, x, cos, sin, q_scale, mask, cache):
    """Blocks in order -> (residual stream, the last block's pending FFN output or None)."""
    delta = None
    for i, block in enumerate(blocks):
        # in a checkpoint's rerun only the last block's MLP output is unused (model/tiled_mlp.py)
        with output_needed() if i < len(blocks) - 1 else nullcontext():
            x, delta = block(x, cos, sin, q_scale, mask, cache, delta)
    return x, delta


def _checkpointed_blocks(blocks, x, cos, sin, q_scale, mask, cache):
    x, delta = _run_blocks(blocks, x, cos, sin, q_scale, mask, cache)
    return x if delta is None else x + delta


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.gradient_checkpointing = False
        self.activation_offload = None  # train/offload.py: checkpointed layer inputs kept in CPU memory
        # Layers per checkpoint: 1 keeps every layer's input; 2 keeps every other one and recomputes two layers
        # at once in backward (the same arithmetic: half the checkpoints, one more layer's activations live)
        self.checkpoint_layers = 1
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, *,
                      cache: AttentionCache | None = None, attn_mask: torch.Tensor | None = None,
                      inject: tuple[torch.Tensor, torch.Tensor] | None = None,
                      documents: Documents | None = None) -> torch.Tensor:
        """tokens [B, T] -> final normed hidden states [B, T, dim].

        `positions` [B, T] default to 0..T-1. Without a cache the attention is causal (and windowed)
        over the given tokens; `attn_mask` [B, 1, T, T] (True = may attend) lets training keep packed
        examples apart. With a cache, the cache knows each token's sequence and masks accordingly.
        `inject` (rows [M] into the flattened B*T tokens, embeddings [M, dim]) replaces those tokens'
        embeddings: the image features of [IMG] tokens (model/vision.py).
        `documents` (training, no cache): the lengths of the examples packed into the rows; each
        attends causally to itself only, with no [T, T] mask (kernels/varlen_attention.py).
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.model.embed_tokens(tokens)
        if inject is not None:
            rows, values = inject
            x = x.reshape(B * T, -1).index_copy(0, rows, values.to(x.dtype)).view(B, T, -1)
        cos, sin = self.rotary(positions, x.dtype)
        q_scale = self.rotary.query_scale(positions)
        if documents is not None and cache is None and attn_mask is None:
            documents.check(B, T)
            mask = documents
        else:
            mask = None if cache is not None else self._mask(positions, attn_mask)
        offload = self.activation_offload if self.gradient_checkpointing and self.training else None
        if offload is not None:
            offload.begin()
        layers = self.model.layers
        if self.gradient_checkpointing and self.training:
            step = max(1, self.checkpoint_layers)
            for at in range(0, len(layers), step):
                with offload.saving(x) if offload is not None else nullcontext():
                    # a checkpoint keeps one tensor per segment: the stream with the last FFN output added
                    x = checkpoint(_checkpointed_blocks, tuple(layers[at:at + step]), x, cos, sin, q_scale, mask,
                                   cache, use_reentrant=False, context_fn=checkpoint_contexts)
            return self.model.norm(x)
        x, delta = _run_blocks(layers, x, cos, sin, q_scale, mask, cache)
        if delta is None:
            return self.model.norm(x)
        return self.model.norm.add_and_norm(x, delta)[0]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, *,
                cache: AttentionCache | None = None, attn_mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None,
                inject: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [B, T, vocab], or only at the token indices `select` [S] -> [B, S, vocab] (the engine
        needs logits only where a sequence samples its next token)."""
        h = self.hidden_states(tokens, positions, cache=cache, attn_mask=attn_mask, inject=inject)
        return run_linear(self.lm_head, h if select is None else h[:, select])

    def tile_mlp(self, tokens: int | None) -> None:
        """Train the dense MLPs in tiles of `tokens` tokens (None or 0: whole sequences)."""
        for block in self.model.layers:
            if isinstance(block.ffn, MLP):
                block.ffn.tile_tokens = tokens or None

    def fuse_projections(self) -> None:
        """Inference: q/k/v and gate/up as one matmul each, where the weights allow (see fused_weight), and
        the norms before int8 GEMVs writing their activations (Block.fuse)."""
        for block in self.model.layers:
            block.fuse()
        self.model.norm.xq_layouts = decode_xq_layouts(self.lm_head) if norm_writes_xq() else ()
        from devstral.quant.fixed_deltas import install

        install(self)  # o/down's one-row outputs in fixed point (K-quants by default; DEVSTRAL_FIXED_DELTAS)

    def _mask(self, positions: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """Boolean [B, 1, T, T]: causal, optionally windowed, AND the caller's mask. Keys share the
        queries' positions (packed training rows carry per-example positions)."""
        window = self.config.sliding_window
        q = positions[:, :, None]  # [B, T, 1]
        k = positions[:, None, :]  # [B, 1, T]
        index = torch.arange(positions.shape[1], device=positions.device)
        allowed = (k <= q) & (index[None, None, :] <= index[None, :, None])
        if window is not None:
            allowed &= (q - k) < window
        allowed = allowed[:, None]
        if extra is not None:
            allowed = allowed & extra
        return allowed
