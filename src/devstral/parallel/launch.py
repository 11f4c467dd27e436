"""Starting a tensor-parallel group: `--tensor-parallel N` spawns N-1 workers, or torchrun started us.

Spawned workers (`python -m devstral.parallel.worker`) run `devstral.load` with the same arguments
and RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT in their environment, exactly as torchrun starts
processes: each loads its own shard and then follows rank 0's steps (parallel/lockstep.py) until
rank 0 says stop.

Nothing hangs when a rank dies:
* rank 0 watches its workers: when one exits, it prints one line naming the rank (and the worker's
  own error line, when it had one) and ends the whole group at once;
* a worker watches its parent and ends when rank 0 is gone;
* collectives inside a forward pass time out (DEVSTRAL_TP_TIMEOUT, default 300 s), which ends a
  rank that waits for one that hangs; under torchrun its agent then stops the rest.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

from devstral.errors import DevstralError
from devstral.parallel.group import TPGroup, destroy, init_group
from devstral.parallel.sharding import check_divisible

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_world() -> int:
    """The world size torchrun (or our own spawn) put in the environment; 1 when there is none."""
    if "RANK" not in os.environ:
        return 1
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def wanted(tensor_parallel: int | None) -> bool:
    return (tensor_parallel or 1) > 1 or launched_world() > 1


def model_config(path: Path):
    """The model's sizes, from config.json / params.json or a GGUF header, without loading weights."""
    from devstral.loader import _is_gguf

    if _is_gguf(path):
        from devstral.formats.gguf_model import gguf_config
        from devstral.formats.gguf_read import GGUFFile

        return gguf_config(GGUFFile(path))
    from devstral.config import ModelConfig

    return ModelConfig.from_dir(path)


def rank_device(device: str, local_rank: int, world: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DevstralError("--device cuda: no CUDA device is available")
        count = torch.cuda.device_count()
        if world > count:
            raise DevstralError(f"--tensor-parallel {world} needs {world} GPUs but {count} "
                                f"{'is' if count == 1 else 'are'} visible (CUDA_VISIBLE_DEVICES)")
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise DevstralError(f"--device: unknown value {device!r} (choose auto, cpu or cuda)")
    return torch.device("cpu")


def start(tensor_parallel: int | None, path: Path, *, device: str, backend: str, adapter,
          load_kwargs: dict) -> TPGroup:
    """Check the request, spawn the workers (rank 0 without torchrun), join the group."""
    env_world = launched_world()
    if env_world > 1 and tensor_parallel not in (None, 1, env_world):
        raise DevstralError(f"--tensor-parallel {tensor_parallel} disagrees with the {env_world} processes "
                            "torchrun started (WORLD_SIZE)")
    world = env_world if env_world > 1 else int(tensor_parallel or 1)
    if backend == "llama.cpp":
        raise DevstralError("--tensor-parallel needs --backend torch (llama.cpp runs in one process)")
    if adapter is not None:
        raise DevstralError("--adapter with --tensor-parallel is not supported yet: merge the adapter first "
                            "(devstral finetune --merge) and load the merged model")
    check_divisible(model_config(path), world, source=str(path))
    if env_world > 1:
        return join_launched(device, world)
    dev = rank_device(device, 0, world)
    return spawn_and_join(world, dev, {"load": {**load_kwargs, "model": str(path), "device": device,
                                                "tensor_parallel": world}})


def join_launched(device: str, world: int) -> TPGroup:
    """Join the group torchrun (or our rank 0) started this process in, from its environment."""
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    store = None
    if _PARENT_ENV in os.environ:  # spawned by our rank 0: its store, as it created it (no key prefix)
        import torch.distributed as dist

        from devstral.parallel.group import collective_timeout

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False, timeout=collective_timeout())
    return init_group(rank, world, rank_device(device, local_rank, world), store=store)


# ---------------------------------------------------------------- rank 0's side of a spawned group
class _Workers:
    def __init__(self, procs: dict[int, subprocess.Popen], error_dir: Path):
        self.procs, self.error_dir = procs, error_dir
        self.stopping = False

    def watch(self) -> None:
        while not self.stopping:
            for rank, p in self.procs.items():
                code = p.poll()
                if code and not self.stopping:  # 0: a training rank that finished its run
                    self._fail(rank, code)
            time.sleep(0.1)

    def _fail(self, rank: int, code: int) -> None:
        line = _read_error(self.error_dir, rank)
        if line:
            print(f"error: tensor-parallel rank {rank}: {line}", file=sys.stderr, flush=True)
        else:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            print(f"error: tensor-parallel rank {rank} {how}; stopping the other ranks", file=sys.stderr, flush=True)
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        os._exit(2 if code == 2 else 1)  # rank 0 may be blocked inside a collective: no clean return

    def stop(self, tp: TPGroup | None) -> None:
        if self.stopping:
            return
        self.stopping = True
        if tp is not None:
            with contextlib.suppress(Exception):  # a worker already gone: they are killed below
                tp.send(("stop",))
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        destroy()
        shutil.rmtree(self.error_dir, ignore_errors=True)


