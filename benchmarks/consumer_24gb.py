"""Does Devstral Small Q4_K_M with a q8_0 KV cache and a 32k context fit a 24 GB GPU? (issue 11)

The process is capped with torch.cuda.set_per_process_memory_fraction to 24 GB (--cap-gb) before
anything is allocated. It loads a Devstral-Small-shape Q4_K_M GGUF (made with
../shared/peers/mk_devstral_shape_gguf.py when --gguf is not given), reports the GPU bytes of the
loaded weights against the file's size, then runs a forward pass over a 32k-token sequence in
prefill chunks through the existing LLM API (the model with its q8_0 KVCache, as LLM.stream does),
and a few decode steps at that context length. It fits if nothing runs out of memory.

    python benchmarks/consumer_24gb.py [--gguf devstral-small-Q4_K_M.gguf] [--ctx 32768] [--chunk 512]

JSON goes to $OUT/consumer_24gb.json when OUT is set, else benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

MK_CANDIDATES = [REPO.parent / "shared/peers/mk_devstral_shape_gguf.py", REPO / "shared/peers/mk_devstral_shape_gguf.py",
                 Path("/work/shared/peers/mk_devstral_shape_gguf.py")]


def make_gguf(folder: Path, script: Path | None) -> Path:
    script = script or next((p for p in MK_CANDIDATES if p.is_file()), None)
    if script is None:
        sys.exit("no --gguf and mk_devstral_shape_gguf.py not found (pass --mk-script)")
    out = folder / "devstral-small-shape-Q4_K_M.gguf"
    subprocess.run([sys.executable, str(script), str(out), "--type", "Q4_K_M"], check=True)
    return out


def gib(n: int) -> float:
    return round(n / (1 << 30), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--mk-script", type=Path)
    ap.add_argument("--cap-gb", type=float, default=24.0)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the engine's)")
    ap.add_argument("--decode-steps", type=int, default=16)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).total_memory
    cap = min(1.0, args.cap_gb * 1e9 / total)
    torch.cuda.set_per_process_memory_fraction(cap, dev)

    import devstral
    from devstral.engine.generate import PREFILL_CHUNK
    from devstral.quant.linear import GGUFWeight

    args.chunk = args.chunk or PREFILL_CHUNK
    result: dict = {"benchmark": "consumer_24gb", "device": torch.cuda.get_device_name(dev),
                    "cap_bytes": int(cap * total), "ctx": args.ctx, "chunk": args.chunk, "kv_cache": "q8_0"}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.gguf or make_gguf(Path(tmp), args.mk_script)
        result["file_bytes"] = path.stat().st_size
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm = devstral.load(path, device="cuda", kv_cache_dtype="q8_0", max_context=args.ctx)
        torch.cuda.synchronize()
        result["load_s"] = round(time.perf_counter() - t0, 1)
        weights = [m for m in llm.model.modules() if isinstance(m, GGUFWeight)]
        result["weights"] = {
            "gpu_bytes_quantized": sum(w.nbytes() for w in weights),
            "file_bytes_quantized": sum(w.file_bytes for w in weights),
            "modes": sorted({w.mode for w in weights}),
            "allocated_after_load": torch.cuda.memory_allocated(dev),
        }
        result["weights"]["allocated_over_file"] = round(result["weights"]["allocated_after_load"]
                                                         / result["file_bytes"], 4)
        print(f"loaded in {result['load_s']} s: {gib(result['weights']['allocated_after_load'])} GiB on the GPU for a "
              f"{gib(result['file_bytes'])} GiB file ({result['weights']['allocated_over_file']}x)", flush=True)

        cache = llm.new_cache(args.ctx)
        result["kv_cache_bytes"] = sum(t.numel() * t.element_size() for t in vars(cache).values()
                                       if isinstance(t, torch.Tensor))
        ids = torch.randint(3, llm.config.vocab_size, (1, args.ctx - args.decode_steps), device=dev)
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            with torch.inference_mode():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                logits = None
                for start in range(0, ids.shape[1], args.chunk):
                    logits = llm.model(ids[:, start:start + args.chunk], cache=cache, start=start, last_only=True)
                torch.cuda.synchronize()
                prefill_s = time.perf_counter() - t0
                pos = ids.shape[1]
                token = logits[:, -1].argmax(-1, keepdim=True)
                t0 = time.perf_counter()
                for step in range(args.decode_steps):
                    logits = llm.model(token, cache=cache, start=pos + step, last_only=True)
                    token = logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                decode_s = time.perf_counter() - t0
            result.update(fits=True, prefill_tok_per_s=round(ids.shape[1] / prefill_s, 1),
                          decode_tok_per_s_at_ctx=round(args.decode_steps / decode_s, 2),
                          logits_finite=bool(torch.isfinite(logits).all()))
        except torch.OutOfMemoryError as e:
            result.update(fits=False, error=str(e).splitlines()[0])
        result["peak_allocated"] = torch.cuda.max_memory_allocated(dev)
        result["peak_reserved"] = torch.cuda.max_memory_reserved(dev)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "consumer_24gb.json"
    tmp_file = target.with_suffix(".tmp")
    tmp_file.write_text(json.dumps(result, indent=1))
    tmp_file.replace(target)
    print(json.dumps({k: v for k, v in result.items() if k != "weights"}, indent=1))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
