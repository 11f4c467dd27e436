"""Bulk L2 prefetch: a GEMV asks L2 for weights the next GEMV will read (`DEVSTRAL_L2_PREFETCH_MB`; which
weights and how many: quant/l2_prefetch.py).

Why: at batch 1 a Devstral layer streams ~290 MB through gate/up and down at ~4 TB/s, but from q/k/v's end
to gate/up's start (RoPE, the attention's two passes, o, the norm) it moves ~15 MB in ~15 us: DRAM sits
mostly idle while the chain of small kernels waits on latency. Weights are never written, so the o
projection may ask for gate/up's first rows then, and gate/up reads them from L2 instead of DRAM.

How: `cp.async.bulk.prefetch.L2` (sm_90): one instruction asks the SM's copy engine for up to CHUNK bytes,
and the thread moves on -- no register, no shared memory, nothing to wait for. The weights to fetch are a few
spans of one buffer (a planar weight's fields, rows 0..R-1 of each: `spans`), split into CHUNK pieces dealt
over every program of the launch, one piece a lane: piece i of a span goes to program i % G, lane i // G.

Semantics: none. A prefetch moves lines into L2 only; every output is the same bits with or without it.
Under Triton's interpreter (no inline PTX) the calls compile out, so the CPU twin is the identity; the tests
check what is asked for (quant/l2_prefetch.py's spans against the weight's fields) and, in the sm_90 PTX,
that the GEMV issues the prefetches after its own first loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

CHUNK = 16384  # bytes one prefetch asks for: 1500 pieces for 24 MB, a few a program of an o projection
MAX_SPANS = 8  # fields of a planar weight: Q4_K has five (words, scales, mins' bits, d, dmin)

_CHUNK = tl.constexpr(CHUNK)
_BULK_PTX = tl.constexpr("""{
.reg .pred p;
setp.ne.s32 p, $3, 0;
@p cp.async.bulk.prefetch.L2.global [$1], $2;
mov.b32 $0, 0;
}""")


@triton.jit
def _bulk(at, size, ok):
    return tl.inline_asm_elementwise(_BULK_PTX, "=r,l,r,r", [at, size, ok], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def issue(base_ptr, spans, g, G, N_SPANS: tl.constexpr, LANES: tl.constexpr):
    """Program g of G asks L2 for its pieces of spans ((byte offset, bytes) pairs from base_ptr, a tuple:
    offset 2j, length 2j + 1; offsets and lengths multiples of 16) -- at most LANES pieces a span each."""
    lane = tl.arange(0, LANES).to(tl.int64)
    for j in tl.static_range(N_SPANS):
        pos = (lane * G + g) * _CHUNK
        ok = pos < spans[2 * j + 1]
        size = tl.minimum(spans[2 * j + 1] - pos, _CHUNK)
        _bulk(base_ptr + spans[2 * j] + pos, size.to(tl.int32), ok.to(tl.int32))


def lanes_for(spans: tuple[int, ...], programs: int, num_warps: int) -> int:
    """The lanes (a power of two) a program of num_warps warps needs for the longest span's pieces: at least
    one a thread, since a tensor smaller than the CTA is replicated over threads and every copy would issue."""
    longest = max(spans[1::2], default=0)
    need = triton.cdiv(triton.cdiv(longest, CHUNK), max(1, programs))
    return max(32 * num_warps, triton.next_power_of_2(max(1, need)))


__all__ = ["CHUNK", "MAX_SPANS", "issue", "lanes_for"]
