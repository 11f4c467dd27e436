"""Liger-Kernel or ours per training op (kernels/train_backends.py, kernels/liger.py).

The table must be what the committed H200 measurement implies; the override is parsed strictly; off
CUDA (and without the interpreter) nothing changes. Liger's own kernels run on CPU through Triton's
interpreter in a subprocess: the training loss and LoRA gradients through Liger's fused linear + CE and
RoPE equal the full-logits reference. On a GPU, the same against the reference at a real width.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from devstral.errors import DevstralError
from devstral.kernels import train_backends as tb

ROOT = Path(__file__).parents[1]


def test_table_is_what_the_h200_measurement_says():
    result = json.loads((ROOT / "benchmarks/results/train_kernels_h200.json").read_text())
    assert tb.winners(result) == tb.MEASURED


def test_winners_keep_ours_on_a_tie_and_without_a_liger_figure():
    row = {"ours_ms": 1.0, "liger_ms": 0.97}  # 3% faster: inside the tie margin
    result = {"elementwise": {"rms_norm": {"ours_ms": 1.0}, "rope": row, "silu_mul": {"ours_ms": 1.0, "liger_ms": 0.5}},
              "head": {"fused_ours": {"ms": 10.0}, "fused_liger": {"ms": 11.0}}}
    assert tb.winners(result) == {"rms_norm": "ours", "rope": "ours", "silu_mul": "liger", "fused_linear_ce": "ours"}


@pytest.mark.parametrize("spec, expect", [
    ("ours", {"rope": "ours", "fused_linear_ce": "ours"}),
    ("liger", {"rope": "liger", "fused_linear_ce": "liger", "rms_norm": "ours", "silu_mul": "ours"}),
    ("rope=ours", {"rope": "ours", "fused_linear_ce": "liger"}),
    (" fused_linear_ce = ours , rope=liger ", {"rope": "liger", "fused_linear_ce": "ours"}),
])
def test_override_from_the_environment(monkeypatch, spec, expect):
    monkeypatch.setenv(tb.ENV, spec)
    table = tb.table()
    assert {op: table[op] for op in expect} == expect


@pytest.mark.parametrize("spec, words", [("rope=fast", "must be ours or liger"), ("attention=ours", "not OP=IMPL"),
                                         ("rms_norm=liger", "no Liger path"), ("rope", "not OP=IMPL")])
def test_bad_override_is_one_clear_error(monkeypatch, spec, words):
    monkeypatch.setenv(tb.ENV, spec)
    with pytest.raises(DevstralError, match=words) as e:
        tb.table()
    assert tb.ENV in str(e.value)


def test_finetune_refuses_a_bad_override_before_loading(monkeypatch, tmp_path, capsys):
    from devstral.cli import main

    monkeypatch.setenv(tb.ENV, "rope=fastest")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["finetune", "--model", str(tmp_path / "absent"), "--data", str(data), "--output",
                 str(tmp_path / "o")]) == 2
    assert f"{tb.ENV}='rope=fastest': rope must be ours or liger" in capsys.readouterr().err


def test_cpu_tensors_never_take_liger_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(tb.ENV, "liger")
    assert not tb.use_liger("rope", torch.zeros(1))


def test_the_interpreter_takes_liger_only_when_asked(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter tests of our own kernels keep testing ours
    monkeypatch.setattr(tb, "liger_available", lambda: True)
    monkeypatch.delenv(tb.ENV, raising=False)
    assert not tb.use_liger("rope", torch.zeros(1))
    monkeypatch.setenv(tb.ENV, "liger")
    assert tb.use_liger("rope", torch.zeros(1))


def test_without_liger_installed_ours_runs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(tb.ENV, "liger")
    monkeypatch.setattr(tb, "liger_available", lambda: False)
    assert not tb.use_liger("fused_linear_ce", torch.zeros(1))


def test_fused_ce_hands_liger_the_sum_over_rows_ignoring_minus_100(monkeypatch):
    """The argument mapping, with a stand-in for Liger's function that computes what Liger documents."""
    import devstral.kernels.fused_linear_ce as fce

    seen = {}

    def fake(h, w, t, **kw):
        seen.update(kw, dtype=(h.dtype, w.dtype))
        return F.cross_entropy(h.float() @ w.float().t(), t, ignore_index=kw["ignore_index"],
                               reduction=kw["reduction"])

    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional",
                        types.SimpleNamespace(liger_fused_linear_cross_entropy=fake))
    monkeypatch.setattr(fce, "use_liger", lambda op, t: op == "fused_linear_ce")
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 8, generator=g), torch.randn(13, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 13, (9,), generator=g)
    t[3] = -100
    got = fce.linear_cross_entropy(h, w, t)
    assert seen["reduction"] == "sum" and seen["ignore_index"] == -100 and seen["softcap"] is None
    assert seen["label_smoothing"] == 0.0 and seen["lse_square_scale"] == 0.0
    assert seen["accum_dtype"] == torch.float32  # W trains: fp32 accumulation of its gradient, as ours
    torch.testing.assert_close(got, fce.linear_cross_entropy(h, w, t, chunk=4))  # an explicit chunk: ours
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fce.linear_cross_entropy(h, w, t)
    assert seen["dtype"] == (torch.bfloat16, torch.bfloat16)  # autocast applied before Liger, as for ours
    seen.clear()
    fce.linear_cross_entropy(h[:0], w, t[:0])  # no learned rows: Liger divides by the row count; ours runs
    assert not seen


