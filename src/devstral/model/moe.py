"""Mixtral's sparse feed-forward: a router sends each token to the top-k of E SwiGLU experts and mixes
their outputs with the renormalised router probabilities.

Module names follow the checkpoints (`block_sparse_moe.gate`, `block_sparse_moe.experts.E.w1/w2/w3`, as
Mixtral's HF files and PEFT's Mixtral targets name them), so safetensors load by name and LoRA can sit
on any expert linear. The reference path (CPU, training, LoRA-wrapped experts): each expert runs on the
tokens routed to it (gathered, computed, scattered back with their weights); it sizes its gathers from
the data, so it synchronises with the host.

For inference, `fuse()` stacks each projection's experts into one weight (kernels/moe_experts.py;
the experts' modules become views of it) when they are plain bf16/fp16 linears or planar GGUF weights
on a device the Triton kernels run on. The layer then runs through the routed-expert GEMV (decode,
no host sync: CUDA-graph safe) or the grouped prefill path; `graph_safe(model)` tells the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from devstral.config import ModelConfig
from devstral.kernels import use_triton
from devstral.kernels.gemv import run_linear
from devstral.kernels.silu_mul import silu_mul


class Expert(nn.Module):
    """One SwiGLU expert: w2(silu(w1 x) * w3 x) (w1 gate, w3 up, w2 down, Mixtral's names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_linear(self.w2, silu_mul(run_linear(self.w1, x), run_linear(self.w3, x)))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.n_experts_per_tok
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.n_experts))
        self.router_logits: torch.Tensor | None = None  # the last training forward's, for the balancing loss
        self.stack = None  # ExpertStack, set by fuse() where the experts can be stacked

    def fuse(self) -> None:
        """Inference: stack the experts for the grouped kernels, where their weights allow."""
        from devstral.model.moe_stack import stack_experts

        self.stack = stack_experts(self)

    def xq_layouts(self) -> tuple[int, ...]:
        """The gguf_xq layouts the stacked experts quantize their input in at decode sizes: what the norm
        before this layer writes beside its output (RMSNorm.xq_layouts)."""
        if self.stack is None:
            return ()
        from devstral.kernels.gguf_config import DECODE_MS

        return self.stack.decode_xq_layouts(self.top_k, DECODE_MS[-1])

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.stack is not None:
            from devstral.model.moe_stack import rebind_stack

            rebind_stack(self)
        return out

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [T, E], and per token the top-k experts [T, k] with their weights [T, k]:
        softmax over all experts in float32, top-k, renormalised to sum to 1."""
        logits = F.linear(x, self.gate.weight) if type(self.gate) is nn.Linear else self.gate(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return logits, experts, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The expert mix for x [..., D]; plus residual (same shape) when given: the decoder layer's skip
        connection, which the stacked path adds inside its last kernel."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        res2 = None if residual is None else residual.reshape(-1, shape[-1])
        if self.stack is not None and use_triton(x2) and not (self.training and torch.is_grad_enabled()):
            if type(self.gate) is nn.Linear and self.gate.bias is None:
                from devstral.kernels.moe_router import route

                # one launch for what route() does in six (the logits are not kept: no balancing loss here)
                experts, weights = route(x2, self.gate.weight, self.top_k)
            else:
                _, experts, weights = self.route(x2)
            return self.stack.forward(x2, experts, weights, res2).reshape(shape)
        logits, experts, weights = self.route(x2)
        if self.training and torch.is_grad_enabled():
            self.router_logits = logits
        out = torch.zeros_like(x2)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(experts == e, as_tuple=True)
            if token.numel():
                y = expert(x2[token]) * weights[token, slot, None].to(x2.dtype)
                out.index_add_(0, token, y)
        out = out.reshape(shape)
        return out if residual is None else residual + out


def graph_safe(model: nn.Module) -> bool:
    """Can the model's forward be captured in a CUDA graph? Not while a MoE layer takes the reference
    path (its gathers are sized on the host)."""
    return all(m.stack is not None for m in model.modules() if isinstance(m, MoE))


def load_balancing_loss(router_logits: list[torch.Tensor], n_experts: int, top_k: int) -> torch.Tensor:
    """The Switch Transformer auxiliary loss as Mixtral trains with it: E * sum over experts of (the
    share of routing slots sent to the expert) * (its mean router probability), over all layers' tokens."""
    logits = torch.cat([r.float() for r in router_logits], dim=0)
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    share = F.one_hot(chosen, n_experts).float().mean(dim=0)  # [k, E]: slot k's share per expert
    return n_experts * torch.sum(share * probs.mean(dim=0)[None, :])
