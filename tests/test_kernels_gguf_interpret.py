"""The Triton kernels' logic on CPU, through Triton's interpreter, against dequantize() + matmul.

Triton picks interpreter or compiler when a kernel is decorated, i.e. at import, and the interpreter
must not leak into other tests: so one subprocess (this file run as a script, TRITON_INTERPRET=1)
runs every case once and saves inputs and outputs; the tests here compare them with the references
(quant.dequantize, bit-exact against gguf-py; model/nf4.dequantize_nf4, checked against
bitsandbytes). Small odd shapes: partial row tiles, split-K with uneven splits, masked batch rows.
The interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest), so outputs here are fp32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import interpreter_runs

pytest.importorskip("triton")

from devstral.model.nf4 import dequantize_nf4  # noqa: E402
from devstral.quant import QType, dequantize  # noqa: E402

N = 19
K = {QType.Q4_K: 768, QType.Q5_K: 256, QType.Q6_K: 256, QType.Q8_0: 160}
TYPES = list(K)
IDOT = (QType.Q4_K, QType.Q6_K, QType.Q8_0)  # the integer-dot GEMV's types


F16_FIELDS = {QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,), QType.Q8_0: (0,)}


def random_blocks(qt: QType, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Random bytes are valid blocks of these types (every bit pattern of every field occurs); only the
    fp16 scales are set, to finite values of a realistic size."""
    from devstral.quant.layout import block_info

    bs, ts = block_info(qt)
    raw = torch.randint(0, 256, (n * k // bs, ts), dtype=torch.uint8, generator=g)
    for off in F16_FIELDS[qt]:
        d = (torch.rand(raw.shape[0], generator=g) * 0.01 + 1e-3).to(torch.float16)
        raw[:, off:off + 2] = d.view(torch.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def int8_exact(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    """bf16 activations that int8 quantization per 16 or 32 values represents exactly: integers in
    [-127, 127] times a power of two per 32 values, each run of 16 holding a +-127. The integer-dot
    GEMV (gguf_idot.py) must then give x @ W^T to fp32 accuracy."""
    q = torch.randint(-127, 128, (m, k // 16, 16), generator=g)
    q[:, :, 0] = 127 * (torch.randint(0, 2, (m, k // 16), generator=g) * 2 - 1)
    scale = 2.0 ** torch.randint(-12, -4, (m, k // 32, 1, 1), generator=g)  # one per 32: both sub-block sizes
    return (q.reshape(m, k // 32, 2, 16) * scale).reshape(m, k).to(torch.bfloat16)


def _run_cases(out_path: str) -> None:
    """Executed in the subprocess, under the interpreter."""
    from devstral.kernels import fp8_kernels, gguf_dequant, gguf_gemm, gguf_gemv, gguf_linear, nf4_kernels
    from devstral.kernels.gguf_pack import pack
    from devstral.model.nf4 import quantize_nf4

    g = torch.Generator().manual_seed(0)
    res = {}
    for qt, k in K.items():
        raw = random_blocks(qt, N, k, g)
        p = pack(raw, qt, N, k)
        xs = {m: torch.randn(m, k, generator=g).to(torch.bfloat16) for m in (1, 3, 6)}
        xs[1] = int8_exact(1, k, g)
        bias = torch.randn(N, generator=g)
        r = {"raw": raw, "x": xs, "bias": bias}
        f32 = torch.float32
        if qt in IDOT:
            from devstral.kernels import gguf_idot

            xe = {m: int8_exact(m, k, g) for m in (3, 6)}
            r["x_exact"] = xe
            r["idot1"] = gguf_idot.gemv(xs[1], p, bias, torch.empty(1, N, dtype=f32), bn=16, ns=2, bm=1, split_k=3)
            r["idot3"] = gguf_idot.gemv(xe[3], p, None, torch.empty(3, N, dtype=f32), bn=16, ns=1, bm=4, split_k=1)
            r["idot6"] = gguf_idot.gemv(xe[6], p, bias, torch.empty(6, N, dtype=f32), bn=32, ns=2, bm=8, split_k=2)
            r["idot_rand"] = gguf_idot.gemv(xs[3], p, None, torch.empty(3, N, dtype=f32), bn=16, ns=2, bm=4,
                                            split_k=1)
        r["dequant"] = gguf_dequant.dequantize(p, dtype=torch.float32, bn=16, nsub=3)
        r["rows"] = gguf_dequant.dequantize(p, rows=torch.tensor([3, 0, 18, 3]), dtype=torch.float32)
        # split-K 3 over 3 (Q4_K), 2 (Q5_K, Q6_K) or 1 (Q8_0) tiles: uneven and empty splits
        r["gemv1"] = gguf_gemv.gemv(xs[1], p, bias, torch.empty(1, N, dtype=f32), bn=16, ns=8, bm=1, split_k=3)
        r["gemv3"] = gguf_gemv.gemv(xs[3], p, None, torch.empty(3, N, dtype=f32), bn=16, ns=8, bm=4, split_k=1)
        r["gemm6"] = gguf_gemm.gemm(xs[6], p, bias, torch.empty(6, N, dtype=f32), bn=16, bm=16, nsub=4, split_k=2)
        r["linear1"] = gguf_linear.linear(xs[1].float(), p)  # the dispatcher, end to end
        res[qt.name] = r
    for dq in (False, True):
        t = quantize_nf4(torch.randn(N, 192, generator=g), double_quant=dq)
        odd = quantize_nf4(torch.randn(5, 70, generator=g), double_quant=dq)  # blocks straddle rows
        x = torch.randn(3, 192, generator=g).to(torch.bfloat16)
        res[f"nf4_{dq}"] = {
            "t": t, "odd": odd, "x": x,
            "dequant": nf4_kernels.dequantize(t, torch.float32, block=512),
            "dequant_odd": nf4_kernels.dequantize(odd, torch.float32, block=128),
            "gemv1": nf4_kernels.gemv(x[:1], t, None, torch.empty(1, N), bn=16, ns=2, bm=1, split_k=2),
            "gemv3": nf4_kernels.gemv(x, t, None, torch.empty(3, N), bn=16, ns=4, bm=4),
        }
    w = torch.randn(N, 200, generator=g)
    q, s = fp8_kernels.quantize_rowwise(w)
    x = torch.randn(3, 200, generator=g).to(torch.bfloat16)
    res["fp8"] = {"q": q, "s": s, "x": x,
                  "gemv1": fp8_kernels.gemv(x[:1], q, s, None, torch.empty(1, N), bn=16, bk=64, bm=1, split_k=3),
                  "gemv3": fp8_kernels.gemv(x, q, s, None, torch.empty(3, N), bn=16, bk=64, bm=4)}
    torch.save(res, out_path)


@pytest.fixture(scope="module")
def results():
    return interpreter_runs.results(__file__, timeout=600)


def _close(got, expected):
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-5, atol=2e-5 * expected.abs().max().item())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gguf_kernels_match_dequantize(results, qtype):
    r = results[qtype.name]
    w = dequantize(r["raw"], qtype, (N, K[qtype]))
    assert torch.equal(r["dequant"], w)  # bit for bit
    assert torch.equal(r["rows"], w[[3, 0, 18, 3]])
    x = {m: v.float() for m, v in r["x"].items()}
    _close(r["gemv1"], x[1] @ w.t() + r["bias"])
    _close(r["gemv3"], x[3] @ w.t())
    _close(r["gemm6"], x[6] @ w.t() + r["bias"])
    _close(r["linear1"], x[1] @ w.t())


@pytest.mark.parametrize("qtype", IDOT, ids=lambda t: t.name)
def test_integer_dot_gemv_is_exact_where_int8_activations_are(results, qtype):
    """Activations that int8 per sub-block represents exactly: the integer-dot GEMV equals x @ W^T
    (uneven split-K, partial row tiles, 1, 3 and 6 rows in tiles of 1, 4 and 8, a bias)."""
    r = results[qtype.name]
    w = dequantize(r["raw"], qtype, (N, K[qtype]))
    _close(r["idot1"], r["x"][1].float() @ w.t() + r["bias"])
    _close(r["idot3"], r["x_exact"][3].float() @ w.t())
    _close(r["idot6"], r["x_exact"][6].float() @ w.t() + r["bias"])


@pytest.mark.parametrize("qtype", IDOT, ids=lambda t: t.name)
def test_integer_dot_gemv_on_any_activations_is_int8_close(results, qtype):
    """Random activations: the int8 rounding (half a step of amax/127 per value) is the only error."""
    r = results[qtype.name]
    w = dequantize(r["raw"], qtype, (N, K[qtype]))
    ref = r["x"][3].float() @ w.t()
    rel = float((r["idot_rand"] - ref).norm() / ref.norm())
    assert 1e-5 < rel < 1.5e-2, rel  # not exact (it rounds), and not worse than int8 rounding allows


@pytest.mark.parametrize("dq", [False, True])
def test_nf4_kernels_match_the_reference(results, dq):
    r = results[f"nf4_{dq}"]
    w = dequantize_nf4(r["t"])
    assert torch.equal(r["dequant"], w)
    assert torch.equal(r["dequant_odd"], dequantize_nf4(r["odd"]))
    x = r["x"].float()
    _close(r["gemv1"], x[:1] @ w.t())
    _close(r["gemv3"], x @ w.t())


def test_fp8_gemv_matches_the_dequantized_weight(results):
    r = results["fp8"]
    w = r["q"].float() * r["s"][:, None]
    x = r["x"].float()
    _close(r["gemv1"], x[:1] @ w.t())
    _close(r["gemv3"], x @ w.t())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    _run_cases(sys.argv[1])
