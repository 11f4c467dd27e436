"""Tensor parallelism (inference) and FSDP2 (fine-tuning) on torch.distributed.

sharding.py  which slice of each weight a rank holds; divisibility checks; the per-rank config
group.py     the process group: NCCL (CUDA) or gloo (CPU) for compute, a gloo control channel, timeouts
layers.py    hooks that make a loaded shard a tensor-parallel model (all-reduce, vocab-parallel ends)
lockstep.py  rank 0's LLM and the followers' loop: the same engine steps on every rank
launch.py    --tensor-parallel N spawns the other ranks (or torchrun did); watchdogs; shutdown
worker.py    a spawned rank's entry point
fsdp.py      FSDP2 (fully_shard) LoRA / QLoRA fine-tuning over N processes
"""
