"""The editor against a workspace that changes under it: symlinks swapped in between the check and the
write (deterministically, and by a concurrent swapper), and file system errors that must come back as
observations."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from devstral.agent import Workspace
from devstral.agent.atomic import write_text_atomic
from devstral.agent.editor import FileEditor
from devstral.agent.exceptions import ToolError


@pytest.fixture
def dirs(tmp_path: Path):
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (outside / "victim.txt").write_text("victim\n")
    return ws, outside


def swap_after_check(monkeypatch, swap):
    """Run `swap` right after the editor has resolved and judged its path: the race, made certain."""
    real = Workspace.resolve
    pending = [True]

    def resolve_then_swap(self, path, cwd=None):
        resolved = real(self, path, cwd)
        if pending[0]:
            pending[0] = False
            swap()
        return resolved

    monkeypatch.setattr(Workspace, "resolve", resolve_then_swap)


def folder_becomes_link(ws: Path, outside: Path):
    def swap():
        (ws / "d").rename(ws / "d.real")
        (ws / "d").symlink_to(outside, target_is_directory=True)
    return swap


def file_becomes_link(ws: Path, outside: Path):
    def swap():
        (ws / "f.txt").rename(ws / "f.real")
        (ws / "f.txt").symlink_to(outside / "victim.txt")
    return swap


def test_the_race_is_real_for_a_path_based_write(dirs, monkeypatch):
    """Control: writing by path after the same swap lands outside. The editor must not."""
    ws, outside = dirs
    (ws / "d").mkdir()
    folder_becomes_link(ws, outside)()
    write_text_atomic(ws / "d" / "new.txt", "escaped")
    assert (outside / "new.txt").read_text() == "escaped"


@pytest.mark.parametrize("args,setup,make_swap", [
    ({"command": "create", "path": "d/new.txt", "file_text": "pwned"}, "dir", folder_becomes_link),
    ({"command": "create", "path": "d/sub/new.txt", "file_text": "pwned"}, "dir", folder_becomes_link),
    ({"command": "str_replace", "path": "d/g.txt", "old_str": "mine", "new_str": "pwned"}, "dir", folder_becomes_link),
    ({"command": "insert", "path": "d/g.txt", "insert_line": 0, "new_str": "pwned"}, "dir", folder_becomes_link),
    ({"command": "str_replace", "path": "f.txt", "old_str": "mine", "new_str": "pwned"}, "file", file_becomes_link),
    ({"command": "insert", "path": "f.txt", "insert_line": 1, "new_str": "pwned"}, "file", file_becomes_link),
])
def test_a_symlink_swapped_in_after_the_check_is_not_followed(dirs, monkeypatch, args, setup, make_swap):
    ws, outside = dirs
    if setup == "dir":
        (ws / "d").mkdir()
        (ws / "d" / "g.txt").write_text("mine\n")
    else:
        (ws / "f.txt").write_text("mine\n")
    editor = FileEditor(Workspace.open(ws))
    swap_after_check(monkeypatch, make_swap(ws, outside))
    with pytest.raises(ToolError, match="symlink|nothing was changed"):
        editor(dict(args, path=str(ws / args["path"])))
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert (outside / "victim.txt").read_text() == "victim\n"


def test_create_replaces_a_link_that_appears_at_the_target(dirs, monkeypatch):
    ws, outside = dirs
    editor = FileEditor(Workspace.open(ws))

    def swap():
        (ws / "new.txt").symlink_to(outside / "victim.txt")

    swap_after_check(monkeypatch, swap)
    with pytest.raises(ToolError, match="already exists"):  # the link is seen, not followed
        editor({"command": "create", "path": str(ws / "new.txt"), "file_text": "pwned"})
    assert (outside / "victim.txt").read_text() == "victim\n"


def test_a_concurrent_swapper_never_gets_a_write_outside(dirs):
    ws, outside = dirs
    (ws / "d").mkdir()
    loop = (f"cd {ws}; while :; do mv d d.real 2>/dev/null; ln -s {outside} d 2>/dev/null; "
            "rm -f d; mv d.real d 2>/dev/null; done")
    swapper = subprocess.Popen(["bash", "-c", loop], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    editor = FileEditor(Workspace.open(ws))
    outcomes = {"written": 0, "refused": 0}
    try:
        for i in range(300):
            try:
                editor({"command": "create", "path": str(ws / "d" / f"f{i}.txt"), "file_text": "x"})
                outcomes["written"] += 1
            except ToolError:
                outcomes["refused"] += 1
    finally:
        swapper.kill()
        swapper.wait()
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"], outcomes
    assert outcomes["written"] + outcomes["refused"] == 300


@pytest.fixture
def editor(tmp_path: Path) -> FileEditor:
    return FileEditor(Workspace.open(tmp_path))


@pytest.mark.parametrize("path,message", [
    ("file.txt/new.py", "is a file, not a directory"),
    ("a" * 300, "too long"),
    ("deep/" + "b" * 300 + "/c.txt", "too long"),
])
def test_file_system_errors_are_tool_errors(editor: FileEditor, tmp_path: Path, path: str, message: str):
    (tmp_path / "file.txt").write_text("text\n")
    with pytest.raises(ToolError, match=message):
        editor({"command": "create", "path": str(tmp_path / path), "file_text": "x"})


def test_a_fifo_is_refused_without_waiting_for_a_writer(editor: FileEditor, tmp_path: Path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ToolError, match="not a regular file"):
        editor({"command": "view", "path": str(tmp_path / "pipe")})


@pytest.mark.parametrize("outside_change", ["modified", "removed", "became a directory"])
def test_undo_after_an_outside_change_is_refused(editor: FileEditor, tmp_path: Path, outside_change: str):
    f = tmp_path / "a.txt"
    editor({"command": "create", "path": str(f), "file_text": "one\n"})
    editor({"command": "str_replace", "path": str(f), "old_str": "one", "new_str": "two"})
    if outside_change == "modified":
        f.write_text("two\nthree, by a command\n")
    elif outside_change == "removed":
        f.unlink()
    else:
        f.unlink()
        f.mkdir()
    with pytest.raises(ToolError, match="changed after the last edit"):
        editor({"command": "undo_edit", "path": str(f)})
    if outside_change == "modified":
        assert f.read_text() == "two\nthree, by a command\n"  # the command's change is kept
        f.write_text("two\n")  # put back what the editor wrote: undo works again
        editor({"command": "undo_edit", "path": str(f)})
        assert f.read_text() == "one\n"


def test_permissions_survive_an_edit(editor: FileEditor, tmp_path: Path):
    f = tmp_path / "run.sh"
    f.write_text("echo one\n")
    f.chmod(0o750)
    editor({"command": "str_replace", "path": str(f), "old_str": "one", "new_str": "two"})
    assert f.stat().st_mode & 0o777 == 0o750 and f.read_text() == "echo two\n"
    umask = os.umask(0o022)
    os.umask(umask)
    editor({"command": "create", "path": str(tmp_path / "new.txt"), "file_text": "x"})
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
