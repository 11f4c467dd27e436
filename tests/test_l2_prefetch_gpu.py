"""The o projection's L2 prefetch (kernels/l2_prefetch.py) on a CUDA GPU: the GEMV that issues it gives the same
bits as without it, eagerly and replayed from a CUDA graph under dependent launch, and the lines it asked for
are in L2 afterwards (a read of them runs faster than the same read of lines not asked for)."""

from __future__ import annotations

import pytest
import torch

from devstral.kernels.gguf_pack import pack
from devstral.quant import QType
from test_kernels_gguf_wide import random_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("qtype,cfg", [("Q4_K", dict(bn=128, ns=16, bm=1, split_k=8)),  # Devstral's o, one tile each
                                       ("Q8_0", dict(bn=64, ns=8, bm=1, split_k=4))])
def test_the_gemv_keeps_its_bits_with_the_prefetch_in_a_graph(qtype, cfg, mode):
    from devstral.kernels import gguf_gemv_wide
    from devstral.quant.l2_prefetch import spans

    g = torch.Generator().manual_seed(0)
    n, k = 5120, 4096
    p = pack(random_blocks(QType[qtype], n, k, g).to("cuda"), QType[qtype], n, k)
    target = pack(random_blocks(QType.Q4_K, 4096, 5120, g).to("cuda"), QType.Q4_K, 4096, 5120)
    hint = (target.buf, spans(target, 8 << 20), mode)
    x = torch.randn(1, k, generator=g).to("cuda", torch.bfloat16)
    plain = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
    gguf_gemv_wide.gemv(x, p, None, plain, int8=True, xq=True, **cfg)
    eager = torch.empty_like(plain)
    gguf_gemv_wide.gemv(x, p, None, eager, int8=True, xq=True, **cfg, prefetch=hint)
    graphed = torch.empty_like(plain)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gguf_gemv_wide.gemv(x, p, None, graphed, int8=True, xq=True, **cfg, prefetch=hint)  # compiled before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            gguf_gemv_wide.gemv(x, p, None, graphed, int8=True, xq=True, **cfg, prefetch=hint)
    graphed.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(plain, eager) and torch.equal(plain, graphed)


def test_the_lines_asked_for_come_back_from_l2():
    """Flush L2 with a 256 MiB read, run the GEMV asking for the first 16 MiB of a 64 MiB buffer, then time a
    read of those 16 MiB against a read of the next 16 MiB (flushed the same way, nothing asked): the median of
    several rounds must be clearly faster."""
    from devstral.kernels import gguf_gemv_wide

    g = torch.Generator().manual_seed(1)
    p = pack(random_blocks(QType.Q4_K, 5120, 4096, g).to("cuda"), QType.Q4_K, 5120, 4096)
    x = torch.randn(1, 4096, generator=g).to("cuda", torch.bfloat16)
    out = torch.empty(1, 5120, dtype=torch.bfloat16, device="cuda")
    buf = torch.randint(0, 255, (64 << 20,), dtype=torch.uint8, device="cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    part = 16 << 20

    def timed_read(lo: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        buf[lo:lo + part].view(torch.int32).sum()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    asked, other = [], []
    for _ in range(7):
        for lo, into, hint in ((0, asked, (buf, (0, part), 1)), (part, other, None)):
            flush.sum()
            gguf_gemv_wide.gemv(x, p, None, out, int8=True, xq=True, bn=128, ns=16, bm=1, split_k=8, prefetch=hint)
            torch.cuda._sleep(2_000_000)  # ~1 ms: the prefetch lands
            into.append(timed_read(lo))
    asked.sort()
    other.sort()
    assert asked[3] < 0.8 * other[3], (asked, other)
