"""The command supervisor: the one process that starts, signals and kills the agent's bash commands.

It runs apart from the agent, inside the bubblewrap sandbox when there is one (where it is the first
process of the sandbox's PID namespace after bwrap's own init: when it exits, the kernel kills
everything left in the namespace). The agent talks to it over a Unix socket; a command's output goes
straight to a pipe the agent made and passed over that socket, so output never crosses the supervisor.

This file uses the standard library only and is run as a script, `python -I -S supervisor.py FD`
(in the sandbox, bwrap places a copy of it in /run/devstral): neither devstral nor site-packages need
to be visible there. The agent imports the framing functions from it.

Messages are JSON objects; each is one marker byte (carrying the passed file descriptors, if any, as
SCM_RIGHTS), a 4-byte big-endian length, and the JSON text.

agent -> supervisor:
  {"op": "init", "env": {...}, "cwd": "/ws", "tag": "..."}   answered by {"op": "ready", "home": ...}
  {"op": "run", "id": 7, "command": "..."} + [pipe write end]  answered later by "exited"
  {"op": "signal", "sig": 2}                                 to the running command's process group
  {"op": "kill"}                                             TERM, a grace period, KILL, to that group
  {"op": "close"}                                            kill everything, answer "closed", exit
supervisor -> agent:
  {"op": "exited", "id": 7, "code": 0, "cwd": "/ws/sub", "env": {...}}
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

TAG_VARIABLE = "DEVSTRAL_AGENT_SESSION"
KILL_GRACE_S = 0.5
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Exported values sent back for secret masking; a secret is never this long.
MAX_ENV_VALUE_CHARS = 4096
_HEADER = struct.Struct(">I")


# -- framing (shared with the agent) ---------------------------------------------------------------
def send_message(sock: socket.socket, message: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
    body = json.dumps(message).encode("ascii")  # ASCII: lone surrogates travel as \udXXX escapes
    if fds:
        socket.send_fds(sock, [b"F"], list(fds))
    else:
        sock.sendall(b"M")
    sock.sendall(_HEADER.pack(len(body)) + body)


def recv_message(sock: socket.socket) -> tuple[dict, list[int]] | None:
    """The next message and the descriptors that came with it; None when the other side has gone."""
    marker, fds, _flags, _addr = socket.recv_fds(sock, 1, 4)
    if not marker:
        return None
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"supervisor message of {size} bytes")
    body = _recv_exactly(sock, size)
    if body is None:
        return None
    return json.loads(body), fds


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        data = sock.recv(min(left, 1 << 20))
        if not data:
            return None
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


# -- processes ------------------------------------------------------------------------------------
def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _processes() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()] if os.path.isdir("/proc") else []


def _parents_and_groups() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every visible process."""
    found = {}
    for pid in _processes():
        with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name, in parentheses, may hold spaces
            found[pid] = (int(fields[1]), int(fields[2]))
    return found


def _tree_and_group(leader: int) -> list[int]:
    """The processes of `leader`'s group and all its descendants: `timeout`, `make` and others put
    their children in groups of their own, which a signal to the group alone would miss."""
    table = _parents_and_groups()
    members = {pid for pid, (_, pgid) in table.items() if pgid == leader}
    members.add(leader)
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in members} - members
        members |= children
        grew = bool(children)
    return sorted(members)


