"""`--offload-activations`: the checkpointed layer inputs wait for backward in (pinned) CPU memory.

With gradient checkpointing the only activation a layer keeps between forward and backward is its
input, [tokens, dim] per layer: 20 MB per layer at 2k tokens of Devstral-Small width, 1.3 GB at 128k,
so 40 layers of a long sequence hold tens of GB. Here each checkpointed block runs under a
saved-tensors hook that copies that input to a page-locked CPU buffer on a side stream as soon as
the block's forward is queued (the GPU copy is freed when the copy is done: `record_stream`), and
brings it back in backward, prefetching the next layer's (backward runs the layers in reverse) while
the current one recomputes. Copies overlap compute; the arithmetic is untouched, so loss and
gradients equal the run without it bit for bit.

Host memory is finite: 40 layers x 5120 x 2 bytes is 400 KB per token, 160 GB at 400k tokens. The
offload has a host budget (by default what the OS reports available, less a reserve: `host_budget()`);
the layer inputs that do not fit stay on the GPU. Forward stores the layers in order, so the first
layers go to the host and the last ones, which backward needs first, stay on the device; the same split
every step, as the budget is fixed and the buffers are reused.

The host copies live in pinned slabs of one size (SLAB_BYTES, a power of two): torch's pinned allocator
rounds every request up to a power of two, which would nearly double a 4.2 GB layer input; slabs waste
at most one partial slab per layer. Slabs are pooled and reused step after step (pinning is slow). On a
CPU device the "offload" is a copy into separate CPU slabs: the CPU twin that CI checks.
"""

from __future__ import annotations

import contextlib

import torch

SLAB_BYTES = 64 << 20
RESERVE_FRACTION = 0.1  # of the available host memory, left to the process and the OS
RESERVE_MIN = 2 << 30


