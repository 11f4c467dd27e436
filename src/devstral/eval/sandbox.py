"""Run untrusted Python (a model's completion plus its tests) in a separate, limited, disposable process.

Two isolation levels, chosen once per run:

- `bwrap` (bubblewrap, when installed): new user, PID, network, IPC and UTS namespaces; a read-only
  view of only the interpreter's files; the program's temp folder as the only writable place.
  No network interface but loopback exists, so nothing can be reached. When the PID namespace's
  first process dies the kernel kills everything left in it, so a fork that escaped its process group
  still dies. RLIMIT_NPROC is set inside the new user namespace, where it counts only the sandbox's
  own processes: a fork bomb stops at a few processes.
- `process` (no bwrap): the same resource limits and a new session, but no namespaces. Network is
  refused only by a Python-level guard installed before the program runs (a program can undo it with
  ctypes); every run says so. Processes that left the group are found by an environment tag.

In both, every limit is set as soft = hard, so the program cannot raise it: RLIMIT_AS (memory),
RLIMIT_CPU (CPU seconds), RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE and no core dumps; the wall-clock
timeout kills the whole process group. Output goes to files (bounded by RLIMIT_FSIZE), never to an
unbounded pipe. Root never runs the program: it drops to `nobody`, because the kernel does not
enforce RLIMIT_NPROC for root, and then the interpreter must be readable by everyone (pyenv under a
0700 /root is not: the system python3 is used instead).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from devstral.errors import DevstralError

TAG_VARIABLE = "DEVSTRAL_SANDBOX"
NOBODY = 65534
_OUTPUT_TAIL = 2000

# Runs first inside the sandbox: fix the limits (soft = hard, so they cannot be raised), optionally
# guard the network, then run the program as __main__. argv: mem cpu nproc fsize nofile guard path.
_BOOT = r"""
import resource, runpy, sys
mem, cpu, nproc, fsize, nofile, guard = map(int, sys.argv[1:7])
for res, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_NPROC, nproc),
                   (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(res, (value, value))
if guard:
    import socket
    def _refused(*a, **k):
        raise PermissionError("network access is disabled in the sandbox")
    class _NoSocket(socket.socket):
        def __init__(self, *a, **k):
            _refused()
    socket.socket = _NoSocket
    socket.create_connection = socket.socketpair = socket.fromfd = _refused
path = sys.argv[7]
sys.argv = [path]
del resource, mem, cpu, nproc, fsize, nofile, guard
runpy.run_path(path, run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, whole process group killed after it
    memory_mb: int = 1024  # address space per process (RLIMIT_AS)
    max_processes: int = 8  # processes and threads of the sandbox (RLIMIT_NPROC)
    file_size_mb: int = 16  # largest file it may write, stdout/stderr included (RLIMIT_FSIZE)
    open_files: int = 64

    def validate(self) -> None:
        if not self.timeout_s > 0:
            raise DevstralError(f"sandbox timeout must be positive, got {self.timeout_s}")
        if self.memory_mb < 64:
            raise DevstralError(f"sandbox memory must be at least 64 MB, got {self.memory_mb}")
        if self.max_processes < 1 or self.file_size_mb < 1 or self.open_files < 16:
            raise DevstralError("sandbox limits: processes >= 1, file size >= 1 MB, open files >= 16")


@dataclass
class SandboxResult:
    status: str  # passed | failed | timeout | memory | cpu | killed
    returncode: int | None
    detail: str  # one line: the exception or the limit that stopped it
    stdout: str
    stderr: str
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


def _world_usable(path: Path) -> bool:
    """Can an unrelated user (nobody) reach and run this file? Every folder on the way needs o+x."""
    path = Path(os.path.realpath(path))
    try:
        if not path.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)
    except OSError:
        return False


def _python_prefix(exe: Path) -> Path:
    """The installation folder holding bin/pythonX.Y and lib/pythonX.Y (pyenv, conda, /usr, /usr/local)."""
    real = Path(os.path.realpath(exe))
    return real.parent.parent


class Sandbox:
    """`kind`: "auto" (bwrap when installed, else process), "bwrap" (required) or "process"."""

    def __init__(self, limits: SandboxLimits | None = None, kind: str = "auto", python: str | None = None):
        self.limits = limits or SandboxLimits()
        self.limits.validate()
        if kind not in ("auto", "bwrap", "process"):
            raise DevstralError(f"--sandbox must be auto, bwrap or process, got {kind!r}")
        bwrap = shutil.which("bwrap")
        if kind == "bwrap" and bwrap is None:
            raise DevstralError("--sandbox bwrap: bubblewrap (bwrap) is not installed")
        self.drop_to = NOBODY if os.geteuid() == 0 else None
        self.python = self._pick_python(python)
        self.kind = "process"
        self._bwrap = None
        if kind != "process" and bwrap is not None:
            if self._bwrap_works(bwrap):
                self.kind, self._bwrap = "bwrap", bwrap
            elif kind == "bwrap":
                raise DevstralError("--sandbox bwrap: bwrap is installed but cannot create namespaces here "
                                    "(user namespaces disabled?)")

    # -- setup ----------------------------------------------------------------------------
    def _pick_python(self, python: str | None) -> str:
        candidates = [python] if python else [sys.executable, os.path.realpath(sys.executable),
                                              shutil.which("python3") or "", "/usr/bin/python3",
                                              "/usr/local/bin/python3"]
        for c in candidates:
            if c and Path(c).is_file() and (self.drop_to is None or _world_usable(Path(c))):
                return os.path.realpath(c)
        if python:
            raise DevstralError(f"sandbox python {python}: not found, or not readable by user nobody")
        raise DevstralError("running as root, the sandbox runs programs as user nobody, who cannot read this "
                            "Python; install a system python3 or run devstral as an ordinary user")

    def _bwrap_argv(self, workdir: Path) -> list[str]:
        argv = [self._bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        for top in ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"):
            p = Path(top)
            if p.is_symlink():
                argv += ["--symlink", os.readlink(p), top]
            elif p.is_dir():
                argv += ["--ro-bind", top, top]
        for extra in ("/etc/ld.so.cache", "/etc/alternatives", "/etc/localtime"):
            argv += ["--ro-bind-try", extra, extra]
        prefix = _python_prefix(Path(self.python))
        if not str(prefix).startswith("/usr"):
            argv += ["--ro-bind", str(prefix), str(prefix)]
        argv += ["--bind", str(workdir), "/sandbox", "--chdir", "/sandbox", "--clearenv",
                 "--setenv", "HOME", "/sandbox", "--setenv", "TMPDIR", "/tmp", "--setenv", "PATH", "/usr/bin:/bin",
                 "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONHASHSEED", "0"]
        return argv

    def _bwrap_works(self, bwrap: str) -> bool:
        self._bwrap = bwrap
        try:
            with tempfile.TemporaryDirectory(prefix="devstral-sbx-") as d:
                self._own(Path(d))
                argv = [*self._bwrap_argv(Path(d)), "--", self.python, "-I", "-S", "-c", "pass"]
                r = subprocess.run(argv, capture_output=True, timeout=30, **self._user_kwargs())
            return r.returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False
        finally:
            self._bwrap = None

    def _user_kwargs(self) -> dict:
        if self.drop_to is None:
            return {}
        return {"user": self.drop_to, "group": self.drop_to, "extra_groups": []}

    def _own(self, folder: Path) -> None:
        if self.drop_to is not None:
            os.chown(folder, self.drop_to, self.drop_to)

    @property
    def description(self) -> str:
        who = " as user nobody" if self.drop_to is not None else ""
        net = "no network (own network namespace)" if self.kind == "bwrap" else \
            "network refused by a Python-level guard only (install bubblewrap for a network namespace)"
        lim = self.limits
        return (f"{self.kind}{who}: {net}; {lim.timeout_s:g} s wall, {lim.memory_mb} MB memory, "
                f"{lim.max_processes} processes; python {self.python}")

    # -- running --------------------------------------------------------------------------
    def run(self, program: str) -> SandboxResult:
        lim = self.limits
        with tempfile.TemporaryDirectory(prefix="devstral-sbx-") as d:
            work = Path(d)
            (work / "program.py").write_text(program, encoding="utf-8")
            self._own(work)
            os.chmod(work / "program.py", 0o644)
            cpu = math.ceil(lim.timeout_s) + 1
            nproc = lim.max_processes
            if self.kind == "process":
                # No user namespace: RLIMIT_NPROC counts every process of the user on the machine.
                nproc += _processes_of(self.drop_to if self.drop_to is not None else os.getuid())
            limits = [lim.memory_mb << 20, cpu, nproc, lim.file_size_mb << 20, lim.open_files,
                      int(self.kind == "process")]
            if self.kind == "bwrap":
                path = "/sandbox/program.py"
                argv = [*self._bwrap_argv(work), "--", self.python, "-I", "-S", "-c", _BOOT,
                        *map(str, limits), path]
                env = None
            else:
                path = str(work / "program.py")
                argv = [self.python, "-I", "-S", "-c", _BOOT, *map(str, limits), path]
                env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
                       "PYTHONHASHSEED": "0"}
            tag = uuid.uuid4().hex
            if self.kind == "bwrap":
                sep = argv.index("--")  # after --clearenv, which would drop it
                argv[sep:sep] = ["--setenv", TAG_VARIABLE, tag]
            else:
                env = {**env, TAG_VARIABLE: tag}
            out_path, err_path = work / ".stdout", work / ".stderr"
            start = time.monotonic()
            timed_out = False
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work, env=env,
                                        start_new_session=True, **self._user_kwargs())
                try:
                    proc.wait(timeout=lim.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc.pid)
                    proc.wait()
                    # Whatever left the group (setsid) dies here; in bwrap the PID namespace is going
                    # down too, and this waits until its processes are really gone.
                    _kill_tagged(tag, self.drop_to if self.drop_to is not None else os.getuid())
            wall = time.monotonic() - start
            stdout, stderr = _tail(out_path), _tail(err_path)
        return _classify(proc.returncode, timed_out, stdout, stderr, wall, lim)


