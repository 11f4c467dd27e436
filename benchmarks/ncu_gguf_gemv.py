"""The workload Nsight Compute profiles for the decode GEMVs' stall analysis: Devstral-Small's three big matrices at
one activation row (Q4_K gate/up 65536 x 5120, Q4_K and Q6_K ffn_down 5120 x 32768) with the tuned table's plans, each
launched twice (the first round compiles). Run under ncu, skipping the first round's three GEMVs, at the GPU's own
clocks:

  ncu --clock-control none -k regex:_wide_kernel --launch-skip 3 --launch-count 3 --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis python benchmarks/ncu_gguf_gemv.py > benchmarks/results/ncu_gguf_gemv_h200_s15.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devstral.kernels import gguf_config, gguf_gemv_wide  # noqa: E402
from devstral.kernels.gguf_pack import pack  # noqa: E402
from devstral.quant import QType  # noqa: E402
from gguf_gemv_sweep import random_gguf  # noqa: E402

SHAPES = [("Q4_K", 65536, 5120), ("Q4_K", 5120, 32768), ("Q6_K", 5120, 32768)]


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("error: ncu_gguf_gemv.py runs GPU kernels: no CUDA device here")
    dev = torch.device("cuda")
    work = []
    for qtype, n, k in SHAPES:
        p = pack(random_gguf(qtype, n, k, 3), QType[qtype], n, k)
        kind, cfg = gguf_config.gguf_plan(qtype, 1, n, k, dev)
        work.append((qtype, n, k, kind, cfg, p, torch.randn(1, k, device=dev, dtype=torch.bfloat16),
                     torch.empty(1, n, device=dev, dtype=torch.bfloat16)))
    for rep in range(2):
        for qtype, n, k, kind, cfg, p, x, out in work:
            if rep:
                print(qtype, n, k, kind, cfg, flush=True)
            gguf_gemv_wide.gemv(x, p, None, out, **dict(cfg, int8=kind != "wide", xq=kind == "wide_xq"))
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
