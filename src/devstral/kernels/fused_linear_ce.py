"""Linear + cross-entropy fused over row chunks: the [tokens, vocab] logits never exist in full.

The loss is the sum over rows of logsumexp(h W^T) - (h W^T)[target]. Its gradient with respect to the
logits is softmax - onehot, which is known as soon as a chunk's logits are, so the forward computes, per
chunk, the loss, dlogits (in place over the chunk's logits) and from it dh = dlogits W and (when W
trains) dW += dlogits^T h. Backward only scales the saved gradients by the incoming scalar. That is two
matmuls per chunk (three when W trains) instead of the four of checkpointed chunks, and the activation
kept for backward is dh, the size of h, never a logits chunk. The same scheme as Liger-Kernel's
FusedLinearCrossEntropy, written here in PyTorch so it runs (and is tested) on any device; the matmuls,
which are nearly all the work, go to cuBLAS on a GPU. Where Liger-Kernel is installed and runs (CUDA),
its version is used instead: it measured faster and leaner on the H200 (kernels/train_backends.py),
up to the length where its logits chunk, which grows with the rows (next_pow2(rows / ceil(vocab / dim))
rows: 32768 x 131072 in bf16 = 8 GiB, 20 KB a token, at 500k tokens), would pass LIGER_MAX_CHUNK_BYTES;
beyond it ours runs, whose chunk is fixed: at those lengths the head is a small part of a step, and its
memory per token is what limits the longest sequence.
"""

from __future__ import annotations

import torch

from devstral.kernels.train_backends import use_liger

IGNORE_INDEX = -100
CHUNK_BYTES = 256 << 20  # fp32 logits per chunk: 512 rows at a 131k vocabulary


LIGER_MAX_CHUNK_BYTES = 128 << 20  # Liger's chunk at 8192 rows of 5120 -> 131072 in bf16


def liger_chunk_bytes(rows: int, dim: int, vocab: int, itemsize: int) -> int:
    """Bytes of the logits chunk Liger's fused linear cross-entropy materializes for `rows` inputs."""
    inc = -(-vocab // dim)
    return (1 << max(0, (-(-rows // inc) - 1).bit_length())) * vocab * itemsize


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, ignore_index: int,
                need_h: bool, need_w: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, h.shape[0], rows):
            hc, tc = h[start:start + rows], targets[start:start + rows]
            logits = (hc @ weight.t()).float()
            valid = tc != ignore_index
            t = torch.where(valid, tc, 0)[:, None]
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, t).squeeze(1)) * valid).sum()
            if not (need_h or need_w):
                continue
            dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            dlogits.scatter_add_(1, t, -torch.ones_like(t, dtype=dlogits.dtype))
            dlogits.mul_(valid[:, None])  # ignored rows contribute nothing
            d = dlogits.to(h.dtype)
            del logits, dlogits
            if need_h:
                grad_h[start:start + rows] = d @ weight
            if need_w:
                grad_w += (d.t() @ hc).float()
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.need = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.need
        grad_h = saved.pop(0) * grad_out if need_h else None  # a 0-d fp32 factor keeps h's dtype
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = IGNORE_INDEX, chunk: int | None = None) -> torch.Tensor:
    """sum over rows of cross_entropy(h @ weight^T, targets) as an fp32 scalar, ignoring `ignore_index`.

    h [N, D], weight [V, D], targets [N]. Under autocast the matmuls run in the autocast dtype (the
    softmax and the loss always in fp32), as F.linear + F.cross_entropy would.
    """
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        h, weight = h.to(low), weight.to(low)
    elif weight.dtype != h.dtype:
        h = h.to(weight.dtype)
    grad = torch.is_grad_enabled()
    rows = chunk or chunk_rows(weight.shape[0])
    with torch.autocast(dev, enabled=False):
        if (chunk is None and h.shape[0] and use_liger("fused_linear_ce", h)
                and liger_chunk_bytes(h.shape[0], h.shape[1], weight.shape[0], h.element_size()) <= LIGER_MAX_CHUNK_BYTES):
            from devstral.kernels.liger import liger_linear_cross_entropy  # faster and leaner on the H200

            return liger_linear_cross_entropy(h, weight, targets, ignore_index)
        return _LinearCrossEntropy.apply(h, weight, targets, rows, ignore_index,
                                         grad and h.requires_grad, grad and weight.requires_grad)
