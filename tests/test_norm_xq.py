"""The RMSNorm writing the int8 GEMVs' activations beside its output (kernels/rms_norm_triton.py, xq) and
gguf_xq's memo of them (offer / quantize).

CPU: the memo's matching on plain tensors (the quantize kernel mocked); one subprocess under
TRITON_INTERPRET=1 (the interpreter is chosen when a kernel is decorated) runs the fused norm against
gguf_xq's twin of its stored row, and a tiny GGUF decoder (dense, and a mixture of experts) with
DEVSTRAL_NORM_XQ=0 and =1, counting the quantize launches.
"""

from __future__ import annotations

import gc
import os
import sys
import weakref
from pathlib import Path

import pytest
import torch

import interpreter_runs
from counted_kernel import CountedKernel

pytest.importorskip("triton")

from devstral.kernels import gguf_xq  # noqa: E402

DIMS = (256, 320)  # a power of two and not (the kernel's row is padded to 512)
LAYOUTS = ((0,), (1,), (0, 1))


class _Launches:
    """Stands in for gguf_xq._quantize_kernel: counts launches, fills the output with a marker."""

    def __init__(self):
        self.count = 0

    def __getitem__(self, grid):
        def launch(x, out, *args, **kwargs):
            self.count += 1
            out.fill_(-7)

        return launch


@pytest.fixture
def launches(monkeypatch):
    fake = _Launches()
    monkeypatch.setattr(gguf_xq, "_quantize_kernel", fake)
    monkeypatch.setattr(gguf_xq, "_offered", None)
    return fake


