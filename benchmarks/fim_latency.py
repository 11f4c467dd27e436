"""Fill-in-the-middle latency at batch 1, the editor-autocomplete case: one request at a time against
`devstral serve`'s `/v1/fim/completions`, greedy, with a code prefix and suffix of a given token size.

Reports per shape (median of --runs), cold (a different file every run) and warm (the same prompt
again: the engine's prefix cache serves it, as when an editor asks again at the same cursor): the
time to encode the FIM prompt (mistral-common), the time to the first streamed token (encode +
prefill + first token, over HTTP), the whole request for --max-tokens tokens, and the decode rate. Results go to a JSON file with the machine and versions.

    python benchmarks/fim_latency.py                          # the embedded nano model on CPU
    python benchmarks/fim_latency.py --model path/to/devstral --device cuda --out results/fim_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import start_server  # noqa: E402

SHAPES = [(1536, 512), (2048, 2048)]  # (prefix tokens, suffix tokens): a 2k window, and 2k on each side


def code_text(tokenizer, n_tokens: int, seed: int) -> str:
    """Python-looking text of about n_tokens tokens (cut on a token boundary, then decoded)."""
    lines, i = [], seed
    while True:
        lines.append(f"def handler_{i}(request, retries={i % 7}):\n"
                     f"    \"\"\"Serve request {i} with up to {i % 7} retries.\"\"\"\n"
                     f"    value = compute(request.payload, scale={i * 0.5})\n"
                     f"    if value > {i}:\n        return respond(value - {i})\n    return None\n\n")
        i += 1
        ids = tokenizer.encode("".join(lines))
        if len(ids) >= n_tokens:
            return tokenizer.decode(ids[:n_tokens])


def one_request(url: str, prefix: str, suffix: str, max_tokens: int) -> tuple[float, float, int]:
    import httpx

    body = {"prompt": prefix, "suffix": suffix, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    ttft, n = None, 0
    with httpx.stream("POST", url + "/v1/fim/completions", json=body, timeout=None) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, time.perf_counter() - t0, n


def machine() -> dict:
    import torch

    def commit() -> str:
        try:
            return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            return ""

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "os": platform.platform(), "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "devstral_commit": commit()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="nano")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fim_latency_cpu.json")
    args = ap.parse_args()

    import devstral
    from devstral.prompt.fim import encode_fim

    llm = devstral.load(args.model, device=args.device, max_context=8192)
    server, thread, url = start_server(llm, parallel=1)
    results = []
    try:
        one_request(url, "def f():\n", "\n", 4)  # warm-up
        for n_prefix, n_suffix in SHAPES:
            for cache in ("cold", "warm"):
                # cold: a different file each run (nothing to reuse); warm: the same prompt again, as an
                # editor re-asking at the same cursor, served from the engine's prefix cache
                encode_ms, ttft_ms, total_ms, tok_s = [], [], [], []
                for run in range(args.runs + (cache == "warm")):
                    seed = 100_000 * (run + 1) if cache == "cold" else 0
                    prefix = code_text(llm.tokenizer, n_prefix, seed)
                    suffix = code_text(llm.tokenizer, n_suffix, seed + 50_000)
                    t0 = time.perf_counter()
                    n_prompt = len(encode_fim(llm.tokenizer, prefix, suffix))
                    encode = (time.perf_counter() - t0) * 1e3
                    ttft, total, n = one_request(url, prefix, suffix, args.max_tokens)
                    if cache == "warm" and run == 0:
                        continue  # the run that fills the cache
                    encode_ms.append(encode)
                    ttft_ms.append(ttft * 1e3)
                    total_ms.append(total * 1e3)
                    tok_s.append((n - 1) / (total - ttft) if n > 1 and total > ttft else 0.0)
                row = {"prefix_tokens": n_prefix, "suffix_tokens": n_suffix, "prompt_tokens": n_prompt,
                       "prefix_cache": cache, "max_tokens": args.max_tokens, "runs": args.runs,
                       "encode_ms_median": round(statistics.median(encode_ms), 2),
                       "ttft_ms_median": round(statistics.median(ttft_ms), 1),
                       "total_ms_median": round(statistics.median(total_ms), 1),
                       "decode_tok_s_median": round(statistics.median(tok_s), 1)}
                print(json.dumps(row))
                results.append(row)
    finally:
        server.should_exit = True
        thread.join(10)
    cfg = llm.config
    report = {"benchmark": "fill-in-the-middle latency at batch 1 over HTTP (/v1/fim/completions, streamed, greedy)",
              "model": {"name": args.model, "arch": cfg.arch, "parameters": cfg.n_params, "dim": cfg.dim,
                        "layers": cfg.n_layers, "vocab": cfg.vocab_size, "dtype": str(llm.dtype),
                        "device": str(llm.device)},
              "note": "nano is a 5.1M-parameter model: on CPU these figures are the server path (HTTP, "
                      "mistral-common encoding, chunked prefill, streaming) plus a tiny model's compute, "
                      "not what a 24B Devstral takes; the 2 cores were shared with other work",
              "machine": machine(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
