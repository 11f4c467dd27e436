"""Temporary files of atomic writes: named so that they are recognisably ours, and swept when stale.

Every large file devstral writes (a quantized GGUF, a training checkpoint, an adapter, merged
weights) is written as `.NAME.devstral-PID.tmp` beside its target and renamed over it at the end. A
run killed mid-write (kill -9, out of memory, power loss) leaves that file behind: gigabytes for a real
model. The next run of the same command sweeps the folder with `remove_stale`, which deletes only our
temporaries whose writer is gone, so a concurrent run's file in progress is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

_OURS = re.compile(r"^\.(?P<target>.+)\.devstral-(?P<pid>\d+)\.tmp$")


def temp_path(target: str | os.PathLike) -> Path:
    """Where to write `target` before renaming it into place (same folder, so the rename is atomic)."""
    target = Path(target)
    return target.with_name(f".{target.name}.devstral-{os.getpid()}.tmp")


def _writer_alive(pid: int, path: Path) -> bool:
    """Whether the process that wrote `path` still runs: a live pid that started before the file was
    last written (a pid reused by a newer, unrelated process does not count)."""
    if pid == os.getpid():
        return True
    import psutil

    try:
        started = psutil.Process(pid).create_time()
        return started <= path.lstat().st_mtime + 1.0
    except (psutil.Error, OSError):
        return False


def remove_stale(folder: str | os.PathLike, *, quiet: bool = False) -> list[Path]:
    """Delete our temporaries in `folder` (files or folders) whose writing process is gone."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        m = _OURS.match(path.name)
        if m is None or _writer_alive(int(m["pid"]), path):
            continue
        size = _size(path)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
        if not quiet:
            print(f"note: removed {path} ({size / 1e6:.1f} MB), left by an interrupted run", file=sys.stderr)
    return removed


def _size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())
        return path.lstat().st_size
    except OSError:
        return 0
