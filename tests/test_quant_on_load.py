"""--quantize-on-load: q8_0 is llama.cpp's reference quantizer byte for byte, the fast q4_k stays close
to llama.cpp's searched Q4_K, fp8 keeps e4m3 precision per channel, and a loaded model swaps exactly its
linear weights while staying close to the 16-bit model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants

import devstral
from devstral.errors import DevstralError
from devstral.kernels import fp8_kernels
from devstral.kernels.fp8_linear import FP8Linear
from devstral.quant import QType, dequantize, quantize
from devstral.quant.linear import QuantLinear
from devstral.quant.on_load import quantize_q4_k_fast, quantize_rows
from devstral.testing import make_tiny_checkpoint


def test_q8_0_is_gguf_py_byte_for_byte():
    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    ours = quantize_rows(w.to(torch.bfloat16), QType.Q8_0)
    theirs = gguf_quants.quantize(w.to(torch.bfloat16).float().numpy(), QType.Q8_0)
    assert np.array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_fast_q4_k_stays_close_to_llama_cpp_search(dist):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 1024, generator=g) if dist == "normal" else \
        torch.distributions.StudentT(3.0).sample((64, 1024))
    searched = dequantize(quantize(w, QType.Q4_K), QType.Q4_K, w.shape)
    fast = dequantize(quantize_q4_k_fast(w), QType.Q4_K, w.shape)
    rmse = lambda a: (a - w).pow(2).mean().sqrt().item()  # noqa: E731
    # plain min/max levels (no refit) as the floor the refit must beat
    x = w.reshape(-1, 32)
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True)
    minmax = (torch.round((x - lo) / ((hi - lo) / 15)) * ((hi - lo) / 15) + lo).reshape(w.shape)
    assert rmse(fast) <= 1.10 * rmse(searched)
    assert rmse(fast) < rmse(minmax)


def test_fp8_rowwise_scales_and_rounding():
    w = torch.randn(20, 64, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 1, 20)[:, None]
    w[3] = 0
    q, scale = fp8_kernels.quantize_rowwise(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (20,)
    back = q.float() * scale[:, None]
    # each row uses e4m3's full range: its largest weight maps to 448 exactly; elsewhere 3 mantissa bits
    assert torch.equal(q[4].float().abs().max(), torch.tensor(448.0))
    assert ((back - w).abs() <= w.abs() * 2.0 ** -4 + scale[:, None] * 2.0 ** -9).all()
    assert (back[3] == 0).all()
    layer = FP8Linear(w)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ back.t())


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("onload"), dim=256, hidden_dim=512, n_layers=1, n_heads=4,
                                n_kv_heads=2, head_dim=64)


@pytest.mark.parametrize("kind,module,bound", [("q8_0", QuantLinear, 0.03), ("q4_k", QuantLinear, 0.25),
                                               ("fp8", FP8Linear, 0.1)])
def test_loading_quantizes_every_linear(ck, kind, module, bound):
    ref = devstral.load(ck, device="cpu", dtype="fp32")
    llm = devstral.load(ck, device="cpu", dtype="fp32", quantize_on_load=kind)
    linears = {name: type(m) for name, m in llm.model.named_modules()
               if name.endswith(("_proj", "lm_head"))}
    assert linears and all(t is module for t in linears.values()), linears
    if kind == "q4_k":  # the output head keeps 8 bits
        assert llm.model.lm_head.qtype == QType.Q8_0 and llm.model.model.layers[0].mlp.up_proj.qtype == QType.Q4_K
    ids = list(range(1, 40))
    a, b = ref.logits(ids), llm.logits(ids)
    assert ((a - b).norm() / a.norm()).item() < bound


def test_bad_values_are_user_errors(ck, tmp_path):
    with pytest.raises(DevstralError, match="unknown value 'q3'"):
        devstral.load(ck, device="cpu", quantize_on_load="q3")
    from devstral.formats.gguf import export_gguf

    gguf = export_gguf(ck, tmp_path / "m.gguf", "Q8_0")
    with pytest.raises(DevstralError, match="already quantized"):
        devstral.load(gguf, device="cpu", quantize_on_load="q8_0")


def test_cli_flag(ck, capsys):
    from devstral.cli import main

    assert main(["run", "--model", str(ck), "--device", "cpu", "--quantize-on-load", "int3", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize-on-load" in err[0]
