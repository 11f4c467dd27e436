"""A MoE layer's router in one launch: logits = x W^T, the top-k experts, their renormalised softmax weights.

The reference (model/moe.py `MoE.route`) is a matmul, a cast, a softmax, a top-k, a sum and a division:
six launches for a [T, E] result, which at decode cost more than the router's bytes (E x D weights,
128 KB for Mixtral) take to read. Here each token's logits are split over D into programs of one
[E, BD] tile each (so a decode step reads the router weight with a few SMs at once, not one SM
looping), the partial logits meet in gguf_splitk's workspace (the last program to arrive adds them in
fixed order: deterministic, CUDA-graph safe), and that program takes the top-k by repeated max (the
lowest expert index wins a tie) and the weights exp(l_i - l_max) / sum over the chosen of exp(l_j -
l_max): softmax over all E, top-k and renormalising give exactly these. Logits are accumulated in
fp32 from the activations' dtype (llama.cpp's router runs in fp32 too). Outputs are what
`topk` gives: expert ids int64 [T, k], weights fp32 [T, k].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels import pdl
from devstral.kernels.gguf_splitk import MAX_TILES, counters, split_sum
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait

TILE = 4096  # router weights per program: BE * BD


@triton.jit
def _router_kernel(x_ptr, w_ptr, ids_ptr, wt_ptr, ws_ptr, cnt_ptr, T, D, s_xm, s_wm, n_split,
                   E: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr, TOPK: tl.constexpr,
                   PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py (the norm before writes x)
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    s = tl.program_id(1)
    e = tl.arange(0, BE)
    e_ok = e < E
    d = s * BD + tl.arange(0, BD)
    d_ok = d < D
    xv = tl.load(x_ptr + t.to(tl.int64) * s_xm + d, mask=d_ok, other=0.0).to(tl.float32)
    wv = tl.load(w_ptr + e[:, None] * s_wm + d[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
    part = tl.sum(wv.to(tl.float32) * xv[None, :], axis=1)
    logits, last = split_sum(part[:, None], e, t + tl.arange(0, 1), E, T, ws_ptr, cnt_ptr, t, s, n_split)
    if last:
        rest = tl.where(e_ok, tl.sum(logits, axis=1), float("-inf"))
        jj = tl.arange(0, KP)
        top = tl.full((KP,), float("-inf"), tl.float32)
        idx = tl.zeros((KP,), tl.int32)
        for j in tl.static_range(TOPK):
            best = tl.max(rest, axis=0)
            # (clamped: NaN logits match nothing, and an id past E would send the expert kernels out of bounds)
            pick = tl.minimum(tl.min(tl.where(rest == best, e, BE), axis=0), E - 1)
            top = tl.where(jj == j, best, top)
            idx = tl.where(jj == j, pick, idx)
            rest = tl.where(e == pick, float("-inf"), rest)
        p = tl.where(jj < TOPK, tl.exp(top - tl.max(top, axis=0)), 0.0)
        ok = jj < TOPK
        tl.store(ids_ptr + t * TOPK + jj, idx.to(tl.int64), mask=ok)
        tl.store(wt_ptr + t * TOPK + jj, p / tl.sum(p, axis=0), mask=ok)


def route(x: torch.Tensor, weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D], router weight [E, D] (unit column strides) -> (experts int64 [T, k], weights fp32 [T, k])."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    t, d = x.shape
    n_experts = weight.shape[0]
    ids = torch.empty(t, top_k, dtype=torch.int64, device=x.device)
    wts = torch.empty(t, top_k, dtype=torch.float32, device=x.device)
    if t == 0:
        return ids, wts
    be = triton.next_power_of_2(n_experts)
    bd = max(16, min(triton.next_power_of_2(d), TILE // be))
    n_split = triton.cdiv(d, bd)
    ws = torch.empty(n_split * t * n_experts, dtype=torch.float32, device=x.device)
    cnt = counters(x.device)
    on = pdl.enabled(x.device)
    for t0 in range(0, t, MAX_TILES):  # one counter per token
        t1 = min(t, t0 + MAX_TILES)
        _router_kernel[(t1 - t0, n_split)](
            x[t0:], weight, ids[t0:], wts[t0:], ws, cnt, t1 - t0, d, x.stride(0), weight.stride(0), n_split,
            E=n_experts, BE=be, BD=bd, KP=triton.next_power_of_2(top_k), TOPK=top_k, PDL=on, num_warps=4,
            launch_pdl=on)
    return ids, wts
