"""Turn a Transformer whose weights are already each rank's shard into a tensor-parallel one.

Nothing in model/transformer.py changes (gpt-fast's way): the attention blocks learn their local head
counts, and forward hooks add the communication where Megatron puts it:
* after each attention block and each MLP (o_proj / down_proj are row-parallel): one all-reduce;
* the token embedding (vocab-parallel): ids outside this rank's rows look up row 0 and are zeroed,
  then one all-reduce gives every rank the full embedding;
* lm_head (vocab-parallel): each rank computes its vocabulary slice of the logits for the rows the
  engine samples (the model selects them before the head), then one all-gather.
Hooks run inside CUDA-graph capture too, so a captured decode step holds its collectives.
"""

from __future__ import annotations

import torch
from torch import nn

from devstral.kernels.gemv import linear
from devstral.model.transformer import Transformer
from devstral.parallel.group import TPGroup


class ShardLinear(nn.Linear):
    """A plain bias-free linear that goes through its module call (the model's `run_linear` calls a
    plain nn.Linear's weight directly, which would skip the hooks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight) if self.bias is None else super().forward(x)


def parallelize(model: Transformer, tp: TPGroup) -> Transformer:
    cfg, world = model.config, tp.world

    def reduce(_module, _args, out):
        return tp.all_reduce(out)

    for block in model.model.layers:
        attn = block.self_attn
        attn.n_heads, attn.n_kv_heads = cfg.n_heads // world, cfg.n_kv_heads // world
        attn.register_forward_hook(reduce)
        block.mlp.register_forward_hook(reduce)

    rows = cfg.vocab_size // world
    first = tp.rank * rows
    emb = model.model.embed_tokens

    def local_ids(module, args):
        (tokens,) = args
        local = tokens - first
        inside = (local >= 0) & (local < rows)
        module._tp_outside = ~inside  # read by the output hook of the same call
        return (torch.where(inside, local, torch.zeros_like(local)),)

    def sum_embeddings(module, _args, out):
        return tp.all_reduce(out.masked_fill(module._tp_outside.unsqueeze(-1), 0))

    emb.register_forward_pre_hook(local_ids)
    emb.register_forward_hook(sum_embeddings)

    head = model.lm_head
    if type(head) is nn.Linear:
        head.__class__ = ShardLinear
    head.register_forward_hook(lambda _m, _a, out: tp.gather_last_dim(out))
    model.tp = tp
    return model
