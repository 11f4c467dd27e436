"""llama.cpp (the peer) on the GPU machine, for side-by-side figures in the same session as ours.

    python benchmarks/peer_llamacpp.py --peers .peers --out $OUT/llamacpp_h200.json

Builds llama.cpp's CUDA binaries from the vendored source beside `build-llamacpp-cuda.sh` (about 5
minutes on 16 cores; skipped when already built), writes random-weight Devstral-Small-shape GGUFs with
`mk_devstral_shape_gguf.py` (skipped when present), and runs `llama-bench` with flash attention and
every layer on the GPU: prefill at 512 and 8192 tokens, decode of 128 tokens, and decode with 32k tokens
already in the cache (`-d`). The GGUF paths are printed so our engine can be measured on the same files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def build(peers: Path, prefix: Path) -> float:
    if (prefix / "bin" / "llama-bench").exists():
        return 0.0
    t = time.time()
    subprocess.run(["bash", str(peers / "build-llamacpp-cuda.sh"), str(prefix)], check=True)
    return time.time() - t


def make_gguf(peers: Path, out: Path, qtype: str) -> float:
    if out.exists():
        return 0.0
    t = time.time()
    subprocess.run([sys.executable, str(peers / "mk_devstral_shape_gguf.py"), str(out), "--type", qtype], check=True)
    return time.time() - t


def bench(binary: Path, gguf: Path, *args: str) -> list[dict]:
    cmd = [str(binary), "-m", str(gguf), "-ngl", "99", "-fa", "1", "-r", "3", "-o", "json", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=Path, default=Path(".peers"))
    ap.add_argument("--prefix", type=Path, default=Path("/tmp/llamacpp"))
    ap.add_argument("--gguf-dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q8_0"])
    ap.add_argument("--depth", type=int, default=32768)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    result: dict = {"benchmark": "llama.cpp llama-bench", "build_s": build(a.peers, a.prefix), "files": {}}
    if a.build_only:
        print(json.dumps(result))
        return
    bench_bin = a.prefix / "bin" / "llama-bench"
    for qtype in a.types:
        gguf = a.gguf_dir / f"devstral-small-{qtype}.gguf"
        made = make_gguf(a.peers, gguf, qtype)
        runs = bench(bench_bin, gguf, "-p", "512,8192", "-n", "128")
        runs += bench(bench_bin, gguf, "-p", "0", "-n", "128", "-d", str(a.depth))
        rows = [{"n_prompt": r.get("n_prompt"), "n_gen": r.get("n_gen"), "n_depth": r.get("n_depth", 0),
                 "avg_ts": r.get("avg_ts"), "stddev_ts": r.get("stddev_ts")} for r in runs]
        result["files"][qtype] = {"path": str(gguf), "bytes": gguf.stat().st_size, "made_s": made, "rows": rows,
                                  "build": runs[0].get("build_commit"), "gpu": runs[0].get("gpu_info")}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
