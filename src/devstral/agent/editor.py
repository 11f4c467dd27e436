"""`str_replace_editor`: view, create, str_replace, insert and undo_edit, confined to the workspace.

Writes outside the workspace are refused here whatever the mode (defence in depth: the permission
policy checks first). Whether a read outside is allowed is the policy's decision, not the editor's.
Files are read and written through directory descriptors (safe_fs.py), so a symlink swapped in after
the check cannot redirect a write. File system errors (a name too long, a file where a folder should
be, no permission) are the model's observation, never a crash.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstral.agent import safe_fs
from devstral.agent.exceptions import ToolError
from devstral.agent.truncation import EDITOR_OUTPUT_LIMIT, truncate_middle
from devstral.agent.workspace import Workspace

MAX_FILE_BYTES = 10 * 1024 * 1024
SNIPPET_CONTEXT_LINES = 4
COMMANDS = ("view", "create", "str_replace", "insert", "undo_edit")


@dataclass
class _Edit:
    previous: str | None  # None: the edit created the file
    written: str


# The leading bytes of the image formats a vision model takes (prompt/images.py's FORMATS).
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
                (b"BM", "BMP"))


def image_kind(data: bytes) -> str | None:
    """"PNG", "JPEG", "GIF", "WEBP", "BMP" from a file's first bytes, else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for magic, kind in _IMAGE_MAGIC if data.startswith(magic)), None)


