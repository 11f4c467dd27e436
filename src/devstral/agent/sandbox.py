"""The sandbox for the agent's commands: bubblewrap (bwrap) on Linux.

One sandbox per agent session holds the command supervisor and every command it starts, so background
processes live from one command to the next and all of them end with the agent:

- file system: `/` read-only; the workspace read-write (read-only in read-only mode); private, empty
  `/tmp`, `/var/tmp` and `/run`; home folders (`/home`, `/root`, `$HOME`) and credential files
  (`/etc/shadow`-class, SSH host keys, sudoers, TLS private keys ...) hidden; a fresh `/dev` and `/proc`.
- network: none (only a private loopback) unless allowed.
- processes: a PID namespace of their own (no process outside is visible, and when the supervisor
  ends the kernel kills whatever is left, however it detached); `--die-with-parent` ties the sandbox to
  the agent, so SIGKILL of the agent ends it too; a new session (no terminal to inject keys into);
  no capabilities; no nested user namespaces where bubblewrap can forbid them (0.8+).
- environment: only what the supervisor is told (see environment.py).
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from devstral.errors import DevstralError

# Readable by their owner on most systems; the agent's user may be that owner (root in containers).
SECRET_FILES = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers",
                "/etc/security/opasswd", "/etc/master.passwd", "/etc/ssh/ssh_host_*_key")
SECRET_DIRS = ("/etc/sudoers.d", "/etc/ssl/private", "/etc/NetworkManager/system-connections",
               "/etc/wireguard", "/etc/letsencrypt", "/etc/kubernetes/pki", "/etc/docker/certs.d")
HOME_DIRS = ("/home", "/root")
# Empty and private: a command's files there vanish with the sandbox. /run also hides the sockets of
# docker, dbus and systemd, any of which could start a process outside the sandbox (a read-only mount
# does not stop connecting to a socket).
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/run", "/var/run")


@dataclass(frozen=True)
class SandboxSpec:
    workspace: Path
    writable: bool = True
    allow_network: bool = False
    read_paths: tuple[Path, ...] = field(default_factory=tuple)  # shown read-only even where hidden


@dataclass(frozen=True)
class SandboxStatus:
    available: bool
    reason: str  # why there is none; empty when there is one
    bwrap: str | None = None
    disable_userns: bool = False


def _unavailable(reason: str) -> SandboxStatus:
    return SandboxStatus(False, reason)


@functools.lru_cache(maxsize=1)
def detect() -> SandboxStatus:
    """Whether bubblewrap is installed and can create namespaces here (tried once, then remembered)."""
    if sys.platform != "linux":
        return _unavailable("the sandbox uses bubblewrap, which exists on Linux only")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return _unavailable("bubblewrap is not installed (Debian/Ubuntu: apt install bubblewrap; "
                            "Fedora: dnf install bubblewrap)")
    error = ""
    for disable_userns in (True, False):  # --disable-userns needs bubblewrap 0.8
        argv = [bwrap, *_namespace_flags(disable_userns, allow_network=False), "--ro-bind", "/", "/",
                "--proc", "/proc", "--dev", "/dev", "--", "true"]
        try:
            probe = subprocess.run(argv, capture_output=True, timeout=30, env={})
        except (OSError, subprocess.TimeoutExpired) as e:
            return _unavailable(f"bwrap could not be run: {e}")
        if probe.returncode == 0:
            return SandboxStatus(True, "", bwrap, disable_userns)
        lines = probe.stderr.decode(errors="replace").strip().splitlines()
        error = error or (lines[-1] if lines else f"exit code {probe.returncode}")
    return _unavailable(f"bwrap cannot create a sandbox here ({error}); user namespaces may be disabled, "
                        "as in many containers")


def _namespace_flags(disable_userns: bool, allow_network: bool) -> list[str]:
    flags = ["--unshare-all", "--die-with-parent", "--new-session", "--clearenv"]
    if disable_userns:
        flags += ["--unshare-user", "--disable-userns"]
    if allow_network:
        flags.append("--share-net")
    return flags


def wrap(spec: SandboxSpec, argv: list[str], files: dict[str, int] | None = None,
         status: SandboxStatus | None = None) -> list[str]:
    """`argv` run inside the sandbox that `spec` describes; `files` maps paths inside it to descriptors
    (inherited by bwrap) whose contents become read-only files there."""
    status = status or detect()
    if not status.available or status.bwrap is None:
        raise DevstralError(f"no sandbox: {status.reason}")
    ws = str(spec.workspace)
    if ws == "/":
        raise DevstralError("the workspace cannot be / in the sandbox: it would make the whole file system "
                            "writable; give the project's folder")
    args = [status.bwrap, *_namespace_flags(status.disable_userns, spec.allow_network),
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for d in PRIVATE_DIRS:
        if os.path.isdir(d) and not os.path.islink(d):
            args += ["--tmpfs", d]
    for d in _hidden_dirs():
        # An empty tmpfs, not a read-only one: bwrap must still create mount points in it (a
        # workspace under $HOME), and what a command writes there is private and short-lived.
        args += ["--tmpfs", d]
    for f in _secret_files():
        args += ["--ro-bind", "/dev/null", f]
    if spec.allow_network:
        args += _resolver_binds()
    for p in [*spec.read_paths, *_interpreter_paths()]:
        args += ["--ro-bind-try", str(p), str(p)]
    for dest, fd in (files or {}).items():
        args += ["--ro-bind-data", str(fd), dest]
    args += ["--bind" if spec.writable else "--ro-bind", ws, ws, "--chdir", ws, "--", *argv]
    return args


def _hidden_dirs() -> list[str]:
    homes = list(HOME_DIRS)
    for home in (os.environ.get("HOME"), os.path.expanduser("~")):
        if home and os.path.isabs(home):
            real = os.path.realpath(home)
            if real != "/" and not any(real == h or real.startswith(h + "/") for h in (*homes, *PRIVATE_DIRS)):
                homes.append(real)
    return [d for d in (*homes, *SECRET_DIRS) if os.path.isdir(d) and not os.path.islink(d)]


def _secret_files() -> list[str]:
    found = []
    for pattern in SECRET_FILES:
        found += [f for f in glob.glob(pattern) if os.path.isfile(f) and not os.path.islink(f)]
    return found


def _resolver_binds() -> list[str]:
    # /etc/resolv.conf often links into /run (systemd-resolved, resolvconf), which is private here.
    target = os.path.realpath("/etc/resolv.conf")
    if target.startswith("/run/") and os.path.isfile(target):
        return ["--ro-bind", target, target]
    return []


def _interpreter_paths() -> list[Path]:
    """Where the supervisor's Python lives: visible even when that is under a hidden home (pyenv).
    Commands may use that Python too."""
    real = Path(os.path.realpath(sys.executable))
    return sorted({Path(sys.base_prefix).resolve(), real.parent})


def private_file_dir() -> str:
    """Where files placed in the sandbox go: /run (private there) when the host has one, else /tmp."""
    return "/run/devstral" if os.path.isdir("/run") and not os.path.islink("/run") else "/tmp/.devstral"


def interpreter() -> str:
    """The real interpreter behind a virtualenv's python: run with -I -S, it needs no venv."""
    return os.path.realpath(sys.executable)