_active: _Workers | None = None


def spawn_and_join(world: int, device: torch.device, job: dict) -> TPGroup:
    """Start ranks 1..world-1 as `python -m devstral.parallel.worker` (`job`: {"load": load() kwargs} or
    {"finetune": a TrainConfig as a dict}) with torchrun's environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; a fresh interpreter, so the caller's main script
    is never re-run as multiprocessing's spawn would), then join the group as rank 0."""
    global _active
    import torch.distributed as dist

    from devstral.parallel.group import collective_timeout

    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=collective_timeout())
    threads = torch.get_num_threads()
    if device.type == "cpu":  # the ranks share the machine's cores
        threads = max(1, threads // world)
        torch.set_num_threads(threads)
    error_dir = Path(tempfile.mkdtemp(prefix="devstral-tp-"))
    procs = {}
    for rank in range(1, world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "NCCL_NVLS_ENABLE":
               os.environ.get("NCCL_NVLS_ENABLE", "0"), _JOB_ENV: json.dumps(job),
               _THREADS_ENV: str(threads), _ERROR_ENV: str(error_dir / f"rank{rank}.txt"),
               _PARENT_ENV: str(os.getpid())}
        procs[rank] = subprocess.Popen([sys.executable, "-m", "devstral.parallel.worker"], env=env,
                                       stdin=subprocess.DEVNULL)
    workers = _Workers(procs, error_dir)
    threading.Thread(target=workers.watch, daemon=True, name="devstral-tp-watchdog").start()
    _active = workers
    tp = init_group(0, world, device, store=store)
    atexit.register(shutdown, tp)
    return tp


def group_failed(error: BaseException) -> None:
    """Rank 0: a step failed (a collective broke, or an error on this rank). The ranks are out of step
    now, so the group ends: naming the rank that died when one did, else this one's error."""
    workers = _active
    if workers is None:  # torchrun: its agent stops the others once this process ends
        raise DevstralError(f"tensor-parallel rank 0: {_one_line(error)}") from error
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # a dead peer is the usual cause: give its exit a moment to show
        for rank, p in workers.procs.items():
            code = p.poll()
            if code:
                workers._fail(rank, code)
        time.sleep(0.05)
    workers.stopping = True
    print(f"error: tensor-parallel rank 0: {_one_line(error)}; stopping the other ranks", file=sys.stderr, flush=True)
    for p in workers.procs.values():
        p.kill()
    os._exit(1)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if not isinstance(error, DevstralError) else text


def _read_error(error_dir: Path, rank: int) -> str:
    try:
        return (error_dir / f"rank{rank}.txt").read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def shutdown(tp: TPGroup | None = None) -> None:
    """Rank 0: tell the followers to stop; for ranks it spawned, wait for them and leave the group
    (idempotent). Under torchrun the group stays: the followers return from load(), and the script
    that launched them may go on using it."""
    global _active
    if _active is not None:
        _active.stop(tp)
        _active = None
    elif tp is not None and not getattr(tp, "stopped", False):
        tp.stopped = True
        with contextlib.suppress(Exception):
            tp.send(("stop",))


_JOB_ENV, _THREADS_ENV = "DEVSTRAL_TP_JOB", "DEVSTRAL_TP_THREADS"
_ERROR_ENV, _PARENT_ENV = "DEVSTRAL_TP_ERROR_FILE", "DEVSTRAL_TP_PARENT"


# ---------------------------------------------------------------- a spawned worker
def worker_main() -> int:
    """Rank 1.. of a group rank 0 spawned: load this rank's shard, follow, exit."""
    torch.set_num_threads(int(os.environ.get(_THREADS_ENV, "1")))
    threading.Thread(target=_watch_parent, args=(int(os.environ[_PARENT_ENV]),), daemon=True).start()
    error_file = Path(os.environ[_ERROR_ENV])
    try:
        job = json.loads(os.environ[_JOB_ENV])
        if "finetune" in job:
            from devstral.train.config import TrainConfig
            from devstral.train.trainer import finetune

            finetune(TrainConfig(**job["finetune"]))
        else:
            import devstral

            devstral.load(**job["load"])  # follows rank 0, then raises SystemExit(0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except DevstralError as e:
        error_file.write_text(str(e), encoding="utf-8")
        return 2
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which names this rank
        error_file.write_text(traceback.format_exception_only(type(e), e)[-1].strip(), encoding="utf-8")
        traceback.print_exc()
        return 1
    return 0


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:  # rank 0 is gone (this process was re-parented): nothing to follow
            os._exit(1)
        time.sleep(0.5)