def _offered_row(m: int = 2, k: int = 64, layouts=(gguf_xq.STRIDE8, gguf_xq.STRIDE4)):
    y = torch.randn(m, k).to(torch.bfloat16)
    xqs = {layout: torch.full((m, k // 32, gguf_xq.WORDS), layout + 1, dtype=torch.int32) for layout in layouts}
    gguf_xq.offer(y, xqs)
    return y, xqs


def test_the_offered_xq_is_returned_for_its_rows(launches):
    y, xqs = _offered_row()
    for layout, xq in xqs.items():
        assert gguf_xq.quantize(y, layout) is xq
        assert gguf_xq.quantize(y.view(1, 2, 64).reshape(-1, 64), layout) is xq  # a view, as linear() makes one
        assert gguf_xq.quantize(y.detach(), layout) is xq
    assert launches.count == 0
    y1, xqs1 = _offered_row(m=1)
    assert gguf_xq.quantize(y1.view(1, 1, 64)[0], gguf_xq.STRIDE8) is xqs1[gguf_xq.STRIDE8]
    assert launches.count == 0


def test_anything_else_launches(launches):
    y, xqs = _offered_row(m=3)
    misses = [
        y.clone(),  # equal values, another tensor
        y[1:],  # other rows
        y[:2],  # the first rows only: y's data pointer, fewer rows
        y[:, 32:],  # other columns
        y.reshape(6, 32),  # y's data in other rows
        y.view(torch.int16),  # another dtype
    ]
    for x in misses:
        before = launches.count
        out = gguf_xq.quantize(x, gguf_xq.STRIDE8)
        assert launches.count == before + 1 and (out == -7).all()
    gguf_xq.offer(y, {gguf_xq.STRIDE8: xqs[gguf_xq.STRIDE8]})
    assert gguf_xq.quantize(y, gguf_xq.STRIDE4) is not xqs[gguf_xq.STRIDE4]  # a layout not offered
    pre = torch.cat([y, y], dim=1)
    gguf_xq.offer(pre, {gguf_xq.STRIDE8: torch.zeros(3, 4, gguf_xq.WORDS, dtype=torch.int32)})
    assert gguf_xq.quantize(pre, gguf_xq.STRIDE8, glu=True).shape == (3, 2, gguf_xq.WORDS)  # glu never matches
    assert launches.count == len(misses) + 2


def test_an_in_place_write_is_a_miss(launches):
    y, xqs = _offered_row()
    y[0, 0] = 1.0
    assert gguf_xq.quantize(y, gguf_xq.STRIDE8) is not xqs[gguf_xq.STRIDE8]
    y, xqs = _offered_row()
    y.view(-1)[5:9].zero_()  # through a view: the version counter is shared
    assert gguf_xq.quantize(y, gguf_xq.STRIDE4) is not xqs[gguf_xq.STRIDE4]
    assert launches.count == 2


def test_inference_tensors_are_not_recorded(launches):
    """Inference-mode tensors keep no version counter (an in-place write could not be told): such an offer
    drops the memo; the norm allocates its output outside inference mode for this."""
    y, xqs = _offered_row()
    with torch.inference_mode():
        z = torch.randn(2, 64).to(torch.bfloat16)
        gguf_xq.offer(z, {gguf_xq.STRIDE8: xqs[gguf_xq.STRIDE8]})
        assert gguf_xq.quantize(z, gguf_xq.STRIDE8) is not xqs[gguf_xq.STRIDE8]
        assert gguf_xq.quantize(y, gguf_xq.STRIDE8) is not xqs[gguf_xq.STRIDE8]
        with torch.inference_mode(False):
            w = torch.randn(2, 64).to(torch.bfloat16)
        gguf_xq.offer(w, {gguf_xq.STRIDE8: xqs[gguf_xq.STRIDE8]})
        assert gguf_xq.quantize(w.reshape(2, 64), gguf_xq.STRIDE8) is xqs[gguf_xq.STRIDE8]
    assert launches.count == 2


def test_the_memo_holds_one_producer(launches):
    """An offer replaces the one before (its row and xq are let go), so the memo never grows; while an
    entry stands it holds its row, whose memory no other tensor can then take."""
    y, xqs = _offered_row()
    gone = weakref.ref(y)
    del y, xqs
    gc.collect()
    assert gone() is not None  # held by the memo
    y2, _ = _offered_row()
    gc.collect()
    assert gone() is None
    assert len(gguf_xq._offered[2]) == 2 and gguf_xq._offered[0] is y2


def test_the_reference_norm_ignores_xq(launches):
    from devstral.kernels.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the kernel on CPU tensors")
    x, d = torch.randn(2, 64).to(torch.bfloat16), torch.randn(2, 64).to(torch.bfloat16)
    w = torch.rand(64).to(torch.bfloat16)
    assert torch.equal(rms_norm(x, w, 1e-5, (0, 1)), rms_norm_ref(x, w, 1e-5))
    assert all(torch.equal(a, b) for a, b in zip(add_rms_norm(x, d, w, 1e-5, (0,)), add_rms_norm_ref(x, d, w, 1e-5),
                                                 strict=True))
    assert gguf_xq._offered is None


def test_the_norm_is_told_only_the_layouts_a_decode_plan_quantizes_in(monkeypatch):
    """quant.linear.decode_xq_layouts: a planar weight's layout where its plan at some decode size (1-8
    rows) is wide_xq, a pair's two layouts where it pairs (both plans int8 streaming GEMVs), nothing for
    float or in-kernel-int8 plans or plain linears."""
    import devstral.quant.linear as ql
    from devstral.kernels import gguf_config
    from devstral.quant import QType
    from test_kernels_gguf_wide import random_blocks

    monkeypatch.setattr(ql, "cuda_kernels", lambda device: True)  # planar weights on the CPU
    g = torch.Generator().manual_seed(5)
    qk = ql.fuse_quant(*(ql.QuantLinear(random_blocks(QType.Q4_K, 64, 256, g), QType.Q4_K, 64, 256)
                         for _ in range(2)))
    v = ql.QuantLinear(random_blocks(QType.Q6_K, 32, 256, g), QType.Q6_K, 32, 256)
    plans = {}
    monkeypatch.setattr(gguf_config, "gguf_plan", lambda qtype, m, n, k, device=None: (
        plans.get((qtype, m), "wide"), dict(bn=64, ns=8, bm=1, split_k=1, num_warps=4)))
    assert ql.decode_xq_layouts(qk, v, torch.nn.Linear(256, 8)) == ()
    plans[("Q6_K", 2)] = "wide_xq"
    assert ql.decode_xq_layouts(qk, v) == (gguf_xq.STRIDE4,)
    plans[("Q4_K", 9)] = "wide_xq"  # past the decode sizes: the norm writes nothing there
    assert ql.decode_xq_layouts(qk) == ()
    pair = ql.PairedProjection(qk, v)
    assert ql.decode_xq_layouts(pair) == (gguf_xq.STRIDE4,)  # Q4_K is "wide": no pair, v alone
    plans.update({("Q4_K", 1): "wide_i8", ("Q6_K", 1): "wide_i8"})
    assert ql.decode_xq_layouts(pair) == (gguf_xq.STRIDE8, gguf_xq.STRIDE4)


def _norm_cases() -> dict:
    """The fused norm against the plain one, each dim / rows / residual / layouts."""
    from devstral.kernels.rms_norm_triton import add_rms_norm_triton, rms_norm_triton

    g = torch.Generator().manual_seed(0)
    out = {}
    for n in DIMS:
        w = (torch.rand(n, generator=g) + 0.5).to(torch.bfloat16)
        for m in (1, 2, 3, 9):  # 9: past the decode sizes, no xq
            x = (torch.randn(m, n, generator=g) * 3).to(torch.bfloat16)
            d = (torch.randn(m, n, generator=g) * 3).to(torch.bfloat16)
            x[0, 32:64] = 0  # an all-zero block of the normed row
            d[0, 32:64] = 0
            for delta in (False, True):
                for layouts in LAYOUTS:
                    gguf_xq.forget()
                    if delta:
                        plain = add_rms_norm_triton(x, d, w, 1e-5)
                        fused = add_rms_norm_triton(x, d, w, 1e-5, xq=layouts)
                    else:
                        plain = (rms_norm_triton(x, w, 1e-5), None)
                        fused = (rms_norm_triton(x, w, 1e-5, xq=layouts), None)
                    y = fused[0]
                    entry = gguf_xq._offered
                    got = {layout: gguf_xq.quantize(y.reshape(m, n), layout) for layout in layouts}
                    out[(n, m, delta, layouts)] = {
                        "plain": plain, "fused": fused, "xq": got, "inference": y.is_inference(),
                        "offered": entry is not None and all(got[layout] is entry[2][layout] for layout in layouts)}
    # inside inference mode (as the engine runs): the output is a normal tensor, so the memo records it
    with torch.inference_mode():
        x = torch.randn(1, 256, generator=g).to(torch.bfloat16)
        y = rms_norm_triton(x, torch.ones(256, dtype=torch.bfloat16), 1e-5, xq=(0,))
        out["inference_mode"] = (y.is_inference(), gguf_xq._offered is not None and gguf_xq._offered[0].data_ptr()
                                 == y.data_ptr())
    # a row not in blocks of 32: nothing written, nothing offered
    gguf_xq.forget()
    x = torch.randn(1, 100, generator=g).to(torch.bfloat16)
    out["odd"] = (rms_norm_triton(x, torch.ones(100, dtype=torch.bfloat16), 1e-5, xq=(0,)), gguf_xq._offered)
    return out


def _wide_xq_plan(qtype, m, *args, **kwargs):
    """Every GGUF GEMV the xq one; wide tiles: few programs for the interpreter."""
    from devstral.kernels.gguf_gemv_wide import bm_for

    return "wide_xq", dict(bn=64, ns=8, bm=bm_for(m), split_k=1, num_warps=4)


def _moe_plan(kind, *args, **kwargs):
    return dict(bn=64, split_k=1, num_warps=4, int8=True, xq=True)


def _quant_linear(ql, qt, n, k, g):
    from test_kernels_gguf_wide import random_blocks

    return ql.QuantLinear(random_blocks(qt, n, k, g), qt, n, k)


def _model(moe: bool):
    """A tiny Devstral-like GGUF decoder (planar weights on the CPU): layer 0 fused q/k Q4_K and v Q6_K
    (a PairedProjection, both layouts), layer 1 all Q4_K (one fused q/k/v); gate/up Q4_K, down Q6_K; or a
    Mixtral-like one with Q4_K/Q6_K experts. Output head Q6_K."""
    import devstral.quant.linear as ql
    from devstral.config import ModelConfig
    from devstral.model.transformer import Transformer
    from devstral.quant import QType

    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    cfg = ModelConfig(arch="mistral", vocab_size=64, dim=256, n_layers=1 if moe else 2, n_heads=2, n_kv_heads=1,
                      head_dim=128, hidden_dim=256, n_experts=4 if moe else 0,
                      n_experts_per_tok=2 if moe else 0)
    model = Transformer(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    q4, q6 = QType.Q4_K, QType.Q6_K
    for i, block in enumerate(model.model.layers):
        attn = block.self_attn
        for name, n in (("q_proj", 256), ("k_proj", 128), ("v_proj", 128)):
            setattr(attn, name, _quant_linear(ql, q6 if name == "v_proj" and i == 0 else q4, n, 256, g))
        attn.o_proj = _quant_linear(ql, q4, 256, 256, g)
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight.copy_(torch.rand(256, generator=g) + 0.5)
        if moe:
            for expert in block.block_sparse_moe.experts:
                expert.w1, expert.w3 = (_quant_linear(ql, q4, 256, 256, g) for _ in range(2))
                expert.w2 = _quant_linear(ql, q6, 256, 256, g)
        else:
            mlp = block.mlp
            mlp.gate_proj, mlp.up_proj = (_quant_linear(ql, q4, 256, 256, g) for _ in range(2))
            mlp.down_proj = _quant_linear(ql, q6, 256, 256, g)
    model.model.norm.weight.copy_(torch.rand(256, generator=g) + 0.5)
    model.lm_head = _quant_linear(ql, q6, 64, 256, g)
    return model


def _decoder_cases() -> dict:
    """The tiny decoders with DEVSTRAL_NORM_XQ=0 and =1: logits, quantize launches, the norms' layouts."""
    import devstral.quant.linear as ql
    from devstral.kernels import gguf_config, moe_gemv
    from devstral.kernels.interpret_triton import hardware_rounding

    ql.cuda_kernels = lambda device: True  # planar weights on the CPU, as on CUDA
    gguf_config.gguf_plan = _wide_xq_plan
    moe_gemv.plan = _moe_plan
    launches = CountedKernel(gguf_xq._quantize_kernel)
    gguf_xq._quantize_kernel = launches
    g = torch.Generator().manual_seed(2)
    tokens = {t: torch.randint(0, 64, (1, t), generator=g) for t in (1, 3)}
    out = {}
    for moe in (False, True):
        for on in ("0", "1"):
            os.environ["DEVSTRAL_NORM_XQ"] = on
            model = _model(moe)
            model.fuse_projections()
            norms = [(b.input_layernorm.xq_layouts, b.post_attention_layernorm.xq_layouts)
                     for b in model.model.layers] + [model.model.norm.xq_layouts]
            kinds = [type(b.self_attn.qkv).__name__ for b in model.model.layers]
            for t, ids in tokens.items():
                launches.count = 0
                with torch.no_grad(), hardware_rounding():
                    logits = model(ids)
                out[(moe, on, t)] = {"logits": logits, "launches": launches.count, "norms": norms, "kinds": kinds}
    os.environ.pop("DEVSTRAL_NORM_XQ")
    return out


def _run_cases(out_path: str) -> None:
    """Executed in the subprocess, under the interpreter."""
    torch.save({"norm": _norm_cases(), "decoder": _decoder_cases()}, out_path)


@pytest.fixture(scope="module")
def results():
    return interpreter_runs.results(__file__, timeout=900)


@pytest.mark.parametrize("n", DIMS)
@pytest.mark.parametrize("delta", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("layouts", LAYOUTS, ids=["stride8", "stride4", "both"])
def test_the_norm_writes_the_quantization_of_its_stored_row(results, n, delta, layouts):
    """At 1-3 rows the normed row and the residual are the plain kernel's bit for bit, and each layout's
    words are gguf_xq's twin of that stored row, bit for bit (the interpreter has no fused multiply-add:
    on the GPU the quantize kernel shares the very packing code, see the GPU test); quantize() hands them
    back without a launch. At 9 rows nothing is written or offered."""
    for m in (1, 2, 3, 9):
        case = results["norm"][(n, m, delta, layouts)]
        for got, plain in zip(case["fused"], case["plain"], strict=True):
            assert (got is None) == (plain is None) and (got is None or torch.equal(got, plain))
        y = case["fused"][0].reshape(m, n)
        assert case["offered"] == (m <= 8), m
        assert not case["inference"]
        for layout in layouts:
            assert torch.equal(case["xq"][layout], gguf_xq.reference(y, layout)), (m, layout)


def test_the_norm_offers_in_inference_mode_and_only_rows_of_whole_blocks(results):
    assert results["norm"]["inference_mode"] == (False, True)
    y, offered = results["norm"]["odd"]
    assert y.shape == (1, 100) and offered is None


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_a_gguf_decoder_gives_the_same_logits_with_fewer_quantize_launches(results, moe):
    """DEVSTRAL_NORM_XQ=1 against =0: the same logits bit for bit at 1 and 3 tokens, and the norms before
    q/k/v, gate/up (or the experts) and the output head launch no quantization (left: o_proj's and down's
    inputs, per layer). (Past the decode sizes the norm writes nothing: the norm test's 9 rows.)"""
    layers = 1 if moe else 2
    for t in (1, 3):
        off, on = results["decoder"][(moe, "0", t)], results["decoder"][(moe, "1", t)]
        assert torch.equal(on["logits"], off["logits"]), t
        assert not on["logits"].isnan().any()
        # o_proj and down (down: glu in the dense MLP; each expert pair's h in the MoE) per layer
        assert on["launches"] == 2 * layers, (t, on["launches"])
        # input norm: q/k and v paired in layer 0 (two layouts), one fused q/k/v in layer 1; the MLP's gate/up
        # or the experts' gate_up; the head
        norm_fed = (1 + 1 + 1 + 1) if moe else (2 + 1) + (1 + 1) + 1
        assert off["launches"] == on["launches"] + norm_fed, (t, off["launches"])
    on = results["decoder"][(moe, "1", 1)]
    if moe:
        assert on["kinds"] == ["PairedProjection"]
        assert on["norms"] == [((0, 1), (0,)), (1,)]
    else:
        assert on["kinds"] == ["PairedProjection", "PackedProjection"]
        assert on["norms"] == [((0, 1), (0,)), ((0,), (0,)), (1,)]
    assert results["decoder"][(moe, "0", 1)]["norms"] == [((), ())] * layers + [()]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    _run_cases(sys.argv[1])
