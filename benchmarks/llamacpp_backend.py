"""`--backend llama.cpp` against plain llama-cpp-python and against our torch CPU path, on one Q4_K_M GGUF.

A random-weight Mistral-shape model (~0.57B parameters: dim 1024, 20 layers, GQA 8/2, SwiGLU 4096,
the real 131072-token tekken vocabulary) is written by our exporter as Q4_K_M (reused from --work when
there). Three ways to run it, same file, same thread count, greedy, in the same run:

- plain: llama-cpp-python's own loop (`Llama.eval` for the prompt, `Llama.generate` for the tokens),
  flash attention on and an f16 cache, as llama.cpp's `auto` picks them for our backend;
- ours-llama.cpp: `devstral.load(backend="llama.cpp")` and `LLM.stream` (our sampler, detokenizer and
  stop handling over LlamaCppEngine); also 4 sequences decoding at once (one llama_decode per step);
- ours-torch: `devstral.load(backend="torch")`, our PyTorch engine on the CPU with the weights kept as
  Q4_K blocks (speculation off, so every token is one pass).

Every measurement runs in a fresh process (no thread pools left spinning by another engine);
plain and ours-llama.cpp alternate run by run so that load on this shared machine hits both alike.
Prefill tok/s: prompt tokens over the time to the first token; decode tok/s: the tokens after the
first over the time after it. Medians of --runs. The machine's load average is recorded before and
after (the 2-core CI machine is shared with other work).

    python benchmarks/llamacpp_backend.py [--runs 5] [--torch-runs 3] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SHAPE = dict(dim=1024, n_layers=20, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=4096,
             max_position_embeddings=32768)
VOCAB = 131072
TEXT = ("def merge_sorted(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
        "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n")


def make_gguf(work: Path) -> tuple[Path, float]:
    """The Q4_K_M file and the seconds our exporter took to write it (remembered beside the file)."""
    out = work / "random-0.57b-Q4_K_M.gguf"
    took = out.with_suffix(".quantize_s")
    if out.exists() and took.exists():
        return out, float(took.read_text())
    import torch

    from devstral.formats.gguf import export_gguf
    from devstral.testing import make_tiny_checkpoint

    folder = make_tiny_checkpoint(work / "random-0.57b", dtype=torch.bfloat16, std=0.02, inner_vocab=VOCAB - 1000,
                                  **SHAPE)
    start = time.perf_counter()
    export_gguf(folder, out, "Q4_K_M")
    seconds = time.perf_counter() - start
    took.write_text(f"{seconds:.1f}")
    return out, seconds


def prompt_ids(gguf: Path, n: int) -> list[int]:
    from devstral.prompt.tokenizer import load_tokenizer

    tok = load_tokenizer(gguf)
    ids = tok.encode(TEXT * (n // 20 + 2), bos=True)
    return ids[:n]


# ---------------------------------------------------------------- one measurement (in a child process)
def child(kind: str, gguf: str, prompt_len: int, new_tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    ids = prompt_ids(Path(gguf), prompt_len)
    ctx = 2048
    if kind == "plain":
        import llama_cpp

        llm = llama_cpp.Llama(gguf, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                              flash_attn=True, verbose=False)
        llm.eval(ids[:8])  # warm-up: first-call allocations
        t0 = time.perf_counter()
        gen = llm.generate(ids, temp=0.0, top_k=1, reset=True)
        next(gen)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(gen)
        t2 = time.perf_counter()
        return {"prefill_tok_s": prompt_len / (t1 - t0), "decode_tok_s": (new_tokens - 1) / (t2 - t1),
                "new_tokens": new_tokens}
    import devstral
    from devstral.engine.sampling import SamplingParams

    backend = "llama.cpp" if kind.startswith("ours-llama.cpp") else "torch"
    parallel = 4 if kind.endswith("x4") else 1
    llm = devstral.load(gguf, backend=backend, device="cpu", max_context=ctx, parallel=parallel, threads=threads,
                        prefix_caching=False, speculative="off")
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens)
    llm.generate(ids[:8], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    if parallel == 1:
        out = llm.generate(ids, greedy)
        if len(out.token_ids) != new_tokens:
            raise RuntimeError(f"generation stopped after {len(out.token_ids)} tokens ({out.finish_reason})")
        return {"prefill_tok_s": out.timings["prefill_tok_s"], "decode_tok_s": out.timings["decode_tok_s"],
                "new_tokens": len(out.token_ids)}
    engine = llm.engine  # 4 sequences at once: aggregate decode throughput once every prompt is in
    seqs = [engine.add(ids[i:], greedy, new_tokens, set()) for i in range(parallel)]
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    t_first, made_first = time.perf_counter(), sum(s.num_output_tokens for s in seqs)
    while engine.has_work():
        engine.step()
    made = sum(s.num_output_tokens for s in seqs)
    return {"decode_tok_s": (made - made_first) / (time.perf_counter() - t_first), "new_tokens": made,
            "sequences": parallel}


def run_child(kind: str, gguf: Path, prompt_len: int, new_tokens: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(gguf), str(prompt_len), str(new_tokens),
                          str(threads)], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "llama-cpp-python", "gguf", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    with contextlib.suppress(OSError):
        out["devstral_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                text=True, cwd=Path(__file__).parent).stdout.strip()
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary(runs: list[dict]) -> dict:
    out: dict = {"runs": runs}
    for key in ("prefill_tok_s", "decode_tok_s"):
        values = [r[key] for r in runs if key in r]
        if values:
            out[f"median_{key}"] = round(statistics.median(values), 2)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, gguf, prompt_len, new_tokens, threads = sys.argv[2:7]
        print(json.dumps(child(kind, gguf, int(prompt_len), int(new_tokens), int(threads))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/devstral-bench-llamacpp"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--torch-runs", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--torch-new-tokens", type=int, default=16, help="fewer: the torch path is slow here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llamacpp_backend_cpu.json")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    gguf, quantize_s = make_gguf(a.work)
    from devstral.formats.gguf import GGUFFile

    g = GGUFFile(gguf)
    n_params = sum(int(__import__("math").prod(g.info(n).shape)) for n in g.tensor_names)
    results: dict[str, list[dict]] = {"plain": [], "ours-llama.cpp": [], "ours-llama.cpp-x4": [], "ours-torch": []}
    loads = []
    for r in range(a.runs):
        for kind in ("plain", "ours-llama.cpp"):
            loads.append(os.getloadavg()[0])
            results[kind].append(run_child(kind, gguf, a.prompt_len, a.new_tokens, a.threads))
            print(kind, r, results[kind][-1], file=sys.stderr)
    for r in range(max(1, a.runs // 2)):
        results["ours-llama.cpp-x4"].append(run_child("ours-llama.cpp-x4", gguf, a.prompt_len, a.new_tokens, a.threads))
        print("ours-llama.cpp-x4", r, results["ours-llama.cpp-x4"][-1], file=sys.stderr)
    for r in range(a.torch_runs):
        loads.append(os.getloadavg()[0])
        results["ours-torch"].append(run_child("ours-torch", gguf, a.prompt_len, a.torch_new_tokens, a.threads))
        print("ours-torch", r, results["ours-torch"][-1], file=sys.stderr)
    res = {k: summary(v) for k, v in results.items()}
    ours, plain, torch_ = (res[k]["median_decode_tok_s"] for k in ("ours-llama.cpp", "plain", "ours-torch"))
    report = {
        "benchmark": "--backend llama.cpp vs plain llama-cpp-python vs our torch CPU engine, one Q4_K_M GGUF",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "threads": a.threads,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_during_runs": [round(x, 2) for x in loads],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "note": "2 cores shared with other engineers' work: load above ~1 slows every engine; "
                            "plain and ours-llama.cpp alternate run by run so they share it alike"},
        "versions": versions(),
        "model": {"shape": SHAPE, "vocab": VOCAB, "parameters": n_params, "file": gguf.name,
                  "file_bytes": gguf.stat().st_size, "type": "Q4_K_M (our exporter)",
                  "quantize_s": round(quantize_s, 1)},
        "settings": {"prompt_tokens": a.prompt_len, "new_tokens": a.new_tokens,
                     "torch_new_tokens": a.torch_new_tokens, "greedy": True, "kv_cache": "f16 (llama.cpp), "
                     "fp32 (torch engine on the CPU)", "flash_attention": "on (llama.cpp's auto on the CPU)",
                     "runs": a.runs, "torch_runs": a.torch_runs},
        "results": res,
        "ratios": {"decode_ours_llama_cpp_over_plain": round(ours / plain, 3),
                   "decode_ours_llama_cpp_over_ours_torch": round(ours / torch_, 1),
                   "prefill_ours_llama_cpp_over_plain": round(res["ours-llama.cpp"]["median_prefill_tok_s"]
                                                              / res["plain"]["median_prefill_tok_s"], 3),
                   "decode_x4_aggregate_over_plain": round(res["ours-llama.cpp-x4"]["median_decode_tok_s"] / plain, 2)},
        "targets": {"decode >= 0.9x plain llama-cpp-python": ours >= 0.9 * plain,
                    "decode >= 5x our torch CPU path": ours >= 5 * torch_},
    }
    text = json.dumps(report, indent=2)
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