def _meminfo_available(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_room(limit_text: str, usage_text: str) -> int | None:
    limit = limit_text.strip()
    if not limit or limit == "max":
        return None
    return max(0, int(limit) - int(usage_text.strip()))


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def host_memory_available() -> int | None:
    """Bytes of host memory this process can still take: the kernel's MemAvailable, or less where a cgroup
    (a container's memory limit) leaves less. None where neither can be read."""
    found = []
    meminfo = _read("/proc/meminfo")
    if meminfo:
        found.append(_meminfo_available(meminfo))
    limit, usage = _read("/sys/fs/cgroup/memory.max"), _read("/sys/fs/cgroup/memory.current")
    if limit is not None and usage is not None:
        found.append(_cgroup_room(limit, usage))
    found = [b for b in found if b is not None]
    return min(found) if found else None


def host_budget(available: int | None) -> int:
    """Host bytes the offload may pin, given what is available: all of it but a reserve (a tenth, at least
    2 GiB). Unknown availability: no limit (the offload then behaves as before this budget existed)."""
    if available is None:
        return 1 << 62
    return max(0, available - max(RESERVE_MIN, int(available * RESERVE_FRACTION)))


def plan_offload(layer_bytes: list[int], budget: int, slab_bytes: int = SLAB_BYTES) -> list[bool]:
    """Which layer inputs (in forward order) go to the host: the first ones whose slabs fit the budget;
    the rest stay on the device. ActivationOffload makes this choice as forward stores them."""
    slabs_left = budget // slab_bytes
    out = []
    for nbytes in layer_bytes:
        need = -(-nbytes // slab_bytes)
        fits = need <= slabs_left
        slabs_left -= need if fits else 0
        out.append(fits)
    return out


def longest_sequence(*, gpu_free: float, host_budget: int, fixed: float, per_token: float, checkpoints: int,
                     checkpoint_per_token: int, slab_bytes: int = SLAB_BYTES) -> dict:
    """The longest sequence whose step fits: on the GPU the working set (`fixed` + `per_token` x T bytes,
    measured) plus the checkpoints kept there; in the host budget the other checkpoints, in whole slabs
    (`checkpoints` of them per step, `checkpoint_per_token` x T bytes each). Tries every split, as
    ActivationOffload makes it (the first checkpoints to the host), and returns the best: tokens, how many
    checkpoints stay on the GPU, which memory binds ("gpu": the GPU alone, the host has room; "host": the
    host is full and the GPU has room; "gpu+host": the host is full and the checkpoints it cannot take fill
    the GPU), and both usages."""
    best = {"tokens": 0, "gpu_checkpoints": checkpoints, "binding": "gpu"}
    slabs = host_budget // slab_bytes
    for on_gpu in range(checkpoints + 1):
        gpu_tokens = max(0.0, gpu_free - fixed) / (per_token + on_gpu * checkpoint_per_token)
        on_host = checkpoints - on_gpu
        host_tokens = float("inf") if on_host == 0 else (slabs // on_host) * slab_bytes / checkpoint_per_token
        tokens = int(min(gpu_tokens, host_tokens))
        if tokens > best["tokens"]:
            binding = "host" if host_tokens < gpu_tokens else "gpu+host" if on_gpu else "gpu"
            best = {"tokens": tokens, "gpu_checkpoints": on_gpu, "binding": binding}
    t, k = best["tokens"], best["gpu_checkpoints"]
    best["gpu_bytes"] = fixed + per_token * t + k * checkpoint_per_token * t
    best["host_bytes"] = (checkpoints - k) * -(-checkpoint_per_token * t // slab_bytes) * slab_bytes
    return best


class _Saved:
    """One offloaded layer input: its slabs, and the events that order the copies."""

    __slots__ = ("slabs", "shape", "dtype", "device", "stored", "prefetched", "ready")

    def __init__(self, slabs: list[torch.Tensor], t: torch.Tensor, stored):
        self.slabs, self.shape, self.dtype, self.device, self.stored = slabs, t.shape, t.dtype, t.device, stored
        self.prefetched: torch.Tensor | None = None
        self.ready = None


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class ActivationOffload:
    def __init__(self, device: torch.device, host_budget_bytes: int | None = None, slab_bytes: int = SLAB_BYTES):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        budget = host_budget(host_memory_available()) if host_budget_bytes is None else host_budget_bytes
        self.slab_bytes = slab_bytes
        self.max_slabs = budget // slab_bytes
        self.slabs_made = 0
        self.free: list[torch.Tensor] = []  # slabs no offloaded input holds now
        self.saved: list[_Saved] = []  # this forward's offloaded layer inputs, in layer order
        self.offloaded = 0  # layer inputs moved out, over the run (tests and logs)
        self.kept = 0  # layer inputs left on the device because the host budget was full, over the run

    @property
    def host_bytes(self) -> int:
        """Host memory pinned by the offload (all its slabs, in use or pooled)."""
        return self.slabs_made * self.slab_bytes

    def begin(self) -> None:
        """A new forward pass (the previous one's backward is done): its slabs go back to the pool.
        Their copies back were queued on the side stream, which the next offload copies follow."""
        for entry in self.saved:
            self.free.extend(entry.slabs)
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
    def _slabs(self, nbytes: int) -> list[torch.Tensor] | None:
        need = -(-nbytes // self.slab_bytes)
        if need > len(self.free) + self.max_slabs - self.slabs_made:
            return None
        while len(self.free) < need:
            self.free.append(torch.empty(self.slab_bytes, dtype=torch.uint8, pin_memory=self.cuda))
            self.slabs_made += 1
        return [self.free.pop() for _ in range(need)]

    def _pieces(self, entry: _Saved):
        """(slab view, start, end) per slab: the entry's bytes [start, end) live in that view."""
        total = entry.shape.numel() * entry.dtype.itemsize
        for i, slab in enumerate(entry.slabs):
            start = i * self.slab_bytes
            end = min(total, start + self.slab_bytes)
            yield slab[:end - start], start, end

    def _store(self, t: torch.Tensor):
        slabs = self._slabs(t.numel() * t.element_size())
        if slabs is None:  # the host budget is full: this layer input stays where it is
            self.kept += 1
            return t
        self.offloaded += 1
        t = t.contiguous()
        if not self.cuda:
            entry = _Saved(slabs, t, None)
            for view, start, end in self._pieces(entry):
                view.copy_(_bytes(t)[start:end])
        else:
            produced = torch.cuda.current_stream(self.device).record_event()
            entry = _Saved(slabs, t, None)
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(produced)
                flat = _bytes(t)
                for view, start, end in self._pieces(entry):
                    view.copy_(flat[start:end], non_blocking=True)
                t.record_stream(self.stream)  # the allocator keeps t's memory until these copies are done
            entry.stored = self.stream.record_event()
        self.saved.append(entry)
        return entry

    def _copy_back(self, entry: _Saved, out: torch.Tensor) -> None:
        flat = _bytes(out)
        for view, start, end in self._pieces(entry):
            flat[start:end].copy_(view, non_blocking=self.cuda)

    def _fetch(self, entry: _Saved) -> None:
        """Start copying an entry back to the GPU on the side stream."""
        compute = torch.cuda.current_stream(self.device)
        gpu = torch.empty(entry.shape, dtype=entry.dtype, device=entry.device)  # compute stream's memory
        self.stream.wait_event(compute.record_event())  # ... once the compute stream is done with it
        with torch.cuda.stream(self.stream):
            self._copy_back(entry, gpu)
        entry.prefetched, entry.ready = gpu, self.stream.record_event()

    def _load(self, entry: _Saved) -> torch.Tensor:
        if not self.cuda:
            out = torch.empty(entry.shape, dtype=entry.dtype)
            self._copy_back(entry, out)
            return out
        if entry.prefetched is None:
            self._fetch(entry)
        gpu, ready = entry.prefetched, entry.ready
        entry.prefetched = entry.ready = None
        torch.cuda.current_stream(self.device).wait_event(ready)
        at = next((i for i, e in enumerate(self.saved) if e is entry), None)
        if at is not None and at > 0 and self.saved[at - 1].prefetched is None:
            self._fetch(self.saved[at - 1])  # the layer backward needs next
        return gpu
