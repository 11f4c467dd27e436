"""Shared fixtures: small real-format checkpoints, made once per test session."""

from __future__ import annotations

import pytest
import torch

from devstral.testing import make_tiny_checkpoint


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU tests run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """Devstral Small 1.x architecture (mistral), HF layout, tekken v13 tokenizer."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_hf"), layout="hf", arch="mistral")


@pytest.fixture(scope="session")
def tiny_ministral3(tmp_path_factory):
    """Devstral Small 2 architecture (YaRN + llama-4 query scaling), HF layout."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_m3"), layout="hf", arch="ministral3", seed=1)


@pytest.fixture(scope="session")
def tiny_mistral_layout(tmp_path_factory):
    """Same weights as tiny_hf, in Mistral's native consolidated layout."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_mistral"), layout="mistral", arch="mistral")


def pytest_collection_finish(session):
    # the slowest interpreter suites start now, in the background (tests/interpreter_runs.py); not in an
    # xdist worker, which collects every test but runs only the files sent to it (`--dist loadfile`): there
    # each suite starts when its tests first ask, on the one worker that runs its file
    if hasattr(session.config, "workerinput"):
        return
    import interpreter_runs

    for module in {item.module for item in session.items if getattr(item, "module", None) is not None}:
        if getattr(module, "INTERPRETER_EARLY", False):
            interpreter_runs.start(module.__file__)


def pytest_sessionfinish(session, exitstatus):
    import interpreter_runs

    interpreter_runs.stop_all()