class FileEditor:
    """`sees_images`: the model takes images, so `view` of an image file shows it (the agent puts it in
    the next message, from `take_images()`); otherwise viewing one is an error saying why."""

    def __init__(self, workspace: Workspace, *, sees_images: bool = False):
        self.workspace = workspace
        self.sees_images = sees_images
        self._history: dict[Path, list[_Edit]] = {}
        self._images: list[tuple[Path, dict[str, Any]]] = []

    def take_images(self) -> list[tuple[Path, dict[str, Any]]]:
        """The images viewed since the last call, as (path, OpenAI image_url content part)."""
        images, self._images = self._images, []
        return images

    def __call__(self, args: dict[str, Any]) -> str:
        command = args["command"]
        path = self.checked_path(args["path"])
        if command != "view" and not self.workspace.contains(path):
            raise ToolError(f"{args['path']} is outside the workspace {self.workspace.root}; "
                            "files can only be changed inside it.")
        handler = getattr(self, f"_{command}")
        try:
            return truncate_middle(handler(path, args), EDITOR_OUTPUT_LIMIT)
        except OSError as e:
            raise ToolError(_os_error(path, e)) from None

    def checked_path(self, raw: str) -> Path:
        if not raw or not raw.startswith("/"):
            guess = self.workspace.root / (raw or "")
            raise ToolError(f"path must be absolute (start with /); did you mean {guess}?")
        if "\0" in raw:
            raise ToolError("the path contains a NUL character, which no file name can hold.")
        try:
            return self.workspace.resolve(raw)
        except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
            raise ToolError(f"{raw} cannot be resolved: {e}") from None

    def _where(self, path: Path) -> tuple[Path, Path]:
        """(the folder to walk from, the path below it): the workspace for its files, / for reads outside."""
        root = self.workspace.root if self.workspace.contains(path) else Path("/")
        return root, path.relative_to(root)

    # -- commands -----------------------------------------------------------------------------
    def _view(self, path: Path, args: dict[str, Any]) -> str:
        if self._is_dir(path):
            if args.get("view_range") is not None:
                raise ToolError("view_range applies to files, not to directories.")
            return self._list_directory(path)
        data = self._read_bytes(path)
        kind = image_kind(data[:16])
        if kind is not None:
            return self._view_image(path, data, kind, args)
        text = self._decode(path, data)
        lines = text.split("\n")
        first, last = 1, len(lines)
        view_range = args.get("view_range")
        if view_range is not None:
            first, last = _check_range(view_range, len(lines))
        return f"Lines {first}-{last} of {path} (cat -n):\n" + _numbered(lines[first - 1:last], first)

    def _view_image(self, path: Path, data: bytes, kind: str, args: dict[str, Any]) -> str:
        from devstral.errors import DevstralError
        from devstral.prompt.images import decode_image, image_part

        if not self.sees_images:
            raise ToolError(f"{path} is a {kind} image, and this model cannot see images (it has no vision "
                            "encoder); use execute_bash (file, identify) to learn about it.")
        if args.get("view_range") is not None:
            raise ToolError(f"{path} is a {kind} image; view_range applies to text files.")
        try:
            image = decode_image(data, str(path))  # the size, pixel and format checks of any prompt image
        except DevstralError as e:
            raise ToolError(str(e)) from None
        self._images.append((path, image_part(image)))
        width, height = image.size
        return f"{path} is a {kind} image of {width}x{height} pixels; it is shown to you in the next message."

    def _create(self, path: Path, args: dict[str, Any]) -> str:
        if args.get("file_text") is None:
            raise ToolError("create needs file_text, the content of the new file.")
        if safe_fs.lstat(*self._where(path)) is not None:
            raise ToolError(f"{path} already exists; create only makes new files. "
                            "Use str_replace or insert to change it (view it first).")
        self._write(path, args["file_text"], previous=None)
        return f"Created {path} ({len(args['file_text'].splitlines())} lines)."

    def _str_replace(self, path: Path, args: dict[str, Any]) -> str:
        old, new = args.get("old_str"), args.get("new_str") or ""
        if not old:
            raise ToolError("str_replace needs old_str, the exact text to replace.")
        text = self._read(path)
        count = text.count(old)
        if count == 0:
            raise ToolError(f"old_str was not found in {path}. It must match the file exactly, whitespace "
                            "and indentation included: view the lines and copy them.")
        if count > 1:
            starts = _occurrence_lines(text, old)
            raise ToolError(f"old_str occurs {count} times in {path} (lines {', '.join(map(str, starts))}); "
                            "add surrounding lines to old_str so that it matches exactly one place.")
        at = text.index(old)
        updated = text[:at] + new + text[at + len(old):]
        self._write(path, updated, previous=text)
        first_line = text[:at].count("\n") + 1
        return self._edited(path, updated, first_line, first_line + new.count("\n"))

    def _insert(self, path: Path, args: dict[str, Any]) -> str:
        line, new = args.get("insert_line"), args.get("new_str")
        if new is None:
            raise ToolError("insert needs new_str, the text to insert.")
        text = self._read(path)
        lines = text.split("\n")
        if not isinstance(line, int) or isinstance(line, bool) or not 0 <= line <= len(lines):
            raise ToolError(f"insert_line must be an integer from 0 to {len(lines)} (the file has "
                            f"{len(lines)} lines), got {line!r}.")
        new_lines = new.split("\n")
        updated = "\n".join(lines[:line] + new_lines + lines[line:])
        self._write(path, updated, previous=text)
        return self._edited(path, updated, line + 1, line + len(new_lines))

    def _undo_edit(self, path: Path, args: dict[str, Any]) -> str:
        history = self._history.get(path)
        if not history:
            raise ToolError(f"there is no edit of {path} to undo.")
        edit = history[-1]
        try:
            current = self._read(path)
        except ToolError:
            current = None
        if current != edit.written:
            raise ToolError(f"{path} changed after the last edit (a command changed, moved or removed it), so "
                            "undo_edit would lose that change. View the file and edit it instead.")
        history.pop()
        if edit.previous is None:
            safe_fs.remove_file(*self._where(path))
            return f"Undid the creation of {path}; the file is removed."
        safe_fs.write_file(*self._where(path), edit.previous.encode("utf-8"))
        lines = edit.previous.split("\n")
        return f"Undid the last edit of {path}. Now (cat -n):\n" + _numbered(lines, 1)

    # -- helpers ------------------------------------------------------------------------------
    def _is_dir(self, path: Path) -> bool:
        info = safe_fs.lstat(*self._where(path))
        return info is not None and stat.S_ISDIR(info.st_mode)

    def _read(self, path: Path) -> str:
        return self._decode(path, self._read_bytes(path))

    def _read_bytes(self, path: Path) -> bytes:
        try:
            data = safe_fs.read_file(*self._where(path), MAX_FILE_BYTES)
        except FileNotFoundError:
            raise ToolError(f"{path} does not exist. Use create to make it, or view the directory.") from None
        except IsADirectoryError:
            raise ToolError(f"{path} is a directory; view lists it, the other commands need a file.") from None
        except ValueError as e:
            raise ToolError(f"{path} is {e.args[0] / 1e6:.1f} MB, over the editor's 10 MB limit; "
                            "use execute_bash (head, grep, sed -n) to look at parts of it.") from None
        except OSError as e:
            if e.errno is None:  # safe_fs: not a regular file
                raise ToolError(f"{path} is not a regular file.") from None
            raise
        return data

    def _decode(self, path: Path, data: bytes) -> str:
        if b"\0" in data[:8192]:
            raise ToolError(f"{path} is a binary file; the editor works on text files only.")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ToolError(f"{path} is not UTF-8 text; the editor works on text files only.") from None

    def _write(self, path: Path, text: str, previous: str | None) -> None:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ToolError(f"the new text is not valid Unicode ({e.reason} at character {e.start}); "
                            "nothing was written.") from None
        if len(data) > MAX_FILE_BYTES:
            raise ToolError("the result would be over the editor's 10 MB limit.")
        safe_fs.write_file(*self._where(path), data)
        self._history.setdefault(path, []).append(_Edit(previous, text))

    def _edited(self, path: Path, text: str, first: int, last: int) -> str:
        lines = text.split("\n")
        start = max(1, first - SNIPPET_CONTEXT_LINES)
        end = min(len(lines), last + SNIPPET_CONTEXT_LINES)
        return (f"Edited {path}. Lines {start}-{end} now read (cat -n):\n"
                + _numbered(lines[start - 1:end], start)
                + "\nCheck that this is what you meant; undo_edit reverts it.")

    def _list_directory(self, root: Path) -> str:
        entries = []
        for dirpath, dirnames, filenames in os.walk(root):
            depth = len(Path(dirpath).relative_to(root).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if depth >= 2:
                dirnames[:] = []
            for name in dirnames:
                entries.append(str(Path(dirpath, name)) + "/")
            entries.extend(str(Path(dirpath, f)) for f in sorted(filenames) if not f.startswith("."))
        return f"Files and directories in {root}, two levels deep, hidden ones left out:\n" + "\n".join(sorted(entries))


def _os_error(path: Path, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return (f"the path {path} now goes through a symlink (something changed it after it was checked); "
                "nothing was changed.")
    if e.errno == errno.ENOTDIR:
        return f"a part of the path {path} is a file, not a directory; nothing was changed."
    if e.errno == errno.ENAMETOOLONG:
        return f"a name in {str(path)[:200]} is too long for the file system; nothing was changed."
    return f"{path}: {e.strerror or e}; nothing was changed."


def _numbered(lines: list[str], first: int) -> str:
    return "\n".join(f"{n:6}\t{line}" for n, line in enumerate(lines, start=first))


def _check_range(view_range: Any, n_lines: int) -> tuple[int, int]:
    if (not isinstance(view_range, list) or len(view_range) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in view_range)):
        raise ToolError(f"view_range must be two integers [first, last], got {view_range!r}.")
    first, last = view_range
    if not 1 <= first <= n_lines:
        raise ToolError(f"view_range starts at {first}, but the file has lines 1 to {n_lines}.")
    if last == -1 or last > n_lines:
        last = n_lines
    if last < first:
        raise ToolError(f"view_range ends at {last}, before its start {first}.")
    return first, last


def _occurrence_lines(text: str, needle: str) -> list[int]:
    lines, at = [], text.find(needle)
    while at >= 0:
        lines.append(text[:at].count("\n") + 1)
        at = text.find(needle, at + 1)
    return lines
