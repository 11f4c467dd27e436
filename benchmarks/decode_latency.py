"""The small launches of a batch-1 decode step, one knob at a time, at Devstral-Small shapes on one GPU.

A Q4_K_M decode step spends about 1 ms of its 5 outside the weight GEMVs (benchmarks/step_profile.py):
the split-KV attention and its merge, the RMSNorms that also write the GEMVs' int8 activations, and the
GEMVs that run as about one wave (ffn_down). Each section here times the candidates of one such knob the
way the engine runs them (benchmarks/engine_kernels.py's Bench: calls cycled in one CUDA graph over enough
copies that every call reads HBM, median of 5 replays) and checks each against its reference:

* attention: B=1 over contexts 512..32k with the grid sized for a 131072-token max_context (as the engine
  captures it), over the split's minimum keys (DecodeConfig.min_chunk: 0 = off) and merged in the launch
  or by pass 2;
* norm_xq: RMSNorm (and residual add + RMSNorm) writing one or two gguf_xq layouts, over warps and blocks
  of 32 per program, against the plain norm;
* gemv_panels: the Q4_K / Q6_K ffn_down GEMV [5120, 32768] at its tuned config against the same bytes as
  [40960, 4096] (eight contiguous K panels), which shows what the split-K access pattern and single wave
  cost against a many-wave GEMV over contiguous rows.

    python benchmarks/decode_latency.py [--sections attention,norm_xq,gemv_panels]   # $OUT or results/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devstral.kernels import gguf_xq  # noqa: E402
from devstral.kernels.paged_attention import decode_attention_ref  # noqa: E402
from devstral.kernels.paged_attention_triton import DecodeConfig, decode_attention_triton, planned_splits  # noqa: E402
from devstral.kernels.rms_norm import add_rms_norm_ref  # noqa: E402
from devstral.kernels.rms_norm_triton import add_rms_norm_triton, rms_norm_triton  # noqa: E402
from engine_kernels import FULL, Bench, _random_layer, kv_bytes_per_token_head, rel_err  # noqa: E402

SECTIONS = ("attention", "norm_xq", "gemv_panels")
CONTEXTS = (512, 640, 1024, 2048, 8192, 32768)
MIN_CHUNKS = (0, 128, 256, 512, 1024)


def _used_splits(ctx: int, splits: int, min_chunk: int, block_n: int) -> int:
    """The splits a row of ctx keys uses (the kernel's _split_range)."""
    whole = lambda n: -(-n // block_n) * block_n  # noqa: E731
    return -(-ctx // max(whole(-(-ctx // splits)), whole(min_chunk)))


def bench_attention(b: Bench, kinds: tuple[str, ...]) -> list[dict]:
    s, out = FULL, []
    H, Hkv, D, page = s["n_heads"], s["n_kv_heads"], s["head_dim"], s["page"]
    for kind in kinds:
        for ctx in CONTEXTS:
            blocks = -(-ctx // page)
            g = torch.Generator(device=b.device).manual_seed(ctx)
            tables = torch.randperm(blocks, device=b.device, generator=g).view(1, blocks).to(torch.int32)
            lens = torch.full((1,), ctx, dtype=torch.int32, device=b.device)
            kv_bytes = ctx * 2 * Hkv * kv_bytes_per_token_head(kind, D)
            layers = [_random_layer(kind, blocks + 1, s, b.device, g) for _ in range(b.copies(kv_bytes))]
            q = torch.randn(1, H + 2 * Hkv, D, device=b.device, dtype=torch.bfloat16, generator=g)[:, :H]
            ref = decode_attention_ref(q, layers[0], tables, lens, D ** -0.5)
            for fused in (False, True):
                for mc in MIN_CHUNKS:
                    cfg = DecodeConfig(fused_merge=fused, min_chunk=mc)

                    def run(layer, cfg=cfg, q=q, tables=tables, lens=lens):
                        return decode_attention_triton(q, layer, tables, lens, D ** -0.5, None,
                                                       max_context=s["max_context"], config=cfg)

                    err = rel_err(run(layers[0]), ref)
                    sec = b.time([lambda layer=layer, run=run: run(layer) for layer in layers], kv_bytes / 3e12)
                    splits = planned_splits(q, layers[0], tables, lens, None, max_context=s["max_context"],
                                            config=cfg)
                    used = _used_splits(ctx, splits, mc, cfg.block_n)
                    out.append(b.entry(f"attention {kind} ctx={ctx}", sec, kv_bytes, min_chunk=mc, fused_merge=fused,
                                       grid_splits=splits, used_splits=used, rel_err=err, ok=err < 3e-2))
                    print(out[-1], flush=True)
            del layers
            torch.cuda.empty_cache()
    return out


def bench_norm_xq(b: Bench) -> list[dict]:
    dim, dev, dt = FULL["dim"], b.device, torch.bfloat16
    w = torch.randn(dim, device=dev, dtype=dt)
    n = 64
    xs = [torch.randn(1, dim, device=dev, dtype=dt) for _ in range(n)]
    ds = [torch.randn(1, dim, device=dev, dtype=dt) for _ in range(n)]
    ref = add_rms_norm_ref(xs[0], ds[0], w, 1e-5)[0].float()
    out, default_xb = [], gguf_xq.BLOCKS_PER_PROGRAM
    plain = b.time([lambda i=i: add_rms_norm_triton(xs[i], ds[i], w, 1e-5) for i in range(n)], 2e-6)
    out.append(b.entry("add_rms_norm plain", plain, 4 * dim * 2))
    plain1 = b.time([lambda i=i: rms_norm_triton(xs[i], w, 1e-5) for i in range(n)], 2e-6)
    out.append(b.entry("rms_norm plain", plain1, 2 * dim * 2))
    for layouts in ((gguf_xq.STRIDE8,), (gguf_xq.STRIDE8, gguf_xq.STRIDE4)):
        for xb in (8, 16, 32):
            for nw in (2, 4, 8, 16):
                gguf_xq.BLOCKS_PER_PROGRAM = xb
                try:
                    y = add_rms_norm_triton(xs[0], ds[0], w, 1e-5, num_warps=nw, xq=layouts)[0]
                    err = rel_err(y, ref)
                    sec = b.time([lambda i=i, nw=nw, la=layouts: add_rms_norm_triton(xs[i], ds[i], w, 1e-5,
                                                                                     num_warps=nw, xq=la)
                                  for i in range(n)], 3e-6)
                finally:
                    gguf_xq.BLOCKS_PER_PROGRAM = default_xb
                out.append(b.entry(f"add_rms_norm xq={len(layouts)}", sec, 4 * dim * 2, blocks_per_program=xb,
                                   num_warps=nw, rel_err=err, ok=err < 1e-2))
                print(out[-1], flush=True)
    return out


def bench_gemv_panels(b: Bench) -> list[dict]:
    from devstral.kernels import gguf_config
    from devstral.kernels.gguf_pack import pack
    from devstral.quant import QType
    from gguf_gemv_sweep import KERNELS, random_gguf

    out = []
    table = gguf_config.table_for(b.device)
    for qtype in ("Q4_K", "Q6_K"):
        for n, k, configs in (
                (5120, 32768, [None]),
                (40960, 4096, [dict(bn=128, ns=16, bm=1, split_k=1, num_warps=4),
                               dict(bn=64, ns=16, bm=1, split_k=1, num_warps=4),
                               dict(bn=128, ns=16, bm=1, num_warps=4, stream=2),
                               dict(bn=128, ns=16, bm=1, num_warps=4, stream=3)])):
            ws = [pack(random_gguf(qtype, n, k, seed=c), QType[qtype], n, k) for c in range(3)]
            x = torch.randn(1, k, device=b.device, dtype=torch.bfloat16)
            y = torch.empty(1, n, device=b.device, dtype=torch.bfloat16)
            for cfg in configs:
                if cfg is None:
                    hit = gguf_config.decode_entry(table, qtype, 1, n, k)
                    kind, cfg = hit["kind"], {key: v for key, v in hit.items() if key != "kind"}
                else:
                    kind = "wide_xq"
                try:
                    sec = b.time([lambda w=w, kind=kind, cfg=cfg, x=x, y=y: KERNELS[kind](x, w, None, y, **cfg)
                                  for w in ws],
                                 3e-5)
                except Exception as e:  # noqa: BLE001 -- a config the GPU refuses is reported
                    out.append({"name": f"gemv {qtype} [{n}, {k}]", "config": cfg, "error": str(e)[:200]})
                    continue
                out.append(b.entry(f"gemv {qtype} [{n}, {k}]", sec, ws[0].nbytes(), kind=kind, config=cfg))
                print(out[-1], flush=True)
            del ws
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--kinds", default="bf16", help="KV cache kinds for the attention section")
    args = ap.parse_args()
    dev = torch.device("cuda")
    b = Bench(dev, smoke=False)
    res = {"benchmark": "decode_latency", "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "max_context": FULL["max_context"],
           "timing": "calls cycled in one CUDA graph over copies that defeat L2, median of 5 replays, per call"}
    res["triton"] = triton.__version__
    res["copy_bandwidth_tb_s"] = round(b.copy_bw / 1e12, 4)  # an SM kernel's read + write: the rows' fractions
    sections = args.sections.split(",")
    if "attention" in sections:
        res["attention"] = bench_attention(b, tuple(args.kinds.split(",")))
    if "norm_xq" in sections:
        res["norm_xq"] = bench_norm_xq(b)
    if "gemv_panels" in sections:
        res["gemv_panels"] = bench_gemv_panels(b)
    dest = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    gpu = res["device"].lower().replace("nvidia ", "").replace(" ", "_")
    path = dest / f"decode_latency_{gpu}.json"
    path.write_text(json.dumps(res, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
