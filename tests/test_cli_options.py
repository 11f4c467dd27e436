"""Options every command shares: --version, --threads (physical cores by default), help without `<bool>`,
and the warning for a context longer than the model was trained on."""

from __future__ import annotations

import json
import os
from importlib.metadata import version

import psutil
import pytest
import torch

from devstral.cli import build_command, main
from devstral.testing import make_tiny_checkpoint


@pytest.fixture()
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("opts") / "m")


def _physical_cores() -> int:
    cores = psutil.cpu_count(logical=False) or os.cpu_count()
    return min(cores, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else cores


def test_version_is_the_installed_distribution(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"devstral {version('devstral')}"


def _commands(command, path=()):
    for name, sub in (getattr(command, "commands", None) or {}).items():
        yield (*path, name), sub
        yield from _commands(sub, (*path, name))


def test_no_bool_type_in_any_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    commands = [(), *(p for p, _ in _commands(build_command()))]
    assert ("run",) in commands and ("eval", "kld") in commands and ("serve",) in commands
    for path in commands:
        assert main([*path, "--help"]) == 0
        out = capsys.readouterr().out
        assert "--help" in out and "<bool>" not in out, path
    main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--raw" in out and "<int" in out  # options that take a value still show its type


@pytest.mark.parametrize("command", ["run", "chat", "quantize", "finetune"])
def test_threads_option_everywhere(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "200")
    main([command, "--help"])
    assert "--threads" in capsys.readouterr().out
    main(["eval", "kld", "--help"])
    assert "--threads" in capsys.readouterr().out


def test_run_threads_flag_and_default(ckpt, threads, capsys):
    assert main(["run", "hi", "--model", str(ckpt), "-n", "1", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(3)
    assert main(["run", "hi", "--model", str(ckpt), "-n", "1"]) == 0
    assert torch.get_num_threads() == _physical_cores()


def test_quantize_and_finetune_apply_threads(ckpt, threads, tmp_path):
    assert main(["quantize", str(ckpt), str(tmp_path / "q.gguf"), "--type", "Q8_0", "--no-progress",
                 "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {ckpt}\ndata: {data}\noutput: {tmp_path / 'o'}\nmax_steps: 1\nthreads: 2\n"
                      "progress: false\n")
    assert main(["finetune", "--config", str(recipe)]) == 0
    assert torch.get_num_threads() == 2
    assert main(["finetune", "--config", str(recipe), "--threads", "0"]) == 2


def test_ctx_size_beyond_the_trained_context_warns(ckpt, capsys):
    trained = json.loads((ckpt / "config.json").read_text())["max_position_embeddings"]
    assert main(["run", "hi", "--model", str(ckpt), "-n", "1", "--ctx-size", str(trained * 2)]) == 0
    err = capsys.readouterr().err
    assert f"--ctx-size {trained * 2} exceeds the model's trained context of {trained}" in err
    assert main(["run", "hi", "--model", str(ckpt), "-n", "1", "--ctx-size", str(trained)]) == 0
    assert "warning" not in capsys.readouterr().err
