"""A quantize or checkpoint write killed mid-file leaves `.NAME.devstral-PID.tmp`; the next run of the same
command removes it, and never a file a live writer is still writing or a file that is not ours."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devstral.cli import main
from devstral.testing import make_tiny_checkpoint
from devstral.tmpfiles import remove_stale, temp_path

SRC = str(Path(__file__).parents[1] / "src")
OURS = re.compile(r"^\..+\.devstral-(\d+)\.tmp$")

# Runs a devstral command and SIGKILLs itself in the middle of a write: after the quantizer has written
# two tensors, or when the checkpoint writer has written part of its file.
KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    import torch
    import devstral.quant as quant
    import devstral.train.checkpoint as ck
    from devstral.cli import main

    done = []
    real_quantize = quant.quantize
    def quantize(*a, **k):
        done.append(1)
        if len(done) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_quantize(*a, **k)
    quant.quantize = quantize  # the exporter imports it from here when it starts

    def save(state, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    ck.torch.save = save
    sys.exit(main(sys.argv[1:]))
""")


def _killed(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("stale") / "m")


def test_temp_names_are_ours_and_beside_the_target(tmp_path):
    p = temp_path(tmp_path / "model-Q4_K_M.gguf")
    assert p.parent == tmp_path and p.name == f".model-Q4_K_M.gguf.devstral-{os.getpid()}.tmp"
    assert OURS.match(p.name)


def test_killed_quantize_leaves_our_temp_and_the_next_quantize_removes_it(model, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    _killed("quantize", str(model), str(out), "--type", "Q8_0", "--no-progress")
    left = [p for p in tmp_path.iterdir() if OURS.match(p.name)]
    assert len(left) == 1 and left[0].stat().st_size > 0 and not out.exists()
    foreign = tmp_path / ".notes.tmp"  # a temp file that is not ours stays
    foreign.write_text("keep me")

    assert main(["quantize", str(model), str(out), "--type", "Q8_0", "--no-progress"]) == 0
    assert not left[0].exists() and foreign.exists()
    assert f"removed {left[0]}" in capsys.readouterr().err
    from gguf import GGUFReader  # the new output is whole

    assert len(GGUFReader(out).tensors) > 0
    assert not [p for p in tmp_path.iterdir() if OURS.match(p.name)]


def test_killed_checkpoint_write_is_removed_when_finetune_starts_again(model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    args = ["finetune", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "3",
            "--save-every", "1", "--no-progress"]
    _killed(*args)
    left = [p for p in (out / "checkpoint").iterdir() if OURS.match(p.name)]
    assert [p.name.split(".devstral-")[0] for p in left] == [".state.pt"]
    assert main(args) == 0
    assert not [p for p in (out / "checkpoint").iterdir() if OURS.match(p.name)]
    assert (out / "adapter_model.safetensors").is_file()


def test_a_live_writers_temp_is_kept(tmp_path):
    # A process started before the temp file was written, and still running, may be writing it.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".a.gguf.devstral-{sleeper.pid}.tmp"
        live.write_bytes(b"in progress")
        mine = temp_path(tmp_path / "b.gguf")
        mine.write_bytes(b"mine, in progress")
        assert remove_stale(tmp_path, quiet=True) == []
        assert live.exists() and mine.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale(tmp_path, quiet=True) == [live]


def test_a_reused_pid_does_not_keep_a_stale_temp(tmp_path):
    # The pid in the name now belongs to a process that started after the file was last written.
    stale = tmp_path / f".x.gguf.devstral-{os.getppid()}.tmp"
    stale.write_bytes(b"old")
    os.utime(stale, (1, 1))  # written in 1970: long before any running process started
    dead_dir = tmp_path / ".merged.devstral-999999999.tmp"
    (dead_dir / "sub").mkdir(parents=True)
    (dead_dir / "sub" / "model.safetensors").write_bytes(b"x")
    assert sorted(remove_stale(tmp_path, quiet=True)) == sorted([stale, dead_dir])
