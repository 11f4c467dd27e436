"""End-to-end fine-tuning on a tiny model (CPU): memorization, resume after kill -9, QLoRA, recipes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from devstral.cli import main

QUESTION = "What is the secret word?"
ANSWER = "The secret word is banana."


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _losses(folder: Path) -> list[float]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _run_json(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", *args, "--json", "--temperature", "0", "--repeat-penalty", "1", "--max-tokens", "12",
                     QUESTION]) == 0
    return json.loads(out.getvalue())


def test_memorizes_a_fixed_answer_and_run_adapter_reproduces_it(tiny_hf, tmp_path):
    data = _jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": QUESTION},
                                                            {"role": "assistant", "content": ANSWER}]}])
    out = tmp_path / "out"
    rc = main(["finetune", "--model", str(tiny_hf), "--data", str(data), "--output", str(out), "--max-steps", "40",
               "--lr", "2e-2", "--lora-alpha", "32", "--no-progress", "--eval-data", str(data)])
    assert rc == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    losses = _losses(out)
    assert len(losses) == 40 and losses[-1] < 0.5 * losses[0]
    assert any("eval_loss" in json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())
    tuned = _run_json("--model", str(tiny_hf), "--adapter", str(out))
    base = _run_json("--model", str(tiny_hf))
    assert tuned["text"] == ANSWER and tuned["finish_reason"] == "stop"
    assert base["text"] != ANSWER


_KILLABLE = textwrap.dedent("""
    import sys, time
    import devstral.train.checkpoint as checkpoint
    original = checkpoint.save_checkpoint
    def save_then_hang(out, state):
        path = original(out, state)
        print("CHECKPOINT", state["step"], flush=True)
        time.sleep(600)  # the test kills us here, like a crash right after a checkpoint
        return path
    checkpoint.save_checkpoint = save_then_hang
    from devstral.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_resume_after_kill_continues_the_exact_loss_curve(tiny_hf, tmp_path):
    rows = [{"prompt": f"Question number {i}?", "completion": f"Answer {i}: " + "ok " * (i + 1)} for i in range(6)]
    data = _jsonl(tmp_path / "train.jsonl", rows)
    common = ["--model", str(tiny_hf), "--data", str(data), "--max-steps", "6", "--lr", "5e-3", "--batch-size", "2",
              "--grad-accum", "2", "--lora-dropout", "0.1", "--warmup-steps", "2", "--save-every", "2",
              "--no-progress", "--seed", "7"]
    straight = tmp_path / "straight"
    assert main(["finetune", *common, "--output", str(straight)]) == 0

    crashed = tmp_path / "crashed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, "finetune", *common, "--output", str(crashed)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("CHECKPOINT 2"), line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(_losses(crashed)) == 2
    assert main(["finetune", *common, "--output", str(crashed), "--resume"]) == 0
    assert _losses(crashed) == _losses(straight)
    assert len(_losses(straight)) == 6


def test_resume_refuses_changed_settings(tiny_hf, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a b c"}] * 3)
    args = ["finetune", "--model", str(tiny_hf), "--data", str(data), "--output", str(tmp_path / "o"),
            "--max-steps", "3", "--save-every", "1", "--no-progress"]
    assert main(args) == 0
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([*args, "--resume", "--lora-r", "8"]) == 2
    assert "lora-r was 16" in err.getvalue()


def test_qlora_reduces_loss_and_merges_into_the_16bit_weights(tiny_hf, tmp_path):
    from safetensors.torch import load_file

    from devstral.formats.peft import read_adapter

    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": QUESTION, "completion": ANSWER}])
    out = tmp_path / "q"
    assert main(["finetune", "--model", str(tiny_hf), "--data", str(data), "--output", str(out), "--qlora",
                 "--max-steps", "12", "--lr", "1e-2", "--no-progress", "--merge"]) == 0
    losses = _losses(out)
    assert losses[-1] < 0.8 * losses[0]
    cfg, pairs = read_adapter(out)
    base = load_file(tiny_hf / "model.safetensors")
    merged = load_file(out / "merged" / "model.safetensors")
    name = "model.layers.0.mlp.gate_proj"
    expected = base[name + ".weight"] + pairs[name]["lora_B"] @ pairs[name]["lora_A"] * (cfg.lora_alpha / cfg.r)
    assert torch.allclose(merged[name + ".weight"].float(), expected, atol=1e-2, rtol=1e-2)
    # an NF4 round trip of the base would be far off in bf16 terms
    assert torch.allclose(merged["model.embed_tokens.weight"].float(), base["model.embed_tokens.weight"],
                          atol=1e-2, rtol=1e-2)


def test_recipe_yaml_with_flags_overriding(tiny_hf, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "some plain text to learn"}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_hf}\ndata: {data}\nlora-r: 8\nlora_alpha: 8\nmax_steps: 3\nlr: 1e-3\n"
                      "target: q,v\nprogress: false\n")
    out = tmp_path / "o"
    assert main(["finetune", "--config", str(recipe), "--output", str(out), "--lora-r", "4"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert len(_losses(out)) == 3
    recipe.write_text("lora_rank: 3\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["finetune", "--config", str(recipe)]) == 2
    assert "unknown setting 'lora_rank'" in err.getvalue()


@pytest.mark.parametrize(("flags", "message"), [
    (["--lora-r", "0"], "--lora-r must be a positive integer, got 0"),
    (["--epochs", "1", "--max-steps", "2"], "not both"),
    (["--target", "q,x"], "unknown module 'x'"),
])
def test_bad_flags_fail_before_training(tiny_hf, tmp_path, flags, message):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["finetune", "--model", str(tiny_hf), "--data", str(data), "--output", str(tmp_path / "o"),
                   "--no-progress", *flags])
    assert rc == 2 and message in err.getvalue()
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_oom_message_suggests_the_memory_savers():
    from devstral.train.config import TrainConfig
    from devstral.train.trainer import _oom_message

    msg = _oom_message(TrainConfig(model="m", data="d", output="o", max_seq_len=4096), step=0)
    assert "--qlora" in msg and "--max-seq-len (now 4096)" in msg and "--grad-checkpointing" in msg
    assert "--offload-activations" in msg


def test_gguf_export_of_the_merged_model_loads(tiny_hf, tmp_path):
    import devstral

    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": QUESTION, "completion": ANSWER}])
    out = tmp_path / "g"
    assert main(["finetune", "--model", str(tiny_hf), "--data", str(data), "--output", str(out), "--max-steps", "2",
                 "--lr", "1e-2", "--no-progress", "--gguf", "Q8_0"]) == 0
    gguf = devstral.load(out / "model-Q8_0.gguf", device="cpu")
    merged = devstral.load(out / "merged", device="cpu", dtype="fp32")
    ids = merged.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    assert gguf.config.n_layers == merged.config.n_layers
    assert torch.allclose(gguf.logits(ids), merged.logits(ids), atol=0.1)
