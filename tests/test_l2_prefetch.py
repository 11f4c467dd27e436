"""The o projection's L2 prefetch of gate/up's first rows (kernels/l2_prefetch.py, quant/l2_prefetch.py), on CPU.

What is asked for: rows 0..R-1 of every field of the planar weight and nothing else, R within the budget and a
multiple of 16 (checked by marking the spans' bytes in a copy of the buffer and reading the marks back through
the weight's own field views). Who asks: install gives it to o projections whose one-row plan is the streaming
GEMV's split-K launch, linear passes it to that launch only. That the kernel issues it (after its own first loads,
before or after its wait) is checked in the sm_90 PTX (test_kernels_pdl.py); that outputs keep their bits, under
the interpreter here and on the GPU (test_l2_prefetch_gpu.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import interpreter_runs

pytest.importorskip("triton")

from devstral.errors import DevstralError  # noqa: E402
from devstral.kernels.gguf_pack import pack  # noqa: E402
from devstral.quant import QType  # noqa: E402
from test_kernels_gguf_wide import random_blocks  # noqa: E402


@pytest.mark.parametrize("qtype,n,k", [("Q4_K", 96, 512), ("Q6_K", 80, 256), ("Q8_0", 64, 96), ("Q5_K", 48, 256)])
@pytest.mark.parametrize("rows_budget", [16, 37, 64, 10_000])
def test_spans_are_exactly_the_first_rows_of_every_field(qtype, n, k, rows_budget):
    from devstral.quant.l2_prefetch import spans

    g = torch.Generator().manual_seed(n + k)
    p = pack(random_blocks(QType[qtype], n, k, g), QType[qtype], n, k)
    row_bytes = sum(a.stride(0) * a.element_size() for a in p.arrays.values())
    budget = rows_budget * row_bytes + row_bytes // 2
    got = spans(p, budget)
    rows = min(n, rows_budget) // 16 * 16
    assert len(got) == 2 * len(p.arrays) and sum(got[1::2]) <= budget and rows % 16 == 0
    assert all(v % 16 == 0 for v in got)
    marks = torch.zeros_like(p.buf)
    for off, size in zip(got[0::2], got[1::2], strict=True):
        assert marks[off:off + size].sum() == 0  # no byte asked for twice
        marks[off:off + size] = 1
    view = type(p)(p.qtype, p.n, p.k, marks)  # the same layout over the marks
    for name, a in view.arrays.items():
        assert bool((a[:rows] != 0).all()), name
        assert not bool((a[rows:] != 0).any()), name
    assert int(marks.sum()) == rows * row_bytes


def test_a_budget_under_sixteen_rows_asks_for_nothing():
    from devstral.quant.l2_prefetch import spans

    p = pack(random_blocks(QType.Q4_K, 64, 256, torch.Generator().manual_seed(1)), QType.Q4_K, 64, 256)
    row_bytes = sum(a.stride(0) * a.element_size() for a in p.arrays.values())
    assert spans(p, 15 * row_bytes) == () and spans(p, 0) == ()


@pytest.mark.parametrize("name,value,match", [("DEVSTRAL_L2_PREFETCH_MB", "lots", "DEVSTRAL_L2_PREFETCH_MB='lots'"),
                                              ("DEVSTRAL_L2_PREFETCH_MB", "-3", "DEVSTRAL_L2_PREFETCH_MB='-3'"),
                                              ("DEVSTRAL_L2_PREFETCH_AT", "soon", "one of wait, early")])
def test_bad_settings_name_the_variable(monkeypatch, name, value, match):
    from devstral.quant import l2_prefetch

    monkeypatch.setenv("DEVSTRAL_L2_PREFETCH_MB", "8")
    monkeypatch.setenv(name, value)
    with pytest.raises(DevstralError, match=match):
        l2_prefetch.budget_bytes()
        l2_prefetch.mode()


def test_linear_passes_the_hint_to_the_streaming_gemv_only(monkeypatch):
    from devstral.kernels import gguf_config, gguf_gemv_tma, gguf_gemv_wide, gguf_linear

    seen = []
    monkeypatch.setattr(gguf_gemv_wide, "gemv", lambda x, p, bias, out, **kw: seen.append(("wide", kw.get("prefetch"))))
    monkeypatch.setattr(gguf_gemv_tma, "gemv", lambda x, p, bias, out, **kw: seen.append(("tma", kw.get("prefetch"))))
    monkeypatch.setattr(gguf_gemv_tma, "usable", lambda *a: True)
    p = pack(random_blocks(QType.Q4_K, 8, 256, torch.Generator().manual_seed(2)), QType.Q4_K, 8, 256)
    hint = (p.buf, (0, 16), 1)
    monkeypatch.setattr(gguf_config, "gguf_plan", lambda *a, **kw: ("wide_xq", dict(bn=16, ns=8, bm=1)))
    gguf_linear.linear(torch.randn(1, 256), p, prefetch=hint)
    monkeypatch.setattr(gguf_config, "gguf_plan", lambda *a, **kw: ("wide_tma", dict(bn=16, ns=16)))
    gguf_linear.linear(torch.randn(1, 256), p, prefetch=hint)
    assert seen == [("wide", hint), ("tma", None)]


def _block(o, gate_up):
    return SimpleNamespace(self_attn=SimpleNamespace(o_proj=o), mlp=SimpleNamespace(gate_up=gate_up))


def test_install_gives_streaming_o_projections_their_gate_ups_first_rows(monkeypatch):
    from devstral.kernels import gguf_config
    from devstral.quant import l2_prefetch
    from devstral.quant import linear as qlinear

    monkeypatch.setattr(qlinear, "cuda_kernels", lambda device: True)  # planar weights, here on the CPU
    g = torch.Generator().manual_seed(3)

    def o_proj():
        return qlinear.QuantLinear(random_blocks(QType.Q4_K, 32, 256, g), QType.Q4_K, 32, 256)

    gate_up = qlinear.PackedProjection(pack(random_blocks(QType.Q4_K, 128, 256, g), QType.Q4_K, 128, 256), [])
    streaming, tma, no_mlp = o_proj(), o_proj(), o_proj()
    model = SimpleNamespace(model=SimpleNamespace(layers=[_block(streaming, gate_up), _block(tma, gate_up),
                                                          SimpleNamespace(self_attn=SimpleNamespace(o_proj=no_mlp))]))
    kinds = iter(["wide_xq", "wide_tma"])
    monkeypatch.setattr(gguf_config, "gguf_plan", lambda *a, **kw: (next(kinds), {}))
    monkeypatch.delenv("DEVSTRAL_L2_PREFETCH_MB", raising=False)
    assert l2_prefetch.install(model) == 0 and streaming.l2_next is None  # off unless asked
    monkeypatch.setenv("DEVSTRAL_L2_PREFETCH_MB", "0.01")
    monkeypatch.setenv("DEVSTRAL_L2_PREFETCH_AT", "early")
    assert l2_prefetch.install(model) == 1
    buf, got, mode = streaming.l2_next
    assert buf is gate_up.packed.buf and mode == 2 and got == l2_prefetch.spans(gate_up.packed, 10485)
    assert tma.l2_next is None and no_mlp.l2_next is None


def test_the_gemv_keeps_its_bits_with_the_hint_under_the_interpreter():
    res = interpreter_runs.results(__file__, timeout=600)
    for name, (plain, hinted) in res.items():
        assert torch.equal(plain, hinted), name


def _run_cases(out_path: str) -> None:
    """Executed in the subprocess, under the interpreter (where the prefetch compiles out: the arguments still
    travel through every level of the launch)."""
    from devstral.kernels import gguf_gemv_wide
    from devstral.quant.l2_prefetch import spans

    g = torch.Generator().manual_seed(4)
    target = pack(random_blocks(QType.Q4_K, 64, 256, g), QType.Q4_K, 64, 256)
    hint = spans(target, 1 << 20)
    res = {}
    for name, qtype, k, cfg in (("split", "Q4_K", 1024, dict(bn=16, ns=8, bm=1, split_k=3)),
                                ("one_tile", "Q8_0", 512, dict(bn=16, ns=8, bm=1, split_k=2))):
        p = pack(random_blocks(QType[qtype], 40, k, g), QType[qtype], 40, k)
        x = torch.randn(1, k, generator=g)
        outs = []
        for prefetch in (None, (target.buf, hint, 1), (target.buf, hint, 2)):
            out = torch.full((1, 40), float("nan"))
            gguf_gemv_wide.gemv(x, p, None, out, int8=True, xq=True, **cfg, prefetch=prefetch)
            outs.append(out)
        res[name] = (outs[0], outs[1])
        res[name + "_early"] = (outs[0], outs[2])
    torch.save(res, out_path)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _run_cases(sys.argv[1])
