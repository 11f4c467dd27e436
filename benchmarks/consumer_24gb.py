"""Does Devstral Small Q4_K_M with a q8_0 KV cache and a 32k context fit a 24 GB GPU? (issue 11)

The process is capped with torch.cuda.set_per_process_memory_fraction to 24 GB (--cap-gb) before
anything is allocated. It loads a Devstral-Small-shape Q4_K_M GGUF (made with
../shared/peers/mk_devstral_shape_gguf.py when --gguf is not given), reports the GPU bytes of the
loaded weights against the file's size, then generates through the engine (LLM.generate: chunked
prefill of a 32k-token prompt into a q8_0 paged KV cache, then a few greedy decode steps at that
context length). It fits if nothing runs out of memory; the engine is told the same share of the
GPU as the cap (gpu_memory_fraction) so that it plans its KV pool inside it.

    python benchmarks/consumer_24gb.py [--gguf devstral-small-Q4_K_M.gguf] [--ctx 32768]

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
    ap.add_argument("--decode-steps", type=int, default=16)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    cap = min(1.0, args.cap_gb * 1e9 / total)
    torch.cuda.set_per_process_memory_fraction(cap, dev)

    import devstral
    from devstral import SamplingParams
    from devstral.quant.linear import GGUFWeight

    result: dict = {"benchmark": "consumer_24gb", "device": torch.cuda.get_device_name(dev),
                    "cap_bytes": int(cap * total), "ctx": args.ctx, "kv_cache": "q8_0"}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.gguf or make_gguf(Path(tmp), args.mk_script)
        result["file_bytes"] = path.stat().st_size
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        # the engine plans its KV pool as a share of the whole GPU: the same share as the cap
        llm = devstral.load(path, device="cuda", kv_cache_dtype="q8_0", max_context=args.ctx,
                            gpu_memory_fraction=cap, speculative="off")
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
        result["max_context"] = llm.max_context
        print(f"loaded in {result['load_s']} s: {gib(result['weights']['allocated_after_load'])} GiB on the GPU for a "
              f"{gib(result['file_bytes'])} GiB file ({result['weights']['allocated_over_file']}x)", flush=True)

        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, llm.config.vocab_size, (args.ctx - args.decode_steps,), generator=g).tolist()
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            c = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=args.decode_steps))
            t = c.timings
            result.update(fits=True, prompt_tokens=len(prompt), completion_tokens=len(c.token_ids),
                          prefill_tok_per_s=round(t.get("prefill_tok_s", 0.0), 1),
                          decode_tok_per_s_at_ctx=round(t.get("decode_tok_s", 0.0), 2))
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
