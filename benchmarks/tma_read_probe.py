"""Is a long-row weight slower to stream than a short-row one of the same bytes? A TMA read probe (no arithmetic).

The decode GEMVs of every ffn_down (K = 32768: rows of 16-33 KB) reach 66-80% of the H200's DRAM peak under
Nsight Compute, those of gate/up and the output head (K = 5120) 79-87% (`ncu_gguf_gemv_h200_s17.txt`). Two
explanations differ in their fix: the access pattern (boxes of a few hundred bytes from rows 16 KB apart, a
power-of-two pitch that could keep landing on one HBM channel: repack or pad the rows), or the size of the launch
(an 84-100 MB GEMV pays its ramp and tail on a third of the time a 200-560 MB one has). Here each program streams
its row tile's [BN, W bytes] boxes along K (a split of them) through Triton's TMA pipeline and only XORs them,
so the time is the memory system's:

  * the same 84 MB as [32768, 2560 B] rows (gate/up's quant-word pitch) and as [5120, 16384 B] (Q4_K ffn_down's);
  * the long rows again with their pitch padded by 128 B to 2 KB (off the power of two);
  * Q8_0 ffn_down's [5120, 32768 B] with and without padding; and the short layout at 42, 84, 168 and 336 MB.

Each case is timed by CUDA events around one launch after a 256 MB memset evicts L2, median of 30. The memset
leaves dirty lines whose write-backs overlap the timed reads, so absolute figures run low: compare within a run.

  python benchmarks/tma_read_probe.py --out benchmarks/results/tma_read_probe_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _read(desc, out_ptr, n_k_tiles, per_split, BN: tl.constexpr, WW: tl.constexpr, STAGES: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    acc = tl.zeros((BN, WW), dtype=tl.int32)
    t0 = s * per_split
    t1 = tl.minimum(t0 + per_split, n_k_tiles)
    for t in tl.range(t0, t1, num_stages=STAGES):
        acc ^= desc.load([r * BN, t * WW])
    tl.store(out_ptr + r * tl.num_programs(1) + s, tl.sum(tl.sum(acc & 0xFF, axis=1), axis=0))


def case(rows: int, row_bytes: int, bn: int, w: int, split: int, stages: int, pad: int = 0, reps: int = 30) -> dict:
    from triton.tools.tensor_descriptor import TensorDescriptor

    x = torch.randint(-2**31, 2**31 - 1, (rows, (row_bytes + pad) // 4), dtype=torch.int32, device="cuda")
    x = x[:, :row_bytes // 4]  # rows row_bytes + pad bytes apart
    desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [bn, w // 4])
    n_k = row_bytes // w
    per = triton.cdiv(n_k, split)
    grid = (rows // bn, split)
    out = torch.empty(grid[0] * split, dtype=torch.int32, device="cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def launch():
        _read[grid](desc, out, n_k, per, BN=bn, WW=w // 4, STAGES=stages, num_warps=4, num_stages=stages)

    launch()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    us = statistics.median(times)
    return dict(rows=rows, row_bytes=row_bytes, pad=pad, bn=bn, box_bytes=w, split=split, stages=stages,
                programs=grid[0] * split, us=round(us, 2), GBps=round(rows * row_bytes / us / 1e3, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tma_read_probe.json")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("error: tma_read_probe.py needs a CUDA GPU with TMA (sm_90 or later)")
    rows = []
    for bn, w, stages, split in ((64, 256, 3, 8), (32, 1024, 3, 8), (16, 1024, 4, 8)):
        rows.append(case(32768, 2560, bn, w, 1, stages))
        rows += [case(5120, 16384, bn, w, split, stages, pad=pad) for pad in (0, 128, 256, 512, 2048)]
        rows += [case(5120, 32768, bn, w, split, stages, pad=pad) for pad in (0, 512)]
    rows += [case(n, 2560, 32, 1024, 1, 3) for n in (16384, 65536, 131072)]
    for r in rows:
        print(r, flush=True)
    res = {"benchmark": "tma_read_probe", "device": torch.cuda.get_device_name(),
           "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
           "timing": "CUDA events around one launch after a 256 MB memset, median of 30", "rows": rows}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