def test_rope_with_a_query_temperature_stays_ours(monkeypatch):
    import devstral.kernels.liger as liger
    from devstral.kernels.rope import apply_rope, apply_rope_ref

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(tb.ENV, "liger")
    monkeypatch.setattr(tb, "liger_available", lambda: True)
    calls = []
    monkeypatch.setattr(liger, "liger_rope", lambda *a: calls.append(a) or apply_rope_ref(*a))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 3, 2, 8, generator=g, requires_grad=True)
    cos, sin = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    apply_rope(q, k, cos, sin, torch.full((1, 3), 1.5))
    assert not calls
    apply_rope(q, q, cos, sin, None)  # one tensor as both: Liger's in-place rotation would apply twice
    assert not calls
    apply_rope(q, k, cos, sin, None)
    assert len(calls) == 1


_THROUGH_LIGER = textwrap.dedent("""
    import os, sys, torch, torch.nn.functional as F
    from pathlib import Path
    import devstral.kernels.liger as liger
    from devstral.config import ModelConfig
    from devstral.kernels.train_backends import ENV
    from devstral.model.lora import ALL_LINEAR, inject_lora, trainable_parameters
    from devstral.train.batching import Batch
    from devstral.train.loss import summed_loss
    from devstral.train.model_setup import load_base

    used = set()
    for name in ("liger_rope", "liger_linear_cross_entropy"):
        def counted(*a, _f=getattr(liger, name), _n=name):
            used.add(_n)
            return _f(*a)
        setattr(liger, name, counted)
    folder = Path(sys.argv[1])
    cfg = ModelConfig.from_dir(folder)
    model = load_base(folder, cfg, device=torch.device("cpu"), dtype=torch.float32)
    inject_lora(model, list(ALL_LINEAR), 4, 8.0, seed=0)
    params = trainable_parameters(model)
    for p in params:
        p.requires_grad_(True)
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 11), generator=g)
    labels = tokens.clone()
    labels[:, :4] = -100
    batch = Batch(tokens=tokens, labels=labels, positions=torch.arange(11).expand(2, 11), attn_mask=None)
    loss, n = summed_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    assert used == {"liger_rope", "liger_linear_cross_entropy"}, used
    os.environ[ENV] = "ours"
    used.clear()
    logits = model.lm_head(model.hidden_states(tokens, batch.positions))[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1), reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    assert not used, used
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # a head that trains (full fine-tuning): Liger's loss and both gradients against F.cross_entropy
    from devstral.kernels.fused_linear_ce import linear_cross_entropy
    os.environ[ENV] = "liger"
    h = torch.randn(37, 24, generator=g, requires_grad=True)
    w = (torch.randn(101, 24, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, 101, (37,), generator=g)
    t[::5] = -100
    got = linear_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(got * 0.37, (h, w))
    assert used == {"liger_linear_cross_entropy"}, used
    ref = F.cross_entropy(h @ w.t(), t, reduction="sum", ignore_index=-100)
    rh, rw = torch.autograd.grad(ref * 0.37, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)
    print("OK", float(loss), float(ref))
""")


def test_liger_path_equals_the_reference_through_the_interpreter(tiny_hf):
    pytest.importorskip("liger_kernel")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src"), tb.ENV: "liger"}
    done = subprocess.run([sys.executable, "-c", _THROUGH_LIGER, str(tiny_hf)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_liger_head_and_rope_equal_the_reference():
    pytest.importorskip("liger_kernel")
    from devstral.kernels.fused_linear_ce import linear_cross_entropy
    from devstral.kernels.rope import apply_rope, apply_rope_ref

    assert tb.use_liger("fused_linear_ce", torch.zeros(1, device="cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(2048, 1024, generator=g, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(32768, 1024, generator=g, device="cuda") * 0.03).bfloat16().requires_grad_()
    t = torch.randint(0, 32768, (2048,), generator=g, device="cuda")
    t[::7] = -100
    got = linear_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(got, (h, w))
    ref = F.cross_entropy((h.float() @ w.float().t()), t, reduction="sum", ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=1e-1)
    torch.testing.assert_close(gh.float(), rh.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=2e-2, atol=2e-2)

    B, T, H, Hk, D = 2, 512, 32, 8, 128
    q = torch.randn(B, T, H, D, generator=g, device="cuda").bfloat16().requires_grad_()
    k = torch.randn(B, T, Hk, D, generator=g, device="cuda").bfloat16().requires_grad_()
    freqs = torch.arange(T, device="cuda").float()[:, None] * 1e6 ** (-torch.arange(0, D, 2, device="cuda") / D)
    emb = torch.cat((freqs, freqs), -1).expand(B, T, D)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    qo, ko = apply_rope(q.clone(), k.clone(), cos, sin)  # clones: Liger rotates in place
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    qr, kr = apply_rope_ref(q.float(), k.float(), cos.float(), sin.float())
    rq, rk = torch.autograd.grad((qr, kr), (q, k), (gq.float(), gk.float()))
    for a, b in ((qo, qr), (ko, kr), (dq, rq), (dk, rk)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=3e-2)
