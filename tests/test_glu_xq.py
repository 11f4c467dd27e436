"""A gate/up GEMV writing its down projection's activations itself (DEVSTRAL_GLU_XQ=1, off by default until
measured on a GPU; gguf_gemv_wide._glu_xq, gguf_linear.linear(glu_xq=)).

Oracles: the plain launch of the same weight (the gate/up output, bit for bit: the programs take other rows,
each row's sum is the same), gguf_xq's GLU quantization of that output (the words, bit for bit: the kernel's
and its torch twin's), and a tiny GGUF decoder (test_norm_xq's) giving the same logits with one quantize launch
fewer a layer at one token and none fewer at three. Under Triton's interpreter, in one subprocess.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import interpreter_runs

pytest.importorskip("triton")

from devstral.kernels import gguf_xq  # noqa: E402
from devstral.kernels.gguf_gemv_wide import glu_xq_usable  # noqa: E402

# (weight type, kind, rows of a program): the plans a gate/up has at one row, and tiles of one and two blocks
GEMVS = [("Q4_K", "wide_xq", 64), ("Q4_K", "wide_xq", 128), ("Q4_K", "wide_i8", 128), ("Q8_0", "wide_xq", 128)]


def _kernel_cases() -> dict:
    from contextlib import nullcontext

    from devstral.kernels import gguf_gemv_wide
    from devstral.kernels.gguf_pack import pack
    from devstral.kernels.interpret_triton import hardware_rounding
    from devstral.quant import QType
    from test_kernels_gguf_wide import random_blocks

    g = torch.Generator().manual_seed(5)
    out = {}
    for qtype, kind, bn in GEMVS:
        half, k = 256, 512
        p = pack(random_blocks(QType[qtype], 2 * half, k, g), QType[qtype], 2 * half, k)
        x = torch.randn(1, k, generator=g).to(torch.bfloat16)
        cfg = dict(bn=bn, ns=8, bm=1, split_k=1, int8=True, xq=kind == "wide_xq")
        for layout in (gguf_xq.STRIDE8, gguf_xq.STRIDE4):
            for rounding in (nullcontext, hardware_rounding):  # bf16 roundings by truncation, and as on the GPU
                with rounding():
                    plain = torch.empty(1, 2 * half, dtype=torch.bfloat16)
                    gguf_gemv_wide.gemv(x, p, None, plain, **cfg)
                    fused = torch.full_like(plain, float("nan"))
                    xq = torch.full((1, half // 32, gguf_xq.WORDS), -1, dtype=torch.int32)
                    gguf_gemv_wide.gemv(x, p, None, fused, **cfg, glu_xq=(xq, layout))
                    kernel = gguf_xq.quantize(plain, layout, glu=True)
                out[(qtype, kind, bn, layout, rounding.__name__)] = dict(plain=plain, fused=fused, xq=xq, kernel=kernel)
    return out


def _decoder_cases() -> dict:
    from test_norm_xq import decoder_runs

    return decoder_runs("DEVSTRAL_GLU_XQ", (False,), lambda model: {"layouts": [b.mlp.glu_xq for b in model.model.layers]})


def _run_cases(out_path: str) -> None:
    """Executed in the subprocess, under the interpreter."""
    torch.save({"kernel": _kernel_cases(), "decoder": _decoder_cases()}, out_path)


@pytest.fixture(scope="module")
def results():
    return interpreter_runs.results(__file__, timeout=900)


@pytest.mark.parametrize("rounding", ["nullcontext", "hardware_rounding"])
@pytest.mark.parametrize("layout", [gguf_xq.STRIDE8, gguf_xq.STRIDE4], ids=["stride8", "stride4"])
@pytest.mark.parametrize("qtype,kind,bn", GEMVS)
def test_the_gate_up_writes_downs_activations_bit_for_bit(results, qtype, kind, bn, layout, rounding):
    """The gate/up output as the plain launch stores it, and every word as gguf_xq's GLU quantization of it
    (which test_kernels_gguf_wide checks against the torch twin) -- whichever way the interpreter rounds."""
    case = results["kernel"][(qtype, kind, bn, layout, rounding)]
    assert torch.equal(case["fused"], case["plain"])
    assert torch.equal(case["xq"], case["kernel"])
    assert (case["xq"][..., 8] != 0).all()  # every block written (a scale of zero only for all-zero values)


def test_a_decoder_gives_the_same_logits_with_one_launch_fewer_a_layer(results):
    """Layer i's down quantizes in its weight's layout (Q6_K: stride 4); at one token each of the two layers'
    gate/up writes it (two launches fewer), at three tokens nothing changes."""
    dec = {(on, t): case for (_, on, t), case in results["decoder"].items()}
    assert dec[("1", 1)]["layouts"] == [gguf_xq.STRIDE4] * 2 and dec[("0", 1)]["layouts"] == [None, None]
    for t, fewer in ((1, 2), (3, 0)):
        assert torch.equal(dec[("1", t)]["logits"], dec[("0", t)]["logits"]), t
        assert dec[("0", t)]["launches"] - dec[("1", t)]["launches"] == fewer, t


@pytest.mark.parametrize("m,n,bn,bm,split_k,stream,bias,ok", [
    (1, 512, 128, 1, 1, 0, None, True), (1, 512, 64, 1, 1, 0, None, True),
    (2, 512, 128, 2, 1, 0, None, False), (1, 512, 128, 1, 2, 0, None, False), (1, 512, 128, 1, 1, 4, None, False),
    (1, 512, 128, 1, 1, 0, "bias", False), (1, 512, 96, 1, 1, 0, None, False), (1, 448, 128, 1, 1, 0, None, False)])
def test_which_launches_can_write_them(m, n, bn, bm, split_k, stream, bias, ok):
    """One row, one split, no stream-K or bias, row tiles of whole blocks of 32 of each half."""
    assert glu_xq_usable(m, n, bn, bm, split_k, stream, bias) is ok


def test_a_glu_offer_serves_only_the_glu_quantization(monkeypatch):
    """The memo keeps what was offered apart: a SwiGLU's words are not the plain quantization of the same rows."""
    calls = []
    monkeypatch.setattr(gguf_xq, "_quantize_kernel", {})
    monkeypatch.setattr(gguf_xq, "_offered", None)

    class Launch:
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(kw.get("GLU"))

    monkeypatch.setattr(gguf_xq, "_quantize_kernel", Launch())
    y = torch.randn(1, 128).to(torch.bfloat16)
    words = torch.zeros(1, 2, gguf_xq.WORDS, dtype=torch.int32)
    gguf_xq.offer(y, {gguf_xq.STRIDE8: words}, glu=True)
    assert gguf_xq.quantize(y, gguf_xq.STRIDE8, glu=True) is words and calls == []
    assert gguf_xq.quantize(y, gguf_xq.STRIDE8) is not words and calls == [False]
    gguf_xq.offer(y, {gguf_xq.STRIDE8: words})
    assert gguf_xq.quantize(y, gguf_xq.STRIDE8, glu=True) is not words and calls == [False, True]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _run_cases(sys.argv[1])
