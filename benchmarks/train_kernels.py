"""Training kernels, one at a time, at the Devstral-Small shape: time (forward + backward) and peak memory.

Cases (bf16, a GPU; every case is a full forward + backward):
* head: lm_head + cross-entropy over 131k vocab for 8192 tokens: plain F.linear + F.cross_entropy (all
  logits), our checkpointed chunks (the previous trainer), our fused chunks (kernels/fused_linear_ce.py),
  and Liger-Kernel's LigerFusedLinearCrossEntropyLoss when it is installed. Keep Liger only if faster.
* lora: one LoRA r=16 projection 5120 -> 32768 over 8192 tokens: the unfused expression vs the fused
  autograd node (kernels/lora_linear.py), for an nn.Linear and an NF4 base.

    python benchmarks/train_kernels.py --out $OUT/train_kernels.json     # GPU, < 4 min
    python benchmarks/train_kernels.py --quick --out /tmp/k.json          # CPU smoke test, tiny shapes
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: torch.device, reps: int) -> dict:
    """Median ms of fn() (forward + backward) and peak memory above the memory before it."""
    gc.collect()
    fn()  # warm-up (and Triton autotuning)
    _sync(device)
    base = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    out = {"ms": sorted(times)[len(times) // 2]}
    if device.type == "cuda":
        out["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return out


def head_cases(n: int, d: int, v: int, device: torch.device, dtype: torch.dtype) -> dict:
    from torch.utils.checkpoint import checkpoint

    from devstral.kernels.fused_linear_ce import linear_cross_entropy

    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(n, d, device=device, generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=device, generator=g) * 0.02).to(dtype)
    t = torch.randint(0, v, (n,), device=device, generator=g)

    def plain():
        h.grad = None
        F.cross_entropy(F.linear(h, w).float(), t, reduction="sum").backward()

    def chunks():
        h.grad = None
        total = 0
        for s in range(0, n, 1024):
            total = total + checkpoint(lambda a, b: F.cross_entropy(F.linear(a, w).float(), b, reduction="sum"),
                                       h[s:s + 1024], t[s:s + 1024], use_reentrant=False)
        total.backward()

    def fused():
        h.grad = None
        linear_cross_entropy(h, w, t).backward()

    cases = {"plain": plain, "checkpointed_chunks": chunks, "fused_ours": fused}
    try:  # Triton: a GPU only
        if device.type != "cuda":
            raise ImportError
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger():
            h.grad = None
            liger_loss(w, h, t).backward()

        cases["fused_liger"] = liger
    except ImportError:
        pass
    ref = None
    out = {}
    for name, fn in cases.items():
        out[name] = measure(fn, device, reps=5)
        grad = h.grad.float()
        ref = grad if ref is None else ref
        out[name]["grad_max_abs_diff_vs_plain"] = float((grad - ref).abs().max())
    return out


def lora_cases(n: int, d_in: int, d_out: int, r: int, device: torch.device, dtype: torch.dtype) -> dict:
    from torch import nn

    from devstral.model.lora import LoRALinear
    from devstral.model.nf4 import NF4Linear

    g = torch.Generator(device=device).manual_seed(1)
    w = torch.randn(d_out, d_in, device=device, generator=g) * 0.02
    out = {}
    for base_kind in ("bf16", "nf4"):
        if base_kind == "nf4":
            base: nn.Module = NF4Linear(w, double_quant=True)
        else:
            base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
            base.weight.data.copy_(w)
        layer = LoRALinear(base, r, 2 * r, dtype=torch.float32)
        nn.init.normal_(layer.lora_B.weight, std=0.01)
        x = torch.randn(n, d_in, device=device, dtype=dtype, generator=g).requires_grad_()

        def run(fwd, x=x, layer=layer):
            def step():
                x.grad = None
                layer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    y = fwd(x)
                y.float().square().mean().backward()
            return step

        for name, fwd in (("unfused", layer.unfused), ("fused", layer.forward)):
            out[f"{base_kind}_{name}"] = measure(run(fwd), device, reps=5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        head, lora = dict(n=256, d=64, v=1024), dict(n=256, d_in=64, d_out=128, r=4)
    else:
        head, lora = dict(n=8192, d=5120, v=131072), dict(n=8192, d_in=5120, d_out=32768, r=16)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "head_shape": head, "lora_shape": lora,
              "head": head_cases(**head, device=device, dtype=dtype),
              "lora": lora_cases(**lora, device=device, dtype=dtype)}
    try:
        import liger_kernel

        result["liger_kernel"] = getattr(liger_kernel, "__version__", "installed")
    except ImportError:
        result["liger_kernel"] = None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
