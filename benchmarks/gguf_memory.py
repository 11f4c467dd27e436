"""Peak memory of a loaded GGUF vs its file size, on a synthetic Mistral-shaped model of a few hundred MB.

Writes benchmarks/results/gguf_memory_cpu.json. Each measurement runs in a fresh Python process:
it imports every library the load needs, reads VmHWM (peak resident set) from /proc/self/status as
the baseline, loads the GGUF with `devstral.load`, reads VmHWM again, runs one forward pass, and
reads it a third time. The growth of VmHWM over the baseline, divided by the file size, says how
much memory a loaded model costs per byte of file (1.0: weights used in place; more: copies or
dequantized buffers). Each (type, phase) is the median of --runs processes.

--types are written by our exporter; --llama-cpp-types are also quantized by llama.cpp's quantizer
(llama_cpp.llama_model_quantize) from our F16 file, as a cross-check and as the fallback for when our
Python K-quant quantizer is too slow for a model of this size.

    python benchmarks/gguf_memory.py --dim 1024 --layers 10 --hidden 3072 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def proc_status() -> dict[str, int]:
    """Those /proc/self/status fields, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _STATUS_FIELDS:
                out[key] = int(value.split()[0]) * 1024
    return out


def child(path: str, tokens: int) -> dict:
    """One fresh-process measurement (run with --child)."""
    import torch

    import devstral
    import devstral.engine.generate
    import devstral.formats.gguf
    import devstral.formats.gguf_model
    import devstral.prompt.jinja_template
    import devstral.quant  # noqa: F401  (imported before the baseline: libraries are not the model)

    torch.zeros(8) @ torch.zeros(8)  # start torch's CPU runtime before the baseline as well
    import jinja2  # noqa: F401
    import tokenizers  # noqa: F401

    before_dynamo = proc_status()
    import torch._dynamo  # noqa: F401  (the model's meta-device init pulls it in, sympy included)

    base = proc_status()
    t = time.perf_counter()
    llm = devstral.load(path, device="cpu", backend="torch")  # our GGUF loader, not llama.cpp
    load_s = time.perf_counter() - t
    loaded = proc_status()
    t = time.perf_counter()
    with torch.no_grad():
        llm.logits(llm.tokenizer.encode("The quick brown fox " * (tokens // 4), bos=True)[:tokens])
    forward_s = time.perf_counter() - t
    forwarded = proc_status()
    return {"baseline": base, "after_load": loaded, "after_forward": forwarded,
            "dynamo_import_bytes": base["VmHWM"] - before_dynamo["VmHWM"],
            "load_seconds": load_s, "forward_seconds": forward_s}


def llama_cpp_quantize(src: Path, dest: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) returned {rc}")


def measure_file(path: Path, runs: int, tokens: int) -> dict:
    samples = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, __file__, "--child", str(path), str(tokens)], capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise RuntimeError(f"child failed on {path.name}:\n{out.stderr[-3000:]}")
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    size = path.stat().st_size

    def median(phase: str, field: str, minus_baseline: bool = True) -> int:
        return int(statistics.median(s[phase][field] - (s["baseline"][field] if minus_baseline else 0)
                                     for s in samples))

    row = {"file_bytes": size, "runs": runs,
           "baseline_vmhwm_bytes": median("baseline", "VmHWM", minus_baseline=False)}
    for phase in ("after_load", "after_forward"):
        growth = median(phase, "VmHWM")
        row[phase] = {"vmhwm_growth_bytes": growth, "vmhwm_growth_over_file": round(growth / size, 3),
                      "rss_anon_growth_bytes": median(phase, "RssAnon"),
                      "rss_file_growth_bytes": median(phase, "RssFile")}
    row["torch_dynamo_import_vmhwm_bytes"] = int(statistics.median(s["dynamo_import_bytes"] for s in samples))
    row["load_seconds"] = round(statistics.median(s["load_seconds"] for s in samples), 2)
    row["forward_seconds"] = round(statistics.median(s["forward_seconds"] for s in samples), 2)
    row["all_runs_vmhwm_growth_after_forward"] = [s["after_forward"]["VmHWM"] - s["baseline"]["VmHWM"]
                                                  for s in samples]
    return row


def machine() -> dict:
    import importlib.metadata

    import numpy
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    with open("/proc/meminfo") as f:
        mem_total = int(f.readline().split()[1]) * 1024
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                "gguf": importlib.metadata.version("gguf")}
    try:
        import llama_cpp

        versions["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_bytes": mem_total, "os": platform.platform(), "versions": versions, "devstral_commit": commit}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q4_K_M"])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=32768, help="total vocabulary (1000 control tokens included)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128, help="prompt length of the forward pass")
    ap.add_argument("--llama-cpp-types", nargs="*", default=["Q4_K_M"],
                    help="also measure these as quantized by llama.cpp from our F16 export")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf_memory_cpu.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return

    import torch

    from devstral.formats.gguf import export_gguf
    from devstral.testing import make_tiny_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = make_tiny_checkpoint(Path(tmp) / "ck", dim=args.dim, n_layers=args.layers, hidden_dim=args.hidden,
                                      n_heads=args.dim // 128, n_kv_heads=max(1, args.dim // 512), head_dim=128,
                                      inner_vocab=args.vocab - 1000, dtype=torch.bfloat16)
        n_params = None
        f16: Path | None = None
        jobs = [(t, "devstral") for t in args.types] + [(t, "llama.cpp") for t in args.llama_cpp_types]
        for ftype, quantizer in jobs:
            dest = Path(tmp) / f"m-{ftype}-{quantizer}.gguf"
            t = time.perf_counter()
            if quantizer == "llama.cpp":
                if f16 is None:
                    f16 = export_gguf(folder, Path(tmp) / "m-F16.gguf", "F16")
                t = time.perf_counter()
                llama_cpp_quantize(f16, dest, ftype)
                quantized_by = "llama.cpp llama_model_quantize from devstral's F16 export"
            else:
                export_gguf(folder, dest, ftype)
                quantized_by = "devstral export_gguf"
                if ftype == "F16":
                    f16 = dest
            quant_s = time.perf_counter() - t
            if n_params is None:
                from devstral.formats.gguf import GGUFFile

                g = GGUFFile(dest)
                n_params = sum(int(torch.tensor(i.shape).prod()) for i in g.infos.values())
            row = {"type": ftype, "quantized_by": quantized_by, "quantize_seconds": round(quant_s, 1),
                   **measure_file(dest, args.runs, args.tokens)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    result = {
        "benchmark": "peak RSS growth (VmHWM) of devstral.load(gguf) and of one forward pass, vs file size",
        "method": "fresh process per run; baseline read after importing torch/devstral and touching torch's CPU "
                  "runtime; growth = VmHWM - baseline VmHWM; median of runs. rss_file = memory-mapped file pages "
                  "resident, rss_anon = allocated memory (copies, dequantized or converted tensors, activations). torch._dynamo is "
                  "imported before the baseline (devstral.load pulls it in through torch's meta-device init); its "
                  "own cost is torch_dynamo_import_vmhwm_bytes.",
        "model": {"arch": "mistral", "dim": args.dim, "layers": args.layers, "hidden": args.hidden,
                  "heads": args.dim // 128, "kv_heads": max(1, args.dim // 512), "head_dim": 128,
                  "vocab": args.vocab, "parameters": n_params, "weights": "random (std 0.08), bf16 source"},
        "forward_tokens": args.tokens,
        "machine": machine(),
        "results": rows,
    }
    dest = Path(args.out)
    tmp_out = dest.with_name(f".{dest.name}.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, dest)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
