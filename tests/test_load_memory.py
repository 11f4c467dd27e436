"""Loading is streamed from the memory-mapped file: peak RSS stays near one copy of the weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from devstral.testing import make_tiny_checkpoint

# The probe samples the process's anonymous memory (RssAnon) every millisecond while it loads: copies of
# the weights are anonymous memory, while the file's mapped pages are page cache, which kernels and
# sandboxes reclaim at their own pace (VmHWM counts both, and read 40% over one copy on some VMs with
# the mapped pages alone).
PROBE = r"""
import json, sys, threading, time, torch
import devstral

def anon_kb():
    line = next(ln for ln in open("/proc/self/status") if ln.startswith("RssAnon:"))
    return int(line.split()[1])

from devstral.prompt.tokenizer import load_tokenizer
from pathlib import Path
load_tokenizer(Path(sys.argv[1]))  # tokenizer libraries are not weights: load them before the baseline
torch.ones(1)
base = anon_kb()
peak, done = [base], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.001)

t = threading.Thread(target=sample)
t.start()
llm = devstral.load(sys.argv[1], dtype=sys.argv[2], device="cpu")
done.set()
t.join()
peak = max(peak[0], anon_kb())
n = sum(p.numel() * p.element_size() for p in llm.model.parameters())
print(json.dumps({"base_kb": base, "peak_kb": peak, "param_bytes": n}))
"""


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    # ~300 MB of bf16 weights
    return make_tiny_checkpoint(tmp_path_factory.mktemp("big"), dtype=torch.bfloat16, dim=1024, n_layers=8,
                                n_heads=8, n_kv_heads=8, head_dim=128, hidden_dim=4096, vocab_size=16384)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_peak_rss_is_about_one_model(big_ckpt, dtype):
    file_bytes = (big_ckpt / "model.safetensors").stat().st_size
    assert file_bytes > 250e6
    out = subprocess.run([sys.executable, "-c", PROBE, str(big_ckpt), dtype], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = (r["peak_kb"] - r["base_kb"]) * 1024
    print(f"{dtype}: weights in memory {r['param_bytes'] / 1e6:.0f} MB, file {file_bytes / 1e6:.0f} MB, "
          f"peak RSS growth {grown / 1e6:.0f} MB")
    # One copy of the loaded weights, plus at most one tensor in flight and the mapped pages of the file
    # that the kernel has not dropped yet; twice the model would mean we held a full second copy.
    assert grown < r["param_bytes"] * 1.2 + 32e6
