"""The greedy token and the NaN flag of every row of a decode step's logits, as the engine's overlapped loop
takes them when every row is greedy: the token is `sampling.sample`'s for a greedy row without a repeat
penalty (argmax of the float32 logits with NaN ranked lowest, -inf as the lowest finite value and +inf
as the highest, the first index on ties) and the flag says whether the row held a NaN.

On CUDA one launch (`greedy_pick_triton.py`) replaces the eight small PyTorch kernels of that path
(float copy, nan_to_num, argmax, isnan, any, stack), which run between two graph replays of a decode
step. Every captured decode graph ends with it (decode_advance.py: the graph's own next input ids). Outside
them (a step without graphs, or DEVSTRAL_GRAPH_ADVANCE=0) it stays off until measured on its own:
DEVSTRAL_GREEDY_PICK=1 turns it on there.
"""

from __future__ import annotations

import os

import torch

from devstral.kernels import use_triton


def greedy_pick_ref(logits: torch.Tensor) -> torch.Tensor:
    """logits [S, V] -> int64 [2, S]: row 0 the greedy tokens, row 1 1 where the row held a NaN."""
    x = logits.float()
    tokens = torch.argmax(torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(torch.float32).max), dim=-1)
    return torch.stack([tokens, torch.isnan(x).any(-1).long()])


def enabled() -> bool:
    """Whether the engine's overlapped loop takes this path for its all-greedy steps (DEVSTRAL_GREEDY_PICK=1)."""
    return os.environ.get("DEVSTRAL_GREEDY_PICK", "0") == "1"


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """logits [S, V] -> int64 [2, S] (greedy_pick_ref's), in one launch where Triton runs."""
    if use_triton(logits) and logits.dim() == 2 and logits.shape[0] > 0:
        from devstral.kernels.greedy_pick_triton import greedy_pick_triton

        return greedy_pick_triton(logits)
    return greedy_pick_ref(logits)
