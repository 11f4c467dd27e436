"""Fixed-point o/down outputs (kernels/fixed_point.py, quant/fixed_deltas.py) on CPU, in Triton's interpreter.

Each decode GEMV kind that can write fixed point (the streaming GEMV split-K and stream-K, float and int8
activations, the SwiGLU folded in; the TMA GEMV split-K and stream-K) adds into an int64 buffer whose sum,
converted, is its ordinary output up to float32 rounding (the ordinary epilogue adds the splits' fp32 partials in
order, fixed point adds them exactly), zeroes the other buffer, and gives the same bits run after run. The norm
reading an int64 delta gives the bits it gives for the converted delta, with and without the GEMV activations it
writes. The protocol (o into A zeroing B, down into B zeroing A) over several layers gives each layer the output
it would have had.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import interpreter_runs

pytest.importorskip("triton")

from devstral.kernels.fixed_point import ONE, from_fixed_ref, to_fixed_ref  # noqa: E402
from devstral.kernels.gguf_pack import pack  # noqa: E402
from devstral.quant import QType  # noqa: E402
from test_kernels_gguf_wide import random_blocks  # noqa: E402

N = 40
# (name, type, K, kind, launch constants)
GEMVS = [("wide_split", "Q4_K", 1024, "wide", dict(bn=16, ns=8, bm=1, split_k=3)),
         ("wide_i8_stream", "Q6_K", 768, "wide_i8", dict(bn=16, ns=8, bm=1, stream=2)),
         ("wide_xq_one_tile", "Q8_0", 512, "wide_xq", dict(bn=16, ns=8, bm=1, split_k=2)),
         ("wide_xq_glu", "Q4_K", 1024, "wide_xq_glu", dict(bn=16, ns=8, bm=1, split_k=2)),
         ("tma_split", "Q6_K", 768, "wide_tma", dict(bn=16, ns=16, split_k=2, num_stages=2)),
         ("tma_stream", "Q4_K", 2048, "wide_tma", dict(bn=16, ns=16, stream=2, num_stages=2))]


def _gemv(kind, x, p, out, cfg, **fixed):
    from devstral.kernels import gguf_gemv_tma, gguf_gemv_wide

    if kind == "wide_tma":
        return gguf_gemv_tma.gemv(x, p, None, out, **cfg, **fixed)
    glu = kind == "wide_xq_glu"
    return gguf_gemv_wide.gemv(x, p, None, out, int8=kind != "wide", xq=kind.startswith("wide_xq"), glu=glu, **cfg,
                               **fixed)


def _run_cases(out_path: str) -> None:
    """Executed in the subprocess, under the interpreter."""
    from devstral.kernels import gguf_gemv_tma, gguf_gemv_wide
    from devstral.kernels.rms_norm_triton import add_rms_norm_triton

    two_sms = lambda per_sm, units, device: max(1, min(units, 2 * per_sm))  # noqa: E731
    gguf_gemv_wide.stream_programs = gguf_gemv_tma.stream_programs = two_sms
    g = torch.Generator().manual_seed(0)
    res = {"gemvs": {}}
    for name, qtype, k, kind, cfg in GEMVS:
        p = pack(random_blocks(QType[qtype], N, k, g), QType[qtype], N, k)
        x = torch.randn(1, 2 * k if kind == "wide_xq_glu" else k, generator=g)
        plain = torch.full((1, N), float("nan"))
        _gemv(kind, x, p, plain, cfg)
        runs = []
        for _ in range(2):
            acc = torch.zeros(1, N, dtype=torch.int64)
            zero = torch.randint(-2**40, 2**40, (1, N), generator=g)
            _gemv(kind, x, p, acc, cfg, fixed_zero=zero)
            runs.append((acc, zero))
        res["gemvs"][name] = dict(plain=plain, runs=runs)
    # the protocol over three "layers": o (Q4_K, split-K) into A zeroing B, down (Q6_K TMA, stream-K) into B zeroing A
    o_w = pack(random_blocks(QType.Q4_K, 256, 1024, g), QType.Q4_K, 256, 1024)
    down_w = pack(random_blocks(QType.Q6_K, 256, 768, g), QType.Q6_K, 256, 768)
    a, b = torch.zeros(2, 1, 256, dtype=torch.int64)
    b.fill_(12345)  # whatever the last down left: the first o zeroes it
    layers = []
    for _ in range(3):
        xo, xd = torch.randn(1, 1024, generator=g), torch.randn(1, 768, generator=g)
        plain_o, plain_d = torch.empty(1, 256), torch.empty(1, 256)
        gguf_gemv_wide.gemv(xo, o_w, None, plain_o, bn=32, ns=8, bm=1, split_k=4, int8=True)
        gguf_gemv_tma.gemv(xd, down_w, None, plain_d, bn=16, ns=16, stream=2, num_stages=2)
        gguf_gemv_wide.gemv(xo, o_w, None, a, bn=32, ns=8, bm=1, split_k=4, int8=True, fixed_zero=b)
        o_sum, b_after_o = a.clone(), b.clone()
        gguf_gemv_tma.gemv(xd, down_w, None, b, bn=16, ns=16, stream=2, num_stages=2, fixed_zero=a)
        layers.append(dict(plain_o=plain_o, plain_d=plain_d, o_sum=o_sum, b_after_o=b_after_o, d_sum=b.clone(),
                           a_after_d=a.clone()))
    res["protocol"] = layers
    # the norm: an int64 delta against the same delta converted first, with and without the activations (xq)
    norms = []
    for dtype in (torch.bfloat16, torch.float32):
        for xq in ((), (0, 1)):
            x = torch.randn(1, 1024, generator=g).to(dtype)
            delta = to_fixed_ref(torch.randn(1, 1024, generator=g) * 3)
            w = torch.randn(1024, generator=g).to(dtype)
            got = add_rms_norm_triton(x, delta, w, 1e-5, xq=xq)
            ref = add_rms_norm_triton(x, from_fixed_ref(delta, dtype), w, 1e-5, xq=xq)
            norms.append(dict(dtype=dtype, xq=xq, got=got, ref=ref))
    res["norms"] = norms
    torch.save(res, out_path)


@pytest.fixture(scope="module")
def results():
    return interpreter_runs.results(__file__, timeout=900)


@pytest.mark.parametrize("name", [c[0] for c in GEMVS])
def test_fixed_point_output_is_the_gemv_output_and_zeroes_the_other_buffer(results, name):
    r = results["gemvs"][name]
    (acc, zero), (acc2, zero2) = r["runs"]
    assert torch.equal(acc, acc2) and torch.equal(zero, zero2), "not the same bits run after run"
    assert not zero.any(), "the other buffer was not zeroed"
    torch.testing.assert_close(from_fixed_ref(acc, torch.float32), r["plain"], rtol=2e-6, atol=4 / ONE * 1e3)


@pytest.mark.parametrize("layer", range(3))
def test_o_and_down_alternating_buffers_give_every_layer_its_output(results, layer):
    r = results["protocol"][layer]
    assert not r["b_after_o"].any() and not r["a_after_d"].any()
    torch.testing.assert_close(from_fixed_ref(r["o_sum"], torch.float32), r["plain_o"], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(from_fixed_ref(r["d_sum"], torch.float32), r["plain_d"], rtol=2e-6, atol=1e-6)


def test_the_norm_reads_an_int64_delta_as_the_converted_delta(results):
    for r in results["norms"]:
        for got, ref in zip(r["got"], r["ref"], strict=True):
            assert torch.equal(got, ref), (r["dtype"], r["xq"])


def test_fixed_point_round_trip_and_rounding():
    """Toward zero at 2^-32 steps, exact integer sums, one rounding to float32 then to the dtype."""
    x = torch.tensor([1.5, -1.5, 2.0**-33, -(2.0**-33), 123.456, -0.0])
    fx = to_fixed_ref(x)
    assert fx.tolist()[:4] == [3 << 31, -(3 << 31), 0, 0]
    assert torch.equal(from_fixed_ref(fx, torch.float32)[[0, 1, 5]], torch.tensor([1.5, -1.5, 0.0]))
    assert abs(from_fixed_ref(fx, torch.float32)[4].item() - 123.456) < 1e-5
    assert from_fixed_ref(fx[:2].sum(0, keepdim=True), torch.bfloat16).item() == 0.0


def test_linear_hands_the_buffers_only_to_one_bias_free_row(monkeypatch):
    """gguf_linear.linear: one row without bias adds into the buffer and returns it; more rows, or a bias, write an
    ordinary output and leave the buffers alone; a plan that cannot add into fixed point is refused."""
    from devstral.kernels import gguf_config, gguf_gemv_wide, gguf_linear

    calls = []

    def fake(x, p, bias, out, **kw):
        calls.append(kw.get("fixed_zero"))
        out.fill_(7)
        return out

    monkeypatch.setattr(gguf_gemv_wide, "gemv", fake)
    monkeypatch.setattr(gguf_config, "gguf_plan", lambda *a, **kw: ("wide_xq", dict(bn=16, ns=8, bm=1)))
    g = torch.Generator().manual_seed(2)
    p = pack(random_blocks(QType.Q4_K, 8, 256, g), QType.Q4_K, 8, 256)
    acc, zero = torch.zeros(2, 1, 8, dtype=torch.int64)
    one = gguf_linear.linear(torch.randn(1, 1, 256, generator=g), p, fixed=(acc, zero))
    assert one.dtype == torch.int64 and one.shape == (1, 1, 8) and one.data_ptr() == acc.data_ptr()
    assert calls[-1] is zero
    for x, bias in ((torch.randn(2, 256, generator=g), None), (torch.randn(1, 256, generator=g), torch.ones(8))):
        out = gguf_linear.linear(x, p, bias, fixed=(acc, zero))
        assert out.dtype == torch.float32 and out.data_ptr() != acc.data_ptr() and calls[-1] is None
    monkeypatch.setattr(gguf_config, "gguf_plan", lambda *a, **kw: ("idot", {}))
    with pytest.raises(ValueError, match="fixed-point output asked of a idot plan"):
        gguf_linear.linear(torch.randn(1, 256, generator=g), p, fixed=(acc, zero))


def test_install_gives_no_buffers_unless_asked_and_possible(monkeypatch, capsys):
    """Off: nothing, silently. On, for a model whose layers cannot: nothing, and one note naming the first layer
    that cannot (once, though every engine fuses the model again)."""
    from devstral.model.transformer import Transformer
    from devstral.quant import fixed_deltas
    from devstral.testing import tiny_config

    model = Transformer(tiny_config())
    monkeypatch.delenv("DEVSTRAL_FIXED_DELTAS", raising=False)
    assert fixed_deltas.install(model) is False
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("DEVSTRAL_FIXED_DELTAS", "1")
    monkeypatch.setattr(fixed_deltas, "_NOTED", set())
    assert fixed_deltas.install(model) is False  # plain nn.Linear o/down: nothing to add into fixed point
    assert fixed_deltas.install(model) is False
    assert capsys.readouterr().err.splitlines() == [
        "note: DEVSTRAL_FIXED_DELTAS=1 has no effect: layers.0.self_attn.o_proj is not a GGUF layer on the GPU "
        "without bias whose one-row kernel adds into fixed point"]
    assert all(getattr(m, "fixed_out", None) is None for m in model.modules())



def test_wrapping_one_layer_with_lora_releases_every_layers_buffers():
    """A LoRA wrapper adds to its base's output, which then is not what the norm reads: the whole model goes back to
    ordinary outputs (the protocol needs every o and down)."""
    from devstral.model.lora import LoRALinear
    from devstral.quant import fixed_deltas
    from devstral.quant.linear import QuantLinear

    layers = [QuantLinear(torch.zeros(8, 144, dtype=torch.uint8), QType.Q4_K, 8, 256) for _ in range(4)]
    a, b = torch.zeros(2, 1, 8, dtype=torch.int64)
    for i, m in enumerate(layers):
        m.fixed_out, m.fixed_group = ((a, b) if i % 2 == 0 else (b, a)), layers
    LoRALinear(layers[1], 2, 4.0)
    assert all(m.fixed_out is None and m.fixed_group is None for m in layers)
    fixed_deltas.release(layers[0])  # nothing left to release: no error


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    _run_cases(sys.argv[1])


def _pair_like(qtype: str):
    from types import SimpleNamespace

    return SimpleNamespace(qtype=QType[qtype], out_features=8, weight_q=SimpleNamespace(device=torch.device("cpu")),
                           fixed_out=None, fixed_group=None)


@pytest.mark.parametrize("flag,qtypes,given", [(None, ("Q4_K", "Q6_K"), True), (None, ("Q4_K", "Q8_0"), False),
                                               ("1", ("Q4_K", "Q8_0"), True), ("0", ("Q4_K", "Q6_K"), False),
                                               ("", ("Q5_K", "Q5_K"), True)])
def test_the_default_is_on_where_every_o_and_down_is_a_k_quant(monkeypatch, flag, qtypes, given):
    """Unset: on only where every o and down is Q4_K/Q5_K/Q6_K (measured: Q4_K_M won, Q8_0 lost); 1 on wherever the
    protocol holds; 0 off."""
    from devstral.quant import fixed_deltas

    pairs = [(_pair_like(qtypes[0]), _pair_like(qtypes[1])), (_pair_like("Q4_K"), _pair_like("Q6_K"))]
    monkeypatch.setattr(fixed_deltas, "_pairs", lambda model: (pairs, None))
    if flag is None:
        monkeypatch.delenv("DEVSTRAL_FIXED_DELTAS", raising=False)
    else:
        monkeypatch.setenv("DEVSTRAL_FIXED_DELTAS", flag)
    assert fixed_deltas.install(object()) is given
    assert all((m.fixed_out is not None) is given for pair in pairs for m in pair)
    if given:  # o adds into A and zeroes B, down the other way round, one pair of buffers for the model
        (o, down), (o2, _) = pairs
        assert o.fixed_out[0] is down.fixed_out[1] and o.fixed_out[1] is down.fixed_out[0]
        assert o2.fixed_out[0] is o.fixed_out[0]


def test_a_bad_switch_value_names_the_variable(monkeypatch):
    from devstral.errors import DevstralError
    from devstral.quant import fixed_deltas

    monkeypatch.setenv("DEVSTRAL_FIXED_DELTAS", "yes")
    with pytest.raises(DevstralError, match="DEVSTRAL_FIXED_DELTAS='yes'"):
        fixed_deltas.install(object())
