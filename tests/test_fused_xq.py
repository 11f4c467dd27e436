"""The int8 GEMV's activations written by the kernel that produces them (RMSNorm before q/k/v, gate/up and
the output head; SwiGLU before ffn_down) where the planned GEMV is wide_xq, instead of a float row
that one more launch quantizes: the dispatch (quant.linear.input_layout, asked by the model) and a
GGUF model's decode forward on CPU, its kernels in Triton's interpreter, against the unfused path
(DEVSTRAL_FUSED_XQ=0). The fused kernels themselves: tests/test_kernels_elementwise.py.

One subprocess runs the model under TRITON_INTERPRET=1 (the streaming GEMV picks the interpreter at
import) with every linear planar as on CUDA and a tuned table that plans wide_xq at some decode sizes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from devstral.kernels import gguf_config  # noqa: E402
from devstral.kernels.xq_format import STRIDE4, STRIDE8  # noqa: E402
from devstral.quant import QType  # noqa: E402

# per type and decode size, the path the table picks: a mix, so that at some sizes only some projections
# take quantized activations (as the H200's table: Q6_K ffn_down and head at 1 row, Q4_K gate/up too)
KINDS = {"Q4_K": {"1": "wide_xq", "2": "wide_i8", "4": "wide_xq", "8": "wide"},
         "Q6_K": {"1": "wide_xq", "2": "wide_xq", "4": "idot", "8": "wide_xq"}}
ROWS = (1, 2, 3, 5)  # decode rows (buckets 1, 2, 4, 8)


def _planar_linears(monkeypatch) -> None:
    import devstral.quant.linear as ql

    monkeypatch.setattr(ql, "cuda_kernels", lambda device: True)  # planar weights on the CPU, as on CUDA
    monkeypatch.setattr(gguf_config, "_tuned", lambda device: {"kinds": KINDS})


def _blocks(qt: QType, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    from test_kernels_gguf_wide import random_blocks

    return random_blocks(qt, n, k, g)


def test_input_layout_is_the_planned_gemvs(monkeypatch):
    """The layout when the planned GEMV is wide_xq (Q4_K: values stride 8, Q6_K: stride 4), None for
    every other path, size, module or state; DEVSTRAL_FUSED_XQ=0 turns it off."""
    from devstral.quant.linear import QuantLinear, fuse_quant, input_layout

    _planar_linears(monkeypatch)
    g = torch.Generator().manual_seed(0)
    q4 = QuantLinear(_blocks(QType.Q4_K, 16, 256, g), QType.Q4_K, 16, 256)
    q6 = QuantLinear(_blocks(QType.Q6_K, 16, 256, g), QType.Q6_K, 16, 256)
    with torch.no_grad():
        assert [input_layout(q4, m) for m in (1, 2, 3, 4, 5, 8, 9, 64)] == [STRIDE8, None, STRIDE8, STRIDE8, None,
                                                                           None, None, None]
        assert [input_layout(q6, m) for m in (1, 2, 4, 8, 9)] == [STRIDE4, STRIDE4, None, STRIDE4, None]
        assert input_layout(q4, 0) is None  # no rows: nothing to quantize
        for other in (None, nn.Linear(256, 16, bias=False), nn.Identity()):
            assert input_layout(other, 1) is None
        monkeypatch.setenv("DEVSTRAL_FUSED_XQ", "0")
        assert input_layout(q4, 1) is None and input_layout(q6, 1) is None
        monkeypatch.delenv("DEVSTRAL_FUSED_XQ")
        monkeypatch.setenv("DEVSTRAL_GGUF_FLOAT_GEMV", "1")  # the float GEMV takes float activations
        assert input_layout(q4, 1) is None
        monkeypatch.delenv("DEVSTRAL_GGUF_FLOAT_GEMV")
        proj = fuse_quant(q4, QuantLinear(_blocks(QType.Q4_K, 8, 256, g), QType.Q4_K, 8, 256))
        assert [input_layout(proj, m) for m in (1, 2, 4, 9)] == [STRIDE8, None, STRIDE8, None]
    assert input_layout(q4, 1) is None  # gradients recorded: the float path (training)
    monkeypatch.undo()  # a CPU layer keeps the file's blocks
    blocks = QuantLinear(_blocks(QType.Q4_K, 16, 256, g), QType.Q4_K, 16, 256)
    with torch.no_grad():
        assert blocks.weight_q.mode == "blocks" and input_layout(blocks, 1) is None


def _tiny_gguf_model(g: torch.Generator):
    """A two-layer decoder whose linears are planar GGUF layers, Q4_K_M-like: Q4_K but ffn_down and the
    output head in Q6_K; q/k/v and gate/up fused as the engine does."""
    from devstral.config import ModelConfig
    from devstral.model.transformer import Transformer
    from devstral.quant.linear import QuantLinear

    cfg = ModelConfig(arch="mistral", vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
                      hidden_dim=512)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():  # embeddings and norm weights
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                qt = QType.Q6_K if name in ("down_proj", "lm_head") else QType.Q4_K
                n, k = child.out_features, child.in_features
                setattr(module, name, QuantLinear(_blocks(qt, n, k, g), qt, n, k))
    model = model.to(torch.bfloat16).eval()
    model.fuse_projections()
    return model


def _run_model(out_path: str) -> None:
    """Executed in the subprocess, under the interpreter."""
    import devstral.kernels.gguf_xq as gguf_xq
    import devstral.quant.linear as ql

    ql.cuda_kernels = lambda device: True
    gguf_config._tuned = lambda device: {"kinds": KINDS}
    launches = []
    quantize = gguf_xq.quantize
    gguf_xq.quantize = lambda x, layout: launches.append(layout) or quantize(x, layout)  # the GEMV's own launch
    g = torch.Generator().manual_seed(0)
    model = _tiny_gguf_model(g)
    res = {}
    with torch.inference_mode():
        for m in ROWS:
            tokens = torch.randint(0, 512, (1, m), generator=g)
            for fused in ("1", "0"):
                os.environ["DEVSTRAL_FUSED_XQ"] = fused
                launches.clear()
                logits = model(tokens).float()
                all_rows, launches[:] = list(launches), []
                selected = model(tokens, select=torch.tensor([m - 1])).float()
                res[(m, fused)] = {"logits": logits, "launches": all_rows, "selected": selected,
                                   "selected_launches": list(launches)}
    torch.save(res, out_path)


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("xq") / "model.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("DEVSTRAL_FUSED_XQ", None)
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("m", ROWS)
def test_fused_quantization_keeps_the_logits(model_runs, m):
    """The same logits, bit for bit, with the norms and SwiGLU writing the GEMVs' int8 input as with a
    float row quantized by the GEMV's own launch; and the launches that remain are those the fusion
    cannot reach (o_proj's input comes from the attention)."""
    fused, plain = model_runs[(m, "1")], model_runs[(m, "0")]
    assert torch.isfinite(plain["logits"]).all()
    torch.testing.assert_close(fused["logits"], plain["logits"], rtol=0, atol=0)
    torch.testing.assert_close(fused["selected"], plain["selected"], rtol=0, atol=0)
    bucket = next(b for b in (1, 2, 4, 8) if b >= m)
    q4, q6 = KINDS["Q4_K"][str(bucket)] == "wide_xq", KINDS["Q6_K"][str(bucket)] == "wide_xq"
    # unfused, per layer: q/k/v, o_proj, gate/up (Q4_K), ffn_down (Q6_K); then the output head (Q6_K)
    assert sorted(plain["launches"]) == sorted(([STRIDE8] * 3 * q4 + [STRIDE4] * q6) * 2 + [STRIDE4] * q6)
    assert fused["launches"] == [STRIDE8] * 2 * q4  # o_proj's, in both layers
    # one selected row: the final norm writes floats (it cannot know the rows), the head (1 row, Q6_K: wide_xq)
    # quantizes them itself
    assert sorted(fused["selected_launches"]) == sorted([STRIDE8] * 2 * q4 + [STRIDE4])


def _compile(fn, sig: dict, const: dict, num_warps: int) -> tuple[str, str]:
    """(TTGIR, PTX) of `fn` for sm_90 as the launcher specializes Devstral's shapes: pointers, strides and
    widths divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t != "fp32"}
    src = ASTSource(fn=fn, signature={**sig, **dict.fromkeys(const, "constexpr")}, constexprs=const, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    return k.asm["ttgir"], k.asm["ptx"]


def _first_reduce_layout(ttgir: str) -> str:
    """The layout (resolved alias) of the first reduction's operand: RMSNorm's sum of squares."""
    operand = re.search(r"\}\) : \(tensor<[^,]+, (#[\w.]+)>\)", ttgir).group(1)
    return re.search(rf"^{re.escape(operand)} = (.*)$", ttgir, re.M).group(1)


def _compiled() -> dict:
    """Executed in a subprocess (compiled mode, no GPU): per kernel, what decides its bits."""
    import triton.language as tl

    from devstral.kernels import gguf_xq, rms_norm_triton, silu_mul_triton

    out = {}
    bf16 = "*bf16"
    sig = {"x_ptr": bf16, "x_row_stride": "i32", "delta_ptr": bf16, "delta_row_stride": "i32", "w_ptr": bf16,
           "out_ptr": bf16, "res_ptr": bf16, "xq_ptr": "*i32", "s_xq": "i32", "n_cols": "i32", "eps": "fp32"}
    for delta in (False, True):
        for xq in (-1, 0, 1):
            ir, ptx = _compile(rms_norm_triton._rms_norm_kernel, sig,
                               dict(HAS_DELTA=delta, BLOCK=8192, XQ=xq, XQ_DTYPE=tl.bfloat16 if xq >= 0 else None),
                               num_warps=16)
            out[f"rms_norm_{delta}_{xq}"] = {"reduce": _first_reduce_layout(ir), "ptx": ptx}
    for layout in (0, 1):
        sig = {"x_ptr": "*bf16", "out_ptr": "*i32", "K": "i32", "s_xm": "i32", "s_om": "i32"}
        out[f"quantize_{layout}"] = {"ptx": _compile(gguf_xq._quantize_kernel, sig, dict(LAYOUT=layout, BLOCKS=16),
                                                     num_warps=4)[1]}
        sig = {"gate_ptr": "*bf16", "up_ptr": "*bf16", "xq_ptr": "*i32", "n_cols": "i32", "gate_row_stride": "i32",
               "up_row_stride": "i32", "s_xq": "i32"}
        out[f"silu_mul_{layout}"] = {"ptx": _compile(silu_mul_triton._silu_mul_xq_kernel, sig,
                                                     dict(OUT=tl.bfloat16, LAYOUT=layout, BLOCKS=16), num_warps=4)[1]}
    return out


@pytest.fixture(scope="module")
def compiled():
    from devstral.kernels import sass_stats

    if not sass_stats.tools_available():
        pytest.skip("Triton's ptxas not shipped on this platform")
    return sass_stats.offline_json(__file__, "--compile")


@pytest.mark.parametrize("delta", [False, True], ids=["norm", "add_norm"])
def test_fused_norm_reduces_its_row_as_the_plain_norm(compiled, delta):
    """Compiled for sm_90: RMSNorm writing the int8 layout reduces the row's squares in the layout the
    float RMSNorm does (the order of a float sum follows the layout), so the normed values it quantizes
    are the float kernel's, bit for bit."""
    plain = compiled[f"rms_norm_{delta}_-1"]["reduce"]
    assert compiled[f"rms_norm_{delta}_0"]["reduce"] == plain == compiled[f"rms_norm_{delta}_1"]["reduce"]


def test_every_quantizing_kernel_rounds_its_levels_in_one_fma(compiled):
    """x * inv + 1.5 * 2^23 as one fma.rn in the quantization launch and in the fused RMSNorm and SwiGLU
    (one rounding in each: the same levels), never as a multiply and an add."""
    for name, st in compiled.items():
        if name.startswith("rms_norm") and name.endswith("-1"):
            continue  # the float norm quantizes nothing
        ptx = st["ptx"]
        assert re.search(r"fma\.rn\.f32\s+[^;]*0f4B400000;", ptx), name
        assert not re.search(r"add(\.rn)?\.f32\s+[^;]*0f4B400000;", ptx), name


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    if sys.argv[1] == "--compile":
        print(json.dumps(_compiled()))
    else:
        _run_model(sys.argv[1])
