"""FSDP2 (torch.distributed.fsdp.fully_shard) for LoRA / QLoRA fine-tuning over N processes.

`devstral finetune --nproc N` makes this process rank 0 and spawns the others (parallel/launch.py);
under torchrun every process runs the same command. Each transformer block is one FSDP2 unit, the
root holds the embeddings, final norm and head: parameters (the frozen 16-bit base, the LoRA
weights), their gradients and AdamW's state are sharded over the ranks and gathered a block at a time.
An NF4 base (QLoRA) lives in buffers, which FSDP2 leaves whole: every rank holds the 4-bit base, and
the rest is sharded.

The step is the single-process step split by micro-batch: rank r takes micro-batches r, r+N, ... of
the step's --grad-accum, the loss is normalised by the whole step's label count, and gradients are
summed (FSDP2 averages, so the loss is scaled by N). Losses therefore equal one process's.
Only rank 0 writes (metrics, checkpoints, the PEFT adapter), each file atomically as before.
"""

from __future__ import annotations

import torch
from torch import nn

from devstral.errors import DevstralError
from devstral.parallel.group import TPGroup


def join(cfg) -> TPGroup | None:
    """None for one process; else this process's place in the group (rank 0 spawns the others, which
    run the same TrainConfig)."""
    from devstral.parallel.launch import join_launched, launched_world, rank_device, spawn_and_join

    nproc, device = cfg.nproc, cfg.device
    env_world = launched_world()
    if env_world > 1 and nproc not in (1, env_world):
        raise DevstralError(f"--nproc {nproc} disagrees with the {env_world} processes torchrun started (WORLD_SIZE)")
    world = env_world if env_world > 1 else nproc
    if world == 1:
        return None
    if env_world > 1:
        return join_launched(device, world)
    return spawn_and_join(world, rank_device(device, 0, world), {"finetune": {**cfg.as_dict(), "progress": False}})


def shard(model: nn.Module, group: TPGroup) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(group.device.type, (group.world,))
    # CUDA: gather in bf16 (autocast computes in bf16 anyway), reduce gradients in fp32
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if group.device.type == "cuda" else MixedPrecisionPolicy())
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # training calls hidden_states() (the loss runs lm_head in chunks), not forward(): gather there too
    register_fsdp_forward_method(model, "hidden_states")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter (DTensor) gathered whole on every rank (a collective); others as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """lora_state(model) with every tensor whole, on the CPU (every rank must call it)."""
    from devstral.model.lora import lora_state

    return {k: full_tensor(v).float().cpu() for k, v in lora_state(model).items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def all_sum(group: TPGroup, value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=group.device)
    dist.all_reduce(t, group=group.group)
    return float(t.item())


def grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip (max_norm > 0) and return the total norm over every rank's shards."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(full_tensor(norm))


def leave(group: TPGroup | None) -> None:
    if group is None:
        return
    from devstral.parallel.group import destroy
    from devstral.parallel.launch import shutdown

    if group.is_leader:
        shutdown(None)  # spawned ranks finish their own run and exit: wait for them
    destroy()
