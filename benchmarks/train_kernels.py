"""Training kernels, one at a time, at the Devstral-Small shape: time (forward + backward) and peak memory.

Cases (bf16, a GPU; every case is a full forward + backward):
* head: lm_head + cross-entropy over 131k vocab for 8192 tokens: plain F.linear + F.cross_entropy (all
  logits), our checkpointed chunks (the previous trainer), our fused chunks (kernels/fused_linear_ce.py),
  and Liger-Kernel's LigerFusedLinearCrossEntropyLoss when it is installed. Keep Liger only if faster.
* lora: one LoRA r=16 projection 5120 -> 32768 over 8192 tokens: the unfused expression vs the fused
  autograd node (kernels/lora_linear.py), for an nn.Linear and an NF4 base.
* elementwise: RMSNorm, add + RMSNorm, RoPE and silu * up over 8192 tokens at Devstral-Small's widths,
  forward + backward: plain PyTorch autograd of the reference, our training kernels (*_autograd.py) and
  Liger-Kernel's, each against the bytes it must move at the measured copy bandwidth (the roofline).

    python benchmarks/train_kernels.py                  # GPU, ~40 s: $OUT/train_kernels.json or benchmarks/results/
    python benchmarks/train_kernels.py --quick --out /tmp/k.json          # CPU smoke test, tiny shapes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
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

    from devstral.kernels.fused_linear_ce import chunk_rows, linear_cross_entropy

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
        linear_cross_entropy(h, w, t, chunk=chunk_rows(v)).backward()  # a chunk size given: ours, never Liger

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


def measure_loop(fn, device: torch.device, iters: int, reps: int = 5) -> float:
    """Median over `reps` of the mean ms of `iters` back-to-back calls (short kernels: one sync per rep)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float | None:
    """Measured device copy rate in bytes/s (read + write of a 1 GiB buffer)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure_loop(lambda: dst.copy_(src), device, iters=10)
    return 2 * src.numel() / (ms / 1e3)


def elementwise_cases(n: int, dim: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                      device: torch.device, dtype: torch.dtype, iters: int) -> dict:
    from devstral.kernels import rms_norm_autograd, rope_autograd, silu_mul_autograd
    from devstral.kernels.rms_norm import add_rms_norm_ref, rms_norm_ref
    from devstral.kernels.rope import apply_rope_ref
    from devstral.kernels.silu_mul import silu_mul_ref

    g = torch.Generator(device=device).manual_seed(2)
    item = torch.empty((), dtype=dtype).element_size()

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    x, delta, up_d = rnd(n, dim).requires_grad_(), rnd(n, dim).requires_grad_(), rnd(n, dim)
    w = (1 + 0.1 * rnd(dim)).detach()
    gate, upv, up_h = rnd(n, hidden).requires_grad_(), rnd(n, hidden).requires_grad_(), rnd(n, hidden)
    q, k = rnd(1, n, heads, head_dim).requires_grad_(), rnd(1, n, kv_heads, head_dim).requires_grad_()
    gq, gk = rnd(1, n, heads, head_dim), rnd(1, n, kv_heads, head_dim)
    pos = torch.arange(n, device=device)[None].float()
    inv = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def bwd(outs, grads):
        torch.autograd.backward(outs, grads)
        for t in (x, delta, gate, upv, q, k):
            t.grad = None

    ops = {
        # name: (bytes moved forward + backward, {impl: callable})
        "rms_norm": (10 * n * dim * item, {
            "torch": lambda: bwd([rms_norm_ref(x, w, 1e-5)], [up_d]),
            "ours": lambda: bwd([rms_norm_autograd.rms_norm_autograd(x, w, 1e-5)], [up_d])}),
        "add_rms_norm": (16 * n * dim * item, {
            "torch": lambda: bwd(list(add_rms_norm_ref(x, delta, w, 1e-5)), [up_d, up_d]),
            "ours": lambda: bwd(list(rms_norm_autograd.add_rms_norm_autograd(x, delta, w, 1e-5)), [up_d, up_d])}),
        "rope": (4 * n * (heads + kv_heads) * head_dim * item, {
            "torch": lambda: bwd(list(apply_rope_ref(q, k, cos, sin)), [gq, gk]),
            "ours": lambda: bwd(list(rope_autograd.apply_rope_autograd(q, k, cos, sin)), [gq, gk])}),
        "silu_mul": (8 * n * hidden * item, {
            "torch": lambda: bwd([silu_mul_ref(gate, upv)], [up_h]),
            "ours": lambda: bwd([silu_mul_autograd.silu_mul_autograd(gate, upv)], [up_h])}),
    }
    if device.type == "cuda":
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            from liger_kernel.ops.rope import LigerRopeFunction
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            ops["rms_norm"][1]["liger"] = lambda: bwd([LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama", False)],
                                                      [up_d])
            # Liger's RoPE takes HF's [B, H, T, D]: our token-major tensors as transposed views
            ops["rope"][1]["liger"] = lambda: bwd(list(LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2),
                                                                               cos, sin)),
                                                  [gq.transpose(1, 2), gk.transpose(1, 2)])
            ops["silu_mul"][1]["liger"] = lambda: bwd([LigerSiLUMulFunction.apply(gate, upv)], [up_h])
        except ImportError:
            pass
    bandwidth = copy_bandwidth(device)
    out = {}
    for name, (nbytes, impls) in ops.items():
        row = {"bytes": nbytes}
        if bandwidth:
            row["roofline_ms"] = nbytes / bandwidth * 1e3
        for impl, fn in impls.items():
            ms = measure_loop(fn, device, iters)
            row[f"{impl}_ms"] = ms
            if bandwidth:
                row[f"{impl}_fraction_of_bandwidth"] = row["roofline_ms"] / ms
        out[name] = row
    out["copy_bandwidth_gbps"] = bandwidth / 1e9 if bandwidth else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/train_kernels.json or benchmarks/results/)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's devstral
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    if args.quick:
        head, lora = dict(n=256, d=64, v=1024), dict(n=256, d_in=64, d_out=128, r=4)
        elem = dict(n=64, dim=96, hidden=160, heads=4, kv_heads=2, head_dim=32, iters=2)
    else:
        head, lora = dict(n=8192, d=5120, v=131072), dict(n=8192, d_in=5120, d_out=32768, r=16)
        elem = dict(n=8192, dim=5120, hidden=32768, heads=32, kv_heads=8, head_dim=128, iters=20)
    out_path = Path(args.out) if args.out else (
        Path(os.environ["OUT"]) / "train_kernels.json" if os.environ.get("OUT")
        else Path(__file__).parent / "results" / f"train_kernels_{device.type}.json")
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "cuda": torch.version.cuda,
                          "sms": torch.cuda.get_device_properties(0).multi_processor_count
                          if device.type == "cuda" else None},
              "timing": "median of 5 repetitions (elementwise: each the mean of `iters` back-to-back calls)",
              "torch": torch.__version__, "dtype": str(dtype), "head_shape": head, "lora_shape": lora,
              "elementwise_shape": elem,
              "elementwise": elementwise_cases(**elem, device=device, dtype=dtype),
              "head": head_cases(**head, device=device, dtype=dtype),
              "lora": lora_cases(**lora, device=device, dtype=dtype)}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    try:
        import liger_kernel

        result["liger_kernel"] = getattr(liger_kernel, "__version__", "installed")
        from devstral.kernels.train_backends import winners

        result["table"] = winners(result)  # what kernels/train_backends.py MEASURED should say for this GPU
    except ImportError:
        result["liger_kernel"] = None
    result["wall_s"] = time.perf_counter() - t0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_path)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
