"""The tensor-parallel process group: who is which rank, which backend, and the two channels.

* compute: the default group (NCCL on CUDA, gloo on the CPU) carries the all-reduces and the logits
  gather inside the forward pass, with a finite timeout, so a rank that stops answering ends the
  others with an error instead of a hang.
* control: a gloo group on which rank 0 sends each step's inputs (and "build the engine", "stop").
  The followers wait on it for as long as a server stays idle, so its timeout is long; a dead rank 0
  still ends them, because its sockets close (and the spawned workers watch their parent).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long one collective inside a forward pass may wait for the other ranks (seconds).
TIMEOUT_ENV = "DEVSTRAL_TP_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
IDLE_TIMEOUT = timedelta(days=30)  # the control channel: a served model may idle for weeks


def collective_timeout() -> timedelta:
    try:
        return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)


@dataclass
class TPGroup:
    rank: int
    world: int
    device: torch.device
    group: dist.ProcessGroup
    control: dist.ProcessGroup
    stopped: bool = False  # rank 0 told the followers to stop

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's [..., n] -> [..., world * n], rank 0's columns first (the vocab shards' order)."""
        t = t.reshape(1, *t.shape).contiguous()
        out = t.new_empty((self.world, *t.shape[1:]))  # ranks stacked on a new leading axis
        _all_gather(out, t, group=self.group)
        return out.movedim(0, -2).reshape(*t.shape[1:-1], self.world * t.shape[-1])

    def send(self, message: object) -> None:
        """Rank 0: one message (pickled) to every follower."""
        dist.broadcast_object_list([message], src=0, group=self.control)

    def receive(self) -> object:
        box: list[object] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.control)


# torch >= 2.13 names it all_gather_single (all_gather_into_tensor warns there); older torch has only the latter
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def init_group(rank: int, world: int, device: torch.device, store: dist.Store | None = None) -> TPGroup:
    """Join (or, on rank 0 with a store, found) the group. `device` is this rank's device."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast can take shared GPUs out of service
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    kwargs = {"rank": rank, "world_size": world, "timeout": collective_timeout()}
    if store is not None:
        kwargs["store"] = store
    if cuda:
        kwargs["device_id"] = device
    dist.init_process_group("nccl" if cuda else "gloo", **kwargs)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return TPGroup(rank, world, device, dist.group.WORLD, control)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
