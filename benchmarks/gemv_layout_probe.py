"""Does a GEMV's speed depend on how its weight rows lie in memory? Two probes of the streaming xq GEMV
(kernels/gguf_gemv_wide.py) at Devstral-Small's ffn_down, each call timed alone as gguf_gemv_sweep.py times it
(its activation quantization included, one CUDA graph, L2 flushed before each call, median of --reps):

* long against short rows: [N, K] split S against [S*N, K/S] unsplit -- the same bytes, the same number of
  programs and of K-tiles a program; only the row length (16 KB of Q4_K words a row at K = 32768) and the
  split-K epilogue differ;
* padded rows: every planar field's rows padded by P bytes (Q4_K's mn by P / 2: the kernels take each field's row
  stride, mn's as half sc's), the same weights and launch configs, outputs compared bit for bit: power-of-two row
  strides (16 KB) against strides that spread a tile's rows over more DRAM channels.

  python benchmarks/gemv_layout_probe.py --out benchmarks/results/gemv_layout_probe_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devstral.kernels import gguf_gemv_wide  # noqa: E402
from devstral.kernels.gguf_pack import PackedGGUF, pack  # noqa: E402
from devstral.quant import QType  # noqa: E402
from gguf_gemv_sweep import random_gguf, time_us  # noqa: E402

LONG_SHORT = [("Q4_K", 5120, 32768, dict(bn=128, ns=16, split_k=8)), ("Q4_K", 40960, 4096, dict(bn=128, ns=16)),
              ("Q4_K", 5120, 32768, dict(bn=128, ns=16, split_k=7)), ("Q4_K", 35840, 4608, dict(bn=128, ns=16)),
              ("Q4_K", 5120, 32768, dict(bn=128, ns=16, split_k=4)), ("Q4_K", 20480, 8192, dict(bn=128, ns=16)),
              ("Q4_K", 65536, 5120, dict(bn=128, ns=16)),
              ("Q6_K", 5120, 32768, dict(bn=128, ns=16, split_k=8)), ("Q6_K", 40960, 4096, dict(bn=128, ns=16)),
              ("Q6_K", 5120, 32768, dict(bn=128, ns=16, stream=3)), ("Q6_K", 5120, 32768, dict(bn=64, ns=16, split_k=4)),
              ("Q6_K", 20480, 8192, dict(bn=64, ns=16))]
PADDED = [("Q4_K", 5120, 32768, dict(bn=128, ns=16, split_k=7)), ("Q4_K", 5120, 32768, dict(bn=128, ns=16, split_k=8)),
          ("Q6_K", 5120, 32768, dict(bn=128, ns=16, stream=3)), ("Q6_K", 5120, 32768, dict(bn=128, ns=16, split_k=8)),
          ("Q4_K", 5120, 4096, dict(bn=128, ns=16, split_k=8)), ("Q4_K", 65536, 5120, dict(bn=128, ns=16)),
          ("Q6_K", 131072, 5120, dict(bn=64, ns=16))]
PADS = (0, 128, 256, 512, 1280)


def padded(p: PackedGGUF, pad_bytes: int) -> PackedGGUF:
    """The same weight with every field's rows pad_bytes apart beyond their length (its own buffers); Q4_K's mn
    rows pad_bytes / 2, as the kernels take its row stride to be half the sc plane's."""
    out = object.__new__(PackedGGUF)
    out.qtype, out.n, out.k, out.fmt, out.buf, out.rows_of = p.qtype, p.n, p.k, p.fmt, p.buf, None
    out.arrays = {}
    for name, a in p.arrays.items():
        pad = pad_bytes // 2 if name == "mn" else pad_bytes
        big = torch.zeros(a.shape[0], a.shape[1] + pad // a.element_size(), dtype=a.dtype, device=a.device)
        big[:, :a.shape[1]] = a
        out.arrays[name] = big[:, :a.shape[1]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: gemv_layout_probe.py times GPU kernels: no CUDA device here")
    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)

    def timed(p: PackedGGUF, cfg: dict) -> tuple[float, torch.Tensor]:
        x = torch.randn(1, p.k, device=dev, generator=torch.Generator(device=dev).manual_seed(1)).to(torch.bfloat16)
        out = torch.empty(1, p.n, device=dev, dtype=torch.bfloat16)
        kw = dict(cfg, bm=1, int8=True, xq=True)
        gguf_gemv_wide.gemv(x, p, None, out, **kw)
        first = out.clone()
        return time_us(lambda: gguf_gemv_wide.gemv(x, p, None, out, **kw), flush, a.reps), first

    long_short = []
    for qtype, n, k, cfg in LONG_SHORT:
        p = pack(random_gguf(qtype, n, k, 5), QType[qtype], n, k)
        us, _ = timed(p, cfg)
        long_short.append(dict(qtype=qtype, n=n, k=k, cfg=cfg, us=us, mb=p.nbytes() / 1e6))
        print(f"{qtype} {n}x{k} {cfg}: {us:.2f} us", flush=True)
    pads = []
    for qtype, n, k, cfg in PADDED:
        base = pack(random_gguf(qtype, n, k, 5), QType[qtype], n, k)
        ref = None
        for pad in PADS:
            us, out = timed(base if pad == 0 else padded(base, pad), cfg)
            ref = out if ref is None else ref
            pads.append(dict(qtype=qtype, n=n, k=k, cfg=cfg, pad_bytes=pad, us=us, equal=torch.equal(out, ref)))
            print(f"{qtype} {n}x{k} {cfg} pad {pad}: {us:.2f} us", flush=True)
        del base
        torch.cuda.empty_cache()
    report = {"benchmark": "gemv_layout_probe", "machine": {"device": torch.cuda.get_device_name(dev),
                                                            "host": platform.node()},
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "long_against_short_rows": {"rows": long_short}, "padded_rows": {"rows": pads}}
    text = json.dumps(report, indent=1)
    if a.out:
        tmp = a.out.with_name(a.out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(a.out)
    else:
        print(text)


if __name__ == "__main__":
    main()
