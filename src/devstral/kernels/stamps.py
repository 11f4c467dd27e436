"""Timestamps from inside the decode chain's small kernels (DEVSTRAL_STAMPS=1; off by default, and then
compiled out): where a latency-bound kernel's microseconds go, from the kernel before it finishing to its
own end, which no profiler timeline shows (it has a kernel's first start and last end only).

A kernel launched with STAMPS reads %globaltimer (nanoseconds, one clock for the whole GPU) at its start,
right after the dependent launch's wait, when its main work has its data, and at its end, and stores the
four per program in a [KERNELS, MAX_PROGRAMS, SLOTS] int64 buffer -- at its end, so nothing is written
before the wait (kernels/pdl.py). A program with nothing to do stores 0 as its work stamp. Every launch
of a kernel writes the same rows, so after a decode step the buffer holds that kernel's last launch of the
step: the last layer's RoPE, attention and merge, and the final norm. `benchmarks/gpu_engine.py` reads it
after each decode run (`snapshot`) and reports the phases (`phases`).

What a stamp can and cannot say: ptxas may schedule a timer read a few instructions away from where the
source has it, so a stamp is good to a few tens of nanoseconds, and a "work" stamp is placed after a
value computed from the loaded data (the compiler cannot move it before that value exists, only the
timer read within the final instructions). The interpreter has no timer: STAMPS is never on there.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from devstral.errors import DevstralError

ROPE, SPLIT, MERGE, NORM = range(4)
NAMES = ("rope_store", "attention_split", "attention_merge", "norm")
MAX_PROGRAMS = 4096  # programs past this are not recorded
SLOTS = 4  # start, after the wait, work done, end
START, WAITED, WORK, END = range(SLOTS)
_MAX, _SLOTS = tl.constexpr(MAX_PROGRAMS), tl.constexpr(SLOTS)  # what the jitted code may read

_BUFFERS: dict[torch.device, torch.Tensor] = {}


@functools.cache
def enabled() -> bool:
    return os.environ.get("DEVSTRAL_STAMPS", "0") == "1" and os.environ.get("TRITON_INTERPRET") != "1"


def buffer(device: torch.device) -> torch.Tensor:
    """The device's stamp buffer, allocated by the first (eager) call: the engine's warm-up runs before any
    CUDA-graph capture, and a capture then bakes this buffer's address into the graph."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _BUFFERS.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise DevstralError("DEVSTRAL_STAMPS=1: the stamp buffer must exist before a CUDA-graph capture "
                                "(run one eager decode step first)")
        with torch.inference_mode(False):  # a normal tensor: snapshot() clears it outside inference mode
            buf = _BUFFERS[device] = torch.zeros(len(NAMES), MAX_PROGRAMS, SLOTS, dtype=torch.int64, device=device)
    return buf


def kernel_args(device: torch.device, fallback: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the stamps pointer, STAMPS) for a launch: the buffer when stamps are on, else any tensor (unused)."""
    return (buffer(device), True) if enabled() and device.type == "cuda" else (fallback, False)


@triton.jit
def now():
    """%globaltimer in nanoseconds."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [tl.full([], 0, tl.int32)],
                                     dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def after(x):
    """%globaltimer, read once the float scalar x exists (x's bits feed the asm, which cannot run before)."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.eq.s32 p, $1, 2147483647; mov.u64 $0, %globaltimer; @p mov.u64 $0, 1; }",
        "=l,r", [bits], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def record(buf, KERNEL: tl.constexpr, program, t_start, t_waited, t_work, t_end):
    if program < _MAX:
        row = buf + (KERNEL * _MAX + program) * _SLOTS
        tl.store(row, t_start)
        tl.store(row + 1, t_waited)
        tl.store(row + 2, t_work)
        tl.store(row + 3, t_end)


def snapshot(device: torch.device) -> dict[str, list[list[int]]] | None:
    """Each kernel's recorded programs [start, waited, work, end] (ns) from the last launches, or None when
    stamps are off; the buffer is cleared for the next run."""
    if not enabled() or device.type != "cuda":
        return None
    buf = buffer(device)
    torch.cuda.synchronize(device)
    rows = buf.cpu()
    buf.zero_()
    return {name: [r.tolist() for r in rows[k] if r[START] != 0] for k, name in enumerate(NAMES)}


def phases(snap: dict[str, list[list[int]]]) -> dict[str, float | None]:
    """The attention chain's phases in us, from one snapshot: RoPE's end to the first split passing its
    wait, the splits' work and stores, the merge's release, work and end; the final norm's wait to its
    end. Splits and merges whose work stamp is 0 had nothing to do and are left out of the work figures."""
    us = lambda a, b: (b - a) / 1e3 if a and b else None  # noqa: E731
    rope, split, merge, norm = (snap.get(n) or [] for n in NAMES)
    out: dict[str, float | None] = {}
    busy = [r for r in split if r[WORK]]
    if rope and busy:
        rope_end = max(r[END] for r in rope)
        out["rope_wait_to_end"] = us(max(r[WAITED] for r in rope), rope_end)
        out["rope_end_to_split_waited_first"] = us(rope_end, min(r[WAITED] for r in busy))
        out["rope_end_to_split_waited_last"] = us(rope_end, max(r[WAITED] for r in busy))
        out["split_waited_to_work_median"] = _median([us(r[WAITED], r[WORK]) for r in busy])
        out["split_work_to_end_median"] = _median([us(r[WORK], r[END]) for r in busy])
        split_end = max(r[END] for r in busy)
        out["rope_end_to_split_end"] = us(rope_end, split_end)
        out["split_programs_busy"] = len(busy)
        out["split_programs"] = len(split)
        out["rope_end_to_idle_split_end_last"] = us(rope_end, max((r[END] for r in split if not r[WORK]), default=0))
        merging = [r for r in merge if r[WORK]]
        if merging:
            out["split_end_to_merge_waited_first"] = us(split_end, min(r[WAITED] for r in merging))
            out["merge_waited_to_work_median"] = _median([us(r[WAITED], r[WORK]) for r in merging])
            out["rope_end_to_merge_end"] = us(rope_end, max(r[END] for r in merging))
    if norm:
        out["norm_waited_to_work_median"] = _median([us(r[WAITED], r[WORK]) for r in norm])
        out["norm_work_to_end_median"] = _median([us(r[WORK], r[END]) for r in norm])
        out["norm_start_to_waited_median"] = _median([us(r[START], r[WAITED]) for r in norm])
    return out


def _median(xs: list[float | None]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None
