"""Interpreter suites: test modules whose kernel cases run in one subprocess under TRITON_INTERPRET=1 (the
interpreter is chosen when a kernel is decorated, so it cannot be switched on inside this process).

The biggest suites take minutes each on a 2-core CI machine. A module that sets `INTERPRETER_EARLY = True`
has its subprocess started when collection ends (conftest.pytest_collection_finish), so those suites run
beside each other and beside the rest of the tests instead of one after another; the others start when
their `results` fixture first asks. Either way the module's fixture waits here for its own run.

Under pytest-xdist (the README runs `-n 2 --dist loadfile`) nothing starts early: a worker collects every
module but runs only the files sent to it, so each suite starts on the one worker that runs its file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_runs: dict[str, tuple[subprocess.Popen, Path, Path]] = {}


def start(module_file: str) -> None:
    """Run `python module_file OUT` under the interpreter in the background (once per session)."""
    key = str(Path(module_file).resolve())
    if key in _runs:
        return
    work = Path(tempfile.mkdtemp(prefix="interp-"))
    out, log = work / "results.pt", work / "stderr.txt"
    tests_dir = os.path.dirname(key)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([tests_dir, *sys.path])}
    with open(log, "w") as err:  # a file, not a pipe: a chatty run cannot fill a pipe and stall
        proc = subprocess.Popen([sys.executable, key, str(out)], env=env, stdout=subprocess.DEVNULL, stderr=err)
    _runs[key] = (proc, out, log)


def results(module_file: str, timeout: float = 900) -> dict:
    """The module's case results: its subprocess started now if it was not, then waited for."""
    start(module_file)
    proc, out, log = _runs[str(Path(module_file).resolve())]
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{module_file}: interpreter run over {timeout} s") from None
    assert rc == 0, log.read_text()[-4000:]
    return torch.load(out, weights_only=False)


def stop_all() -> None:
    """Kill runs still going (a session that ends early, e.g. on -x) and remove every run's files."""
    for proc, out, _ in _runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(out.parent, ignore_errors=True)
