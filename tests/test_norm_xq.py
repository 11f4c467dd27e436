"""The RMSNorm writing the int8 GEMVs' activations beside its output (kernels/rms_norm_triton.py, xq) and
gguf_xq's memo of them (offer / quantize).

CPU: the memo's matching on plain tensors (the quantize kernel mocked); one subprocess under
TRITON_INTERPRET=1 (the interpreter is chosen when a kernel is decorated) runs the fused norm against
gguf_xq's twin of its stored row.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

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


def _run_cases(out_path: str) -> None:
    """Executed in the subprocess, under the interpreter."""
    torch.save({"norm": _norm_cases()}, out_path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("norm_xq") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


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


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    _run_cases(sys.argv[1])
