"""`--offload-activations`: the checkpointed layer inputs wait for backward in (pinned) CPU memory.

With gradient checkpointing the only activation a layer keeps between forward and backward is its
input, [tokens, dim] per layer: 20 MB per layer at 2k tokens of Devstral-Small width, 1.3 GB at 128k,
so 40 layers of a long sequence hold tens of GB. Here each checkpointed block runs under a
saved-tensors hook that copies that input to a page-locked CPU buffer on a side stream as soon as
the block's forward is queued (the GPU copy is freed when the copy is done: `record_stream`), and
brings it back in backward, prefetching the next layer's (backward runs the layers in reverse) while
the current one recomputes. Copies overlap compute; the arithmetic is untouched, so loss and
gradients equal the run without it bit for bit.

Pinned buffers are pooled by shape and dtype and reused step after step (pinning is slow). On a CPU
device the "offload" is a copy into a separate CPU tensor: the CPU twin that CI checks.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch


class _Saved:
    """One offloaded layer input: its CPU copy, and the events that order the copies."""

    __slots__ = ("cpu", "device", "stored", "prefetched", "ready")

    def __init__(self, cpu: torch.Tensor, device: torch.device, stored):
        self.cpu, self.device, self.stored = cpu, device, stored
        self.prefetched: torch.Tensor | None = None
        self.ready = None


class ActivationOffload:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self.saved: list[_Saved] = []  # this forward's layer inputs, in layer order
        self.offloaded = 0  # layer inputs moved out, over the run (tests and logs)

    def begin(self) -> None:
        """A new forward pass (the previous one's backward is done): its buffers go back to the pool.
        Their copies back were queued on the side stream, which the next offload copies follow."""
        for entry in self.saved:
            self.pool[(tuple(entry.cpu.shape), entry.cpu.dtype)].append(entry.cpu)
        self.saved = []

    @contextlib.contextmanager
    def saving(self, layer_input: torch.Tensor):
        """Offload `layer_input` (and nothing else) wherever autograd saves it inside this block."""
        ptr, shape = layer_input.data_ptr(), layer_input.shape

        def pack(t: torch.Tensor):
            if t.data_ptr() != ptr or t.shape != shape or t.device.type != self.device.type:
                return t
            return self._store(t)

        def unpack(item):
            return self._load(item) if isinstance(item, _Saved) else item

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    # ------------------------------------------------------------------ copies
    def _buffer(self, t: torch.Tensor) -> torch.Tensor:
        free = self.pool[(tuple(t.shape), t.dtype)]
        if free:
            return free.pop()
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda)

    def _store(self, t: torch.Tensor) -> _Saved:
        cpu = self._buffer(t)
        self.offloaded += 1
        if not self.cuda:
            cpu.copy_(t)
            entry = _Saved(cpu, t.device, None)
        else:
            produced = torch.cuda.current_stream(self.device).record_event()
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(produced)
                cpu.copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # the allocator keeps t's memory until this copy is done
            entry = _Saved(cpu, t.device, self.stream.record_event())
        self.saved.append(entry)
        return entry

    def _fetch(self, entry: _Saved) -> None:
        """Start copying an entry back to the GPU on the side stream."""
        compute = torch.cuda.current_stream(self.device)
        gpu = torch.empty(entry.cpu.shape, dtype=entry.cpu.dtype, device=entry.device)  # compute stream's memory
        self.stream.wait_event(compute.record_event())  # ... once the compute stream is done with it
        with torch.cuda.stream(self.stream):
            gpu.copy_(entry.cpu, non_blocking=True)
        entry.prefetched, entry.ready = gpu, self.stream.record_event()

    def _load(self, entry: _Saved) -> torch.Tensor:
        if not self.cuda:
            return entry.cpu.clone()
        if entry.prefetched is None:
            self._fetch(entry)
        gpu, ready = entry.prefetched, entry.ready
        entry.prefetched = entry.ready = None
        torch.cuda.current_stream(self.device).wait_event(ready)
        at = next((i for i, e in enumerate(self.saved) if e is entry), None)
        if at is not None and at > 0 and self.saved[at - 1].prefetched is None:
            self._fetch(self.saved[at - 1])  # the layer backward needs next
        return gpu
