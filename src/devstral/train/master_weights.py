"""Low-precision trainable weights with fp32 master copies that the optimizer owns.

With `--lora-dtype bf16` the LoRA A/B the model multiplies with are bf16 (no per-forward casts, bf16
gradients out of the matmuls), while every update is computed and kept in fp32: each bf16 weight has an
fp32 master; after each backward a hook adds the bf16 gradient into the master's fp32 `.grad` and drops
it (so micro-batch accumulation is fp32 too); clipping, AdamW and its state work on the masters; after
the step the masters are rounded into the bf16 weights. Checkpoints carry the masters (fp32), so a
resumed run continues bit for bit, and the saved adapter is the fp32 masters: the same PEFT file as
before.
"""

from __future__ import annotations

import torch
from torch import nn


class MasterWeights:
    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype):
        self.params = params
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        with torch.no_grad():
            for p in params:
                p.data = p.data.to(dtype)
        self._hooks = [p.register_post_accumulate_grad_hook(self._to_master(m)) for p, m in
                       zip(params, self.masters, strict=True)]

    @staticmethod
    def _to_master(master: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

        return hook

    def push(self) -> None:
        """The masters, rounded, into the model's weights (after each optimizer step)."""
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                p.copy_(m)

    def release(self) -> None:
        """Training is over: the model's weights become the fp32 masters (what the adapter saves)."""
        for h in self._hooks:
            h.remove()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                p.data = m.detach()