def _processes_of(uid: int) -> int:
    n = 0
    for p in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error, TypeError):
            n += p.info["uids"].real == uid
    return n


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_tagged(tag: str, uid: int) -> None:
    """Kill processes of `uid` that left the group (setsid, double fork) but still carry the run's tag."""
    for _ in range(5):  # a process may fork while we look
        found = []
        for p in psutil.process_iter(["uids", "status"]):
            with contextlib.suppress(psutil.Error, TypeError):
                if p.info["uids"].real == uid and p.info["status"] != psutil.STATUS_ZOMBIE \
                        and p.environ().get(TAG_VARIABLE) == tag:
                    found.append(p)
        if not found:
            return
        for p in found:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(found, timeout=2)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _OUTPUT_TAIL))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _classify(rc: int | None, timed_out: bool, stdout: str, stderr: str, wall: float,
              lim: SandboxLimits) -> SandboxResult:
    last = _last_line(stderr)
    if timed_out:
        status, detail = "timeout", f"killed after {lim.timeout_s:g} s (wall-clock limit)"
    elif rc == 0:
        status, detail = "passed", ""
    elif "MemoryError" in last or rc in (-signal.SIGSEGV, 128 + signal.SIGSEGV) and "MemoryError" in stderr:
        status, detail = "memory", f"MemoryError (limit {lim.memory_mb} MB)"
    elif rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGKILL) and not last:
        status, detail = "cpu", f"killed by signal (CPU-time limit {math.ceil(lim.timeout_s) + 1} s)"
    elif rc is not None and (rc < 0 or rc > 128) and not last:
        sig = -rc if rc < 0 else rc - 128
        status, detail = "killed", f"killed by signal {sig}"
    else:
        status, detail = "failed", last or f"exit code {rc}"
    return SandboxResult(status, rc, detail, stdout, stderr, wall)
