"""File access inside the workspace that a concurrent symlink swap cannot redirect.

Checking a resolved path and then opening it by name is a race: between the two, a command (running
in the background) can replace a folder on the path with a symlink to anywhere. Here every access
walks from the workspace root one component at a time through directory file descriptors, opening
each with O_NOFOLLOW; a file is written to a temporary name in its (already opened) folder and renamed
over the target, which replaces a symlink there instead of following it. A swapped component makes
the operation fail (ELOOP, ENOTDIR); it never reaches outside.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def open_dir(root: Path, parts: tuple[str, ...], create: bool = False) -> Iterator[int]:
    """A descriptor of root/parts[0]/parts[1]/..., no symlink followed below `root`; missing folders
    are made when `create`."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def lstat(root: Path, rel: Path) -> os.stat_result | None:
    """The entry itself (a symlink is reported as one), or None when it does not exist."""
    if not rel.parts:
        return os.stat(root)
    try:
        with open_dir(root, rel.parent.parts) as dir_fd:
            return os.stat(rel.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def read_file(root: Path, rel: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file. Raises IsADirectoryError / OSError(ELOOP) for anything else, and
    ValueError when it is over `max_bytes`."""
    with open_dir(root, rel.parent.parts) as dir_fd:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(rel.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(f"{rel} is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{rel} is not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(info.st_size)
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise ValueError(size)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_file(root: Path, rel: Path, data: bytes) -> None:
    """Replace (or create) root/rel atomically: a temporary file in the same folder, then rename.
    An existing file keeps its permission bits; a new one gets 0666 minus the umask."""
    with open_dir(root, rel.parent.parts, create=True) as dir_fd:
        try:
            existing = os.stat(rel.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise IsADirectoryError(f"{rel} is a directory")
        tmp = f".devstral-{secrets.token_hex(6)}.tmp"  # short: the target's name may be at the limit
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if existing is not None and stat.S_ISREG(existing.st_mode):
                    os.fchmod(fd, stat.S_IMODE(existing.st_mode))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, rel.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise


def remove_file(root: Path, rel: Path) -> None:
    with open_dir(root, rel.parent.parts) as dir_fd:
        os.unlink(rel.name, dir_fd=dir_fd)
