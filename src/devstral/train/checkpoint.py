"""Training checkpoints: LoRA weights, optimizer state, progress and every RNG state, written atomically.

One file, DIR/checkpoint/state.pt, replaced with os.replace so a kill -9 at any moment leaves either
the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from devstral.errors import DevstralError
from devstral.tmpfiles import temp_path

CHECKPOINT = Path("checkpoint") / "state.pt"


def checkpoint_path(output: Path) -> Path:
    return Path(output) / CHECKPOINT


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output: Path, state: dict[str, Any]) -> Path:
    path = checkpoint_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)  # ours by name: a killed run's file is swept when finetune starts again
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(output: Path) -> dict[str, Any]:
    path = checkpoint_path(output)
    if not path.is_file():
        raise DevstralError(f"--resume: no checkpoint at {path} (was --save-every set on the first run?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a foreign or damaged file
        raise DevstralError(f"{path}: cannot read checkpoint: {e}") from None
