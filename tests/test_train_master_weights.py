"""bf16 LoRA weights with fp32 masters in the optimizer (train/master_weights.py, --lora-dtype).

Oracles: torch's AdamW on fp32 parameters given the same gradients; the fp32 run's exact-resume
property (a run interrupted after a checkpoint and resumed logs the same losses as one straight run);
the adapter file holds fp32 weights PEFT reads as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from devstral.cli import main
from devstral.errors import DevstralError
from devstral.train.config import TrainConfig
from devstral.train.master_weights import MasterWeights
from devstral.train.trainer import _lora_dtype


def test_masters_accumulate_fp32_and_step_like_fp32_adamw():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(8, 5, generator=g)
    x1, x2 = torch.randn(3, 8, generator=g), torch.randn(4, 8, generator=g)
    p = torch.nn.Parameter(w0.clone())
    mw = MasterWeights([p], torch.bfloat16)
    assert p.dtype == torch.bfloat16 and mw.masters[0].dtype == torch.float32
    torch.testing.assert_close(mw.masters[0], w0, rtol=0, atol=0)  # the master is the exact fp32 value
    for x in (x1, x2):  # two micro-batches
        (x.bfloat16() @ p).float().square().sum().backward()
        assert p.grad is None  # moved into the master's fp32 .grad by the hook
    master = mw.masters[0]
    ref_p = torch.nn.Parameter(w0.clone())
    ref_p.grad = master.grad.clone()
    opt = torch.optim.AdamW(mw.masters, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref_p], lr=1e-2, weight_decay=0.1)
    opt.step()
    ref_opt.step()
    mw.push()
    torch.testing.assert_close(master, ref_p.detach(), rtol=0, atol=0)
    torch.testing.assert_close(p.detach(), master.detach().bfloat16(), rtol=0, atol=0)
    mw.release()
    assert p.dtype == torch.float32 and torch.equal(p.detach(), master.detach())
    (x1 @ p).sum().backward()
    assert p.grad is not None  # the hooks are gone


def test_master_grad_is_the_fp32_sum_of_the_micro_batch_grads():
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(16, 4, generator=g))
    mw = MasterWeights([p], torch.bfloat16)
    xs = [torch.randn(2, 16, generator=g).bfloat16() for _ in range(3)]
    expect = torch.zeros(16, 4)
    for x in xs:
        expect += torch.autograd.grad((x @ p).sum(), p)[0].float()
    for x in xs:
        (x @ p).sum().backward()
    torch.testing.assert_close(mw.masters[0].grad, expect, rtol=0, atol=0)


@pytest.mark.parametrize("lora_dtype, device, group, full, expect", [
    ("auto", "cpu", None, False, torch.float32), ("auto", "cuda", None, False, torch.bfloat16),
    ("auto", "cuda", object(), False, torch.float32), ("auto", "cuda", None, True, torch.float32),
    ("fp32", "cuda", None, False, torch.float32), ("bf16", "cpu", None, False, torch.bfloat16)])
def test_lora_dtype_resolution(lora_dtype, device, group, full, expect):
    cfg = TrainConfig(model="m", data="d", output="o", lora_dtype=lora_dtype, full=full)
    assert _lora_dtype(cfg, torch.device(device), group) == expect


def test_explicit_bf16_under_fsdp_is_refused():
    cfg = TrainConfig(model="m", data="d", output="o", lora_dtype="bf16")
    with pytest.raises(DevstralError, match="under FSDP2 the LoRA weights stay fp32"):
        _lora_dtype(cfg, torch.device("cuda"), object())


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _losses(folder: Path) -> list[float]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


class _Crash(BaseException):
    pass


_ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("device, lora_dtype", [("cpu", "bf16"), pytest.param("cuda", "auto", marks=_ON_GPU)])
def test_bf16_lora_resumes_exactly_and_saves_the_fp32_masters(tiny_hf, tmp_path, monkeypatch, device, lora_dtype):
    import devstral.train.checkpoint as checkpoint

    rows = [{"prompt": f"Question number {i}?", "completion": f"Answer {i}: " + "ok " * (i + 1)} for i in range(6)]
    data = _jsonl(tmp_path / "train.jsonl", rows)
    common = ["finetune", "--model", str(tiny_hf), "--data", str(data), "--max-steps", "4", "--lr", "5e-3",
              "--batch-size", "2", "--grad-accum", "2", "--save-every", "2", "--no-progress", "--seed", "3",
              "--lora-dtype", lora_dtype, "--device", device]
    straight = tmp_path / "straight"
    assert main([*common, "--output", str(straight)]) == 0

    original = checkpoint.save_checkpoint

    def save_then_crash(out, state):
        original(out, state)
        raise _Crash  # like a kill right after the checkpoint is on disk

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        main([*common, "--output", str(crashed)])
    monkeypatch.setattr(checkpoint, "save_checkpoint", original)
    saved = torch.load(crashed / "checkpoint" / "state.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in saved["lora"].values())
    assert len(_losses(crashed)) == 2
    assert main([*common, "--output", str(crashed), "--resume"]) == 0
    assert _losses(crashed) == _losses(straight) and len(_losses(straight)) == 4

    adapter = load_file(straight / "adapter_model.safetensors")
    assert adapter and all(v.dtype == torch.float32 for v in adapter.values())
    # the masters themselves, not bf16-rounded copies: the updates left values bf16 cannot hold
    assert any(not torch.equal(v, v.bfloat16().float()) for k, v in adapter.items() if "lora_B" in k)


def test_bf16_lora_adapter_loads_in_peft(tiny_hf, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    data = _jsonl(tmp_path / "train.jsonl", [{"prompt": "Hi?", "completion": "Hello there."}])
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(tiny_hf), "--data", str(data), "--output", str(out), "--max-steps", "2",
                 "--lr", "1e-2", "--no-progress", "--lora-dtype", "bf16"]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf, torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, out)
    ours = load_file(out / "adapter_model.safetensors")
    theirs = peft.get_peft_model_state_dict(model)
    assert set(theirs) == set(ours)
    for k, v in ours.items():
        assert torch.equal(theirs[k], v), k


@pytest.mark.parametrize("flags, words", [(["--lora-dtype", "fp16"], "--lora-dtype must be one of"),
                                          (["--lora-dtype", "bf16", "--full"], "--lora-dtype bf16 is for LoRA")])
def test_bad_lora_dtype_is_refused(tiny_hf, tmp_path, capsys, flags, words):
    data = _jsonl(tmp_path / "train.jsonl", [{"prompt": "Hi?", "completion": "Hello."}])
    assert main(["finetune", "--model", str(tiny_hf), "--data", str(data), "--output", str(tmp_path / "o"),
                 *flags]) == 2
    assert words in capsys.readouterr().err