def _tagged(tag: str) -> list[int]:
    """Processes whose environment carries our tag: found even after they left their group."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    me, found = os.getpid(), []
    for pid in _processes():
        if pid == me:
            continue
        with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as f:
            if needle in f.read().split(b"\0"):
                found.append(pid)
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_group(pgid: int) -> None:
    """SIGTERM to the group and its descendants, a grace period, then SIGKILL to all of them."""
    members = _tree_and_group(pgid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    _signal_all(members, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_S
    while any(_alive(p) for p in members) and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    _signal_all(members + _tree_and_group(pgid), signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _export_lines(env: dict) -> str:
    valid = (k for k in env if k.isidentifier() and not k.startswith("BASH_FUNC_"))
    return "".join(f"export {k}={shlex.quote(env[k])}\n" for k in sorted(valid))


class Supervisor:
    def __init__(self, ctl: socket.socket):
        self.ctl = ctl
        self.state = tempfile.mkdtemp(prefix="devstral-agent-")
        self.home = os.path.join(self.state, "home")
        os.mkdir(self.home)
        self.env_file = os.path.join(self.state, "env.sh")
        self.cwd_file = os.path.join(self.state, "cwd")
        self.script = os.path.join(self.state, "command.sh")
        self.base_env: dict = {}
        self.cwd = "/"
        self.tag = ""
        self.proc: subprocess.Popen | None = None
        self.pidfd: int | None = None
        self.groups: set[int] = set()
        self.run_id = 0

    def serve(self) -> None:
        try:
            while True:
                watched = [self.ctl] + ([self.pidfd] if self.pidfd is not None else [])
                # Without pidfds (old kernels) a running command is polled.
                timeout = 0.02 if self.proc is not None and self.pidfd is None else None
                readable, _, _ = select.select(watched, [], [], timeout)
                if self.proc is not None and self.proc.poll() is not None:
                    self._report_exit()
                if self.ctl in readable:
                    received = recv_message(self.ctl)
                    if received is None:
                        return  # the agent is gone: clean up and leave
                    message, fds = received
                    if message.get("op") == "close":
                        self._cleanup()
                        send_message(self.ctl, {"op": "closed"})
                        return
                    self._handle(message, fds)
        finally:
            self._cleanup()

    def _handle(self, message: dict, fds: list[int]) -> None:
        op = message.get("op")
        if op == "init":
            self.base_env = dict(message["env"])
            self.base_env.setdefault("HOME", self.home)
            self.base_env[TAG_VARIABLE] = self.tag = message["tag"]
            self.cwd = message["cwd"]
            self._write_env()
            send_message(self.ctl, {"op": "ready", "home": self.base_env["HOME"]})
        elif op == "run":
            self.run_id = message["id"]
            self._run(message["command"], fds[0])
        elif op == "signal" and self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, int(message["sig"]))
        elif op == "kill" and self.proc is not None:
            kill_group(self.proc.pid)
        for fd in fds[1:] if op == "run" else fds:
            os.close(fd)

    def _write_env(self) -> None:
        with open(self.env_file, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(_export_lines(self.base_env))

    def _run(self, command: str, out_fd: int) -> None:
        self._prune_groups()
        # A command may have emptied /tmp: the session's files come back, the exports reset.
        os.makedirs(self.home, exist_ok=True)
        if not os.path.exists(self.env_file):
            self._write_env()
        with open(self.script, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(command + "\n")
        q = shlex.quote
        runner = (
            f"source {q(self.env_file)} >/dev/null 2>&1\n"
            f"export {TAG_VARIABLE}={self.tag}\n"
            f"trap 'export -p > {q(self.env_file)}; pwd > {q(self.cwd_file)}' EXIT\n"
            f"cd {q(self.cwd)} 2>/dev/null || cd /\n"
            f"source {q(self.script)}\n"
        )
        try:
            self.proc = subprocess.Popen(
                ["bash", "--noprofile", "--norc", "-c", runner], stdin=subprocess.DEVNULL, stdout=out_fd,
                stderr=out_fd, start_new_session=True,
                env={"PATH": self.base_env.get("PATH", "/usr/bin:/bin"), TAG_VARIABLE: self.tag})
        except OSError as e:
            os.write(out_fd, f"could not start bash: {e}\n".encode())
            os.close(out_fd)
            send_message(self.ctl, {"op": "exited", "id": self.run_id, "code": 127, "cwd": self.cwd, "env": {}})
            return
        os.close(out_fd)
        self.groups.add(self.proc.pid)
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None

    def _report_exit(self) -> None:
        assert self.proc is not None
        code = self.proc.returncode
        code = code if code >= 0 else 128 - code  # killed by signal N: 128+N, as a shell says
        self.proc = None
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        with contextlib.suppress(OSError, UnicodeDecodeError), open(self.cwd_file, encoding="utf-8") as f:
            self.cwd = f.read().strip() or self.cwd
        send_message(self.ctl, {"op": "exited", "id": self.run_id, "code": code, "cwd": self.cwd,
                                "env": self._exported()})

    def _exported(self) -> dict:
        try:
            out = subprocess.run(["bash", "--noprofile", "--norc", "-c",
                                  f"source {shlex.quote(self.env_file)} >/dev/null 2>&1; env -0"],
                                 capture_output=True, env={"PATH": self.base_env.get("PATH", "/usr/bin:/bin")},
                                 timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return {}
        pairs = (item.split(b"=", 1) for item in out.split(b"\0") if b"=" in item)
        return {k.decode(errors="replace"): v.decode(errors="replace")[:MAX_ENV_VALUE_CHARS] for k, v in pairs}

    def _prune_groups(self) -> None:
        self.groups = {g for g in self.groups if group_alive(g)}

    def _cleanup(self) -> None:
        if self.proc is not None:
            self.groups.add(self.proc.pid)
        for pgid in list(self.groups):
            if group_alive(pgid):
                kill_group(pgid)
        self.groups.clear()
        if self.tag:
            for pid in _tagged(self.tag):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
            self.proc = None
        shutil.rmtree(self.state, ignore_errors=True)


def main(argv: list[str]) -> None:
    # Terminal signals do not reach this process: the agent starts it in a session of its own. (Ignoring
    # them here instead would pass the ignoring on to every command, and C-c would stop nothing.) An agent
    # started in the background by a shell without job control (`devstral agent ... &` in a script)
    # inherits SIGINT and SIGQUIT ignored, and so would this process and every command it starts: put the
    # default back, so that C-c and C-\ reach the commands.
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    ctl = socket.socket(fileno=int(argv[1]))
    Supervisor(ctl).serve()


if __name__ == "__main__":
    main(sys.argv)
