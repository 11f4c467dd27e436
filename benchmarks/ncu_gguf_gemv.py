"""The workload Nsight Compute profiles for the decode GEMVs' stall and memory analysis: Devstral-Small's big matrices at
one activation row with the tuned table's plans (gguf_linear.linear: the TMA GEMV where the table names it), each
launched twice (the first round compiles). SHAPES holds the ones that reach 84-99% of the copy bandwidth alone (Q4_K
gate/up, Q6_K output, Q8_0 gate/up) beside the long-K ones that stay at 70-85% (every ffn_down, K = 32768). Run under
ncu, skipping the first round's GEMVs (the activation quantization launches are not matched), at the GPU's own clocks:

  ncu --clock-control none -k regex:"_wide_kernel|_tma_kernel" --launch-skip 6 --launch-count 6 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
      python benchmarks/ncu_gguf_gemv.py > benchmarks/results/ncu_gguf_gemv_h200_s17.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devstral.kernels import gguf_config, gguf_linear  # noqa: E402
from devstral.kernels.gguf_pack import pack  # noqa: E402
from devstral.quant import QType  # noqa: E402
from gguf_gemv_sweep import random_gguf  # noqa: E402

SHAPES = [("Q4_K", 65536, 5120), ("Q6_K", 131072, 5120), ("Q8_0", 65536, 5120), ("Q4_K", 5120, 32768),
          ("Q6_K", 5120, 32768), ("Q8_0", 5120, 32768)]


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("error: ncu_gguf_gemv.py runs GPU kernels: no CUDA device here")
    dev = torch.device("cuda")
    work = []
    for qtype, n, k in SHAPES:
        p = pack(random_gguf(qtype, n, k, 3), QType[qtype], n, k)
        kind, cfg = gguf_config.gguf_plan(qtype, 1, n, k, dev)
        work.append((qtype, n, k, kind, cfg, p, torch.randn(1, k, device=dev, dtype=torch.bfloat16)))
    for rep in range(2):
        for qtype, n, k, kind, cfg, p, x in work:
            if rep:
                print(qtype, n, k, kind, cfg, flush=True)
            gguf_linear.linear(x, p)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
