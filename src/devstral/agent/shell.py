"""A bash session whose working directory and exported variables persist between commands.

The commands are started by the supervisor (supervisor.py), a process of its own that runs inside the
bubblewrap sandbox when there is one (sandbox.py). Each command is a fresh `bash` in its own process
group, with stdin from /dev/null; an EXIT trap saves `pwd` and `export -p` for the next command. A
separate process per command means a hung or killed command can never wedge the session, and a
timeout can kill the whole group.

The output comes back through a pipe into a head + tail buffer of fixed size (output_buffer.py); a
command that prints more than `max_output_bytes` in all is killed. If a command kills the supervisor
(`kill -9 -1` in the sandbox), a fresh session starts and the observation says so.

Note: bwrap's --die-with-parent is tied to the thread that starts it; sessions are made on the thread
that lives as long as the agent (the main thread in the CLI).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from devstral.agent import sandbox, supervisor
from devstral.agent.output_buffer import HeadTailBuffer
from devstral.agent.supervisor import recv_message, send_message
from devstral.errors import DevstralError

# Keys the model may send to a running command, as signals to its process group.
KEY_SIGNALS = {"C-c": signal.SIGINT, "C-z": signal.SIGTSTP, "C-\\": signal.SIGQUIT, "C-d": signal.SIGHUP}
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
_READ_BYTES = 1 << 20
# Output still in the pipe when a command exits is read up to this much: a background `yes` that
# keeps writing must not hold the agent.
_DRAIN_BYTES = 4 << 20
_START_TIMEOUT_S = 30.0
SUPERVISOR_NAME = "supervisor.py"
_KILL_TIMEOUT_S = 10.0


@dataclass
class CommandResult:
    output: str
    exit_code: int | None  # None: still running (soft timeout)
    cwd: Path
    killed: bool = False  # hit the hard timeout
    output_limited: bool = False  # printed more than the output limit, and was killed for it
    output_bytes: int = 0  # all the command printed so far, kept or not
    session_lost: bool = False  # the supervisor died; a new session (fresh exports) started


class BashSession:
    def __init__(self, cwd: Path, env: dict[str, str], soft_timeout_s: float = 30.0,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, sandbox_spec: sandbox.SandboxSpec | None = None):
        self.cwd = Path(cwd)
        self.base_env = dict(env)
        self.soft_timeout_s, self.max_output_bytes = soft_timeout_s, max_output_bytes
        self.sandbox_spec = sandbox_spec
        self.tag = uuid.uuid4().hex
        self.home: str | None = None
        self._exported: dict[str, str] = {}
        self._supervisor: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._out: int | None = None  # read end of the running command's output pipe
        self._buffer = HeadTailBuffer()
        self._total = 0  # bytes the running command printed in all
        self._exit: dict | None = None  # the supervisor's "exited" message for the running command
        self._lost = False  # the supervisor went away during the command
        self._killing: str | None = None  # "timeout" or "output", once a kill was sent
        self._kill_sent = 0.0
        self._deadline: float | None = None
        self._restarted = False  # the session was started afresh just before this command
        self._run_id = 0  # numbers commands, so that a late "exited" of an earlier one is never taken for this one
        self._start()

    # -- the supervisor ---------------------------------------------------------------------
    def _start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        keep = [child.fileno()]
        if self.sandbox_spec is None:
            argv = [sandbox.interpreter(), "-I", "-S", supervisor.__file__, str(child.fileno())]
        else:
            # The package may live under a hidden home: bwrap copies the file's text into the sandbox.
            source = Path(supervisor.__file__).read_bytes()
            source_fd, write_end = os.pipe()
            assert len(source) < 60_000, "the supervisor must fit in a pipe buffer"
            os.write(write_end, source)
            os.close(write_end)
            keep.append(source_fd)
            inside = f"{sandbox.private_file_dir()}/{SUPERVISOR_NAME}"
            argv = sandbox.wrap(self.sandbox_spec, [sandbox.interpreter(), "-I", "-S", inside, str(child.fileno())],
                                files={inside: source_fd})
        with tempfile.TemporaryFile() as stderr:  # bwrap's own complaint, if the sandbox fails to start
            try:
                self._supervisor = subprocess.Popen(argv, pass_fds=keep, stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.DEVNULL, stderr=stderr, env={},
                                                    start_new_session=True)
            except OSError as e:
                raise DevstralError(f"cannot start the command supervisor: {e}") from e
            finally:
                child.close()
                for fd in keep[1:]:
                    os.close(fd)
            self._ctl = parent
            ready = None
            with contextlib.suppress(OSError, ValueError):
                send_message(parent, {"op": "init", "env": self.base_env, "cwd": str(self.cwd), "tag": self.tag})
                if _readable(parent, _START_TIMEOUT_S):
                    ready = recv_message(parent)
            if ready is None or ready[0].get("op") != "ready":
                self._stop_supervisor()
                stderr.seek(0)
                lines = stderr.read().decode(errors="replace").strip().splitlines()
                where = "the sandbox" if self.sandbox_spec is not None else "the command supervisor"
                raise DevstralError(f"{where} did not start: {lines[-1] if lines else 'no error message'}")
        self.home = ready[0]["home"]

    def _stop_supervisor(self) -> None:
        proc, self._supervisor = self._supervisor, None
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.poll() is None:
                proc.kill()  # in the sandbox, --die-with-parent then takes everything inside along
                proc.wait()

    def _restart(self) -> None:
        self._close_output()
        self._stop_supervisor()
        self._exported = {}
        self._start()

    # -- running commands -------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """A command was started and its end has not been reported yet."""
        return self._out is not None

    @property
    def running(self) -> bool:
        if self._out is None:
            return False
        if self._exit is None and self._ctl is not None and _readable(self._ctl, 0):
            self._receive()
        return self._exit is None and not self._lost

    def run(self, command: str, timeout_s: float | None = None, silence_s: float | None = None) -> CommandResult:
        """Start `command`; return when it ends, when it stays silent for `silence_s` (default: the soft
        timeout; the command keeps running and exit_code is None), when `timeout_s` passes, or when it
        has printed more than the output limit (then the whole process group is killed)."""
        assert not self.pending, "the previous command has not been collected"
        # The supervisor may have died between commands (a background `kill -9 -1`): start over.
        self._restarted = self._supervisor is None or self._supervisor.poll() is not None
        if self._restarted:
            self._restart()
        read_end, write_end = os.pipe()
        try:
            assert self._ctl is not None
            self._run_id += 1
            send_message(self._ctl, {"op": "run", "id": self._run_id, "command": command}, [write_end])
        except OSError:
            os.close(read_end)
            self._restart()
            return CommandResult("", -1, self.cwd, session_lost=True)
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        self._out = read_end
        self._buffer = HeadTailBuffer()
        self._total, self._exit, self._lost, self._killing = 0, None, False, None
        self._deadline = time.monotonic() + timeout_s if timeout_s else None
        return self._wait(silence_s)

    def read_more(self) -> CommandResult:
        """Keep waiting on the running command (the model sent an empty command)."""
        return self._wait()

    def send_key(self, key: str) -> CommandResult:
        sig = KEY_SIGNALS[key]
        if self._out is not None:
            self._send({"op": "signal", "sig": int(sig)})
            if sig == signal.SIGTSTP:
                # A stopped command would never finish: treat C-z as "stop it and move on".
                self._send({"op": "kill"})
        return self._wait(silence_s=min(self.soft_timeout_s, 5.0))

    def interrupt(self) -> None:
        """Ctrl-C from the user: kill the running command and its group."""
        if self._out is None:
            return
        self._send({"op": "kill"})
        deadline = time.monotonic() + _KILL_TIMEOUT_S
        while self._exit is None and not self._lost and time.monotonic() < deadline:
            if self._ctl is not None and _readable(self._ctl, 0.1):
                self._receive()
        self._close_output()

    def _send(self, message: dict) -> None:
        try:
            assert self._ctl is not None
            send_message(self._ctl, message)
        except OSError:
            self._lost = True

    def _receive(self) -> None:
        try:
            assert self._ctl is not None
            received = recv_message(self._ctl)
        except (OSError, ValueError):
            received = None
        if received is None:
            self._lost = True
            return
        message, fds = received
        for fd in fds:
            os.close(fd)
        if message.get("op") == "exited" and message.get("id") == self._run_id:
            self._exit = message

    def _wait(self, silence_s: float | None = None) -> CommandResult:
        assert self._out is not None and self._ctl is not None
        silence_s = self.soft_timeout_s if silence_s is None else silence_s
        last_output = time.monotonic()
        with selectors.DefaultSelector() as sel:
            sel.register(self._out, selectors.EVENT_READ)
            sel.register(self._ctl, selectors.EVENT_READ)
            out_open = True
            while self._exit is None and not self._lost:
                now = time.monotonic()
                timeouts = [0.5, silence_s - (now - last_output)]
                if self._deadline is not None:
                    timeouts.append(self._deadline - now)
                for key, _ in sel.select(max(0.0, min(timeouts))):
                    if key.fileobj == self._out:
                        if self._read(_READ_BYTES):
                            last_output = time.monotonic()
                        elif out_open:  # EOF: every writer closed; the exit message follows
                            sel.unregister(self._out)
                            out_open = False
                    else:
                        self._receive()
                now = time.monotonic()
                if self._killing is None:
                    if self._total > self.max_output_bytes:
                        self._kill("output")
                    elif self._deadline is not None and now >= self._deadline:
                        self._kill("timeout")
                    elif now - last_output >= silence_s and self._exit is None and not self._lost:
                        return CommandResult(self._take_text(), None, self.cwd, output_bytes=self._total)
                elif now - self._kill_sent > _KILL_TIMEOUT_S:
                    self._lost = True  # the supervisor does not answer: start over
        if self._lost:
            text = self._take_text()
            self._restart()
            return CommandResult(text, -1, self.cwd, killed=self._killing == "timeout",
                                 output_limited=self._killing == "output", output_bytes=self._total,
                                 session_lost=True)
        self._read(_DRAIN_BYTES)  # whatever was still in the pipe, within bounds
        assert self._exit is not None
        exit_message, killing, total = self._exit, self._killing, self._total
        text = self._take_text()
        self._close_output()
        self.cwd = Path(str(exit_message.get("cwd") or self.cwd))
        self._exported = {str(k): str(v) for k, v in dict(exit_message.get("env") or {}).items()}
        code = -1 if killing else int(exit_message.get("code", -1))
        return CommandResult(text, code, self.cwd, killed=killing == "timeout",
                             output_limited=killing == "output", output_bytes=total, session_lost=self._restarted)

    def _read(self, limit: int) -> int:
        """Read what the pipe has, up to `limit` bytes; the count read (0 at EOF or when empty)."""
        assert self._out is not None
        got = 0
        while got < limit:
            try:
                data = os.read(self._out, _READ_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            got += len(data)
            self._total += len(data)
            self._buffer.add(data)
        return got

    def _kill(self, why: str) -> None:
        self._killing, self._kill_sent = why, time.monotonic()
        self._send({"op": "kill"})

    def _take_text(self) -> str:
        text = self._buffer.text()
        self._buffer = HeadTailBuffer()
        return text

    def _close_output(self) -> None:
        if self._out is not None:
            os.close(self._out)
            self._out = None

    # -- state -------------------------------------------------------------------------------
    def exported_env(self) -> dict[str, str]:
        """The variables exported in the session after the last command (for masking values set by commands)."""
        return dict(self._exported)

    # -- cleanup -----------------------------------------------------------------------------
    def close(self) -> None:
        """Kill everything this session started: the running command, background processes, and
        (without a sandbox) tagged processes that left their group. With a sandbox, the supervisor's
        exit ends its PID namespace, and with it every process still inside."""
        self._close_output()
        if self._ctl is not None:
            with contextlib.suppress(OSError, ValueError):
                send_message(self._ctl, {"op": "close"})
                if _readable(self._ctl, _KILL_TIMEOUT_S):
                    recv_message(self._ctl)
        self._stop_supervisor()

    def __enter__(self) -> BashSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _readable(sock: socket.socket, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(timeout))

