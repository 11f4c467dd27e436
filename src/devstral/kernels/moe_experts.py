"""A MoE layer's experts stacked per projection, and the two ways to run them on the GPU.

`ExpertStack` holds gate (w1), up (w3) and down (w2) of all E experts as one weight each: bf16
[E, N, K], or a GGUF planar weight of E * N rows (the rows of a llama.cpp `ffn_*_exps` tensor, in
the same order). Each expert's own module keeps working on a view of it (model/moe.py rebinds them),
so stacking costs no memory.

* Decode and small batches (`decode`): two launches (moe_gemv.py) -- gate+up with SwiGLU applied per
  (token, slot) pair, then down mixing each token's k pairs with the router weights; or, where the
  measured launch constants say so ("cat"), gate+up writing [gate | up] rows (one weight a program)
  and down's activation quantization applying the SwiGLU. Sizes come from
  shapes only and the expert ids stay on the device: CUDA-graph safe.
* Prefill (`prefill`): pairs sorted by expert, the tokens gathered once into expert order, then one
  launch a projection over all experts, group boundaries read on the device (no host sync). bf16 experts
  go through torch's grouped GEMM (`torch._grouped_mm`, CUTLASS on Hopper). GGUF experts, up to
  GROUPED_MAX_PAIRS_PER_EXPERT pairs per expert, are dequantized, one projection's experts at a time,
  into a bf16 scratch of E x N x K (0.94 GB at Mixtral-8x7B's shape) for torch's grouped GEMM (the
  default, DEVSTRAL_MOE_GROUPED=dequant); or, with DEVSTRAL_MOE_GROUPED=triton, go through
  moe_grouped_gemm.py, which dequantizes each weight tile in registers (gguf_gemm.py's K loop): gate,
  up, silu_mul, down, no scratch. Writing the scratch and reading it back is about half the time of a
  Mixtral Q4_K_M 512-token prefill on an H200, but the dense tile GEMM whose K loop the Triton path runs
  measured far below cuBLAS there (docs/architecture.md, "Mixture of experts on the GPU"), and so did
  it: 1511 tok/s against 5994 at a 512-token Mixtral Q4_K_M prefill on the H200.
  Above that many pairs, where a grouped path cannot run (fp32 activations, no Ampere (Triton) or Hopper
  (torch's grouped GEMM), unaligned rows for torch's) or the scratch does not fit, each expert's
  contiguous slice runs through the dense quantized linear (dequantize + cuBLAS at large slices) after
  one host read of the group sizes: one sync and E x 3 launches per layer, which measured slower at
  small groups only (GROUPED_MAX_PAIRS_PER_EXPERT).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from devstral.errors import DevstralError
from devstral.kernels import use_triton
from devstral.kernels.gguf_pack import FORMATS, PackedGGUF

DECODE_MAX_PAIRS = 64  # (token, expert) pairs up to which the routed GEMV beats gather + GEMM
# GGUF experts: pairs per expert up to which a grouped launch beats one quantized linear per expert.
# Measured for the dequantize-into-scratch path (DEVSTRAL_MOE_GROUPED=dequant), Mixtral-8x7B Q4_K_M on an
# H200: 128 per expert (512-token prefill) 4936 tok/s grouped against 4375; 512 per expert (2048 tokens)
# 13.9k against 17.1k. Both dequantize every expert once, so the difference there is the matmuls: cuBLAS
# per expert against the grouped GEMM (not profiled apart). The Triton grouped GEMM keeps the same bound
# until measured: it dequantizes each weight tile once per row tile (BM pairs), so its share of ALU work
# grows with the groups, while the per-expert path amortizes one dequantization over the whole slice.
GROUPED_MAX_PAIRS_PER_EXPERT = 256
GROUPED_MODES = ("dequant", "triton")  # DEVSTRAL_MOE_GROUPED's values, the default first
log = logging.getLogger(__name__)
_grouped_mm_refused: str | None = None  # torch's grouped GEMM raised once: not tried again
_scratch_refused: str | None = None  # the dequantized experts' scratch did not fit once: not tried again
_routed_only = 0  # > 0 while the engine warms up and captures its decode graphs


def grouped_mode() -> str:
    """How GGUF experts prefill, DEVSTRAL_MOE_GROUPED: "dequant" (the default), every expert of a
    projection dequantized into a bf16 scratch, then torch's grouped GEMM (the memory plan reserves the
    scratch: engine._expert_scratch_bytes); "triton", moe_grouped_gemm.py's dequantize-in-tiles grouped
    GEMM (no scratch; not yet the default: see the module docstring)."""
    mode = os.environ.get("DEVSTRAL_MOE_GROUPED") or GROUPED_MODES[0]
    if mode not in GROUPED_MODES:
        raise DevstralError(f"DEVSTRAL_MOE_GROUPED={mode}: not one of {', '.join(GROUPED_MODES)}")
    return mode


@contextlib.contextmanager
def routed_only():
    """Every MoE layer takes the routed GEMV, whatever the batch: the engine wraps its graph warm-up and
    capture in this, so the kernels a graph replays are the ones compiled before it was captured."""
    global _routed_only
    _routed_only += 1
    try:
        yield
    finally:
        _routed_only -= 1


class PackedRows:
    """Rows r0..r1 of a stacked planar weight, readable wherever a PackedGGUF is (the quantized
    kernels read qtype, n, k and the field arrays). `source` returns the current stack, so the view
    follows the stack when the module moves."""

    def __init__(self, source, r0: int, r1: int):
        self.source, self.r0, self.r1 = source, r0, r1
        stack = source()
        self.qtype, self.k, self.n = stack.qtype, stack.k, r1 - r0
        self.fmt = FORMATS[self.qtype]

    @property
    def arrays(self) -> dict[str, torch.Tensor]:
        return {name: a[self.r0:self.r1] for name, a in self.source().arrays.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source()[name][self.r0:self.r1]

    def get(self, name: str) -> torch.Tensor | None:
        a = self.source().get(name)
        return None if a is None else a[self.r0:self.r1]

    @property
    def device(self) -> torch.device:
        return self.source().device

    def nbytes(self) -> int:
        return 0  # the stack owns the bytes

    def rebind(self, buf: torch.Tensor) -> PackedRows:
        return self


def stack_packed(parts: list) -> PackedGGUF:
    """One planar weight of sum(n) rows from per-expert planar weights of one type and K."""
    first = parts[0]
    out = PackedGGUF.empty(first.qtype, sum(p.n for p in parts), first.k, first.device)
    row = 0
    for p in parts:
        for name in out.arrays:
            out[name][row:row + p.n].copy_(p[name])
        row += p.n
    return out


class ExpertStack:
    """gate/up/down of E experts; `gate`, `up`, `down` are [E, N, K] tensors or PackedGGUF of E * N rows."""

    def __init__(self, gate, up, down, n_experts: int, hidden: int, dim: int):
        self.gate, self.up, self.down = gate, up, down
        self.n_experts, self.hidden, self.dim = n_experts, hidden, dim

    @property
    def quantized(self) -> bool:
        return isinstance(self.gate, PackedGGUF)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, D], experts/weights [T, k] -> the weighted expert mix [T, D] in x's dtype (plus residual
        [T, D] when given)."""
        if experts.numel() <= DECODE_MAX_PAIRS or _routed_only or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return self.decode(x, experts, weights, residual)
        y = self.prefill(x, experts, weights)
        return y if residual is None else residual + y

    def decode_xq_layouts(self, top_k: int, max_tokens: int) -> tuple[int, ...]:
        """The gguf_xq layouts decode() quantizes x in (gate_up's plan: xq) at 1..max_tokens tokens: what
        the norm before the layer writes beside its output instead (kernels/rms_norm_triton.py)."""
        if not self.quantized:
            return ()
        from devstral.kernels import gguf_xq, moe_gemv
        from devstral.kernels.gguf_decode import qt_code

        sms = _sms(self.gate.device)
        weights = (self.gate,) if self.gate.qtype == self.up.qtype else (self.gate, self.up)  # as decode() runs them
        used = [p for p in weights if any(
            moe_gemv.quantizes_input(p, t * top_k, self.hidden, self.dim, top_k, sms, p.device)
            for t in range(1, max_tokens + 1) if t * top_k <= DECODE_MAX_PAIRS)]
        return tuple(dict.fromkeys(gguf_xq.layout_for(qt_code(p.qtype)) for p in used))

    def decode(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        from devstral.kernels import moe_gemv
        from devstral.kernels.silu_mul import silu_mul

        t, k = experts.shape
        ids, weights = experts.contiguous(), weights.contiguous()
        x = x.contiguous()
        sms = _sms(x.device)
        out = torch.empty(t, self.dim, dtype=x.dtype, device=x.device)
        residual = residual if residual is None or residual.stride(-1) == 1 else residual.contiguous()
        if self.quantized:
            cfg = moe_gemv.plan("gate_up", self.gate.qtype.name, t * k, self.hidden, x.shape[1], k, sms, x.device)
            if moe_gemv.concatenates(cfg, self.gate, self.up):  # [gate | up] rows; down applies the SwiGLU
                pre = torch.empty(t * k, 2 * self.hidden, dtype=x.dtype, device=x.device)
                moe_gemv.gate_up(x, self.gate, self.up, pre, ids, n=self.hidden, top_k=k, sms=sms, config=cfg)
                return moe_gemv.down(pre, self.down, out, ids, weights, n=self.dim, top_k=k, sms=sms,
                                     residual=residual, glu=True)
        h = torch.empty(t * k, self.hidden, dtype=x.dtype, device=x.device)
        if self.quantized and self.gate.qtype != self.up.qtype:  # one type per launch: gate, up apart
            g, u = torch.empty_like(h), torch.empty_like(h)
            moe_gemv.gate_up(x, self.gate, None, g, ids, n=self.hidden, top_k=k, sms=sms)
            moe_gemv.gate_up(x, self.up, None, u, ids, n=self.hidden, top_k=k, sms=sms)
            h = silu_mul(g, u)
        else:
            moe_gemv.gate_up(x, self.gate, self.up, h, ids, n=self.hidden, top_k=k, sms=sms)
        return moe_gemv.down(h, self.down, out, ids, weights, n=self.dim, top_k=k, sms=sms, residual=residual)

    def prefill(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from devstral.kernels.silu_mul import silu_mul

        t, k = experts.shape
        ids = experts.reshape(-1)
        order = torch.argsort(ids, stable=True)
        xs = x.index_select(0, order // k)  # tokens in expert order, one row per pair
        # counts by scatter-add, not bincount: on CUDA bincount reads the ids' max on the host
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device).scatter_add_(0, ids, torch.ones_like(ids))
        ys = None
        if self._tiled_ok(x, ids.numel()):
            ys = self._tiled(xs, counts)
        elif self._grouped_ok(x, ids.numel()):
            ys = self._grouped(xs, counts)
        if ys is None:
            ys = torch.empty(t * k, self.dim, dtype=x.dtype, device=x.device)
            start = 0
            for e, c in enumerate(counts.tolist()):  # the one host sync of this path
                if c:
                    xe = xs[start:start + c]
                    h = silu_mul(self._linear(xe, self.gate, e, self.hidden), self._linear(xe, self.up, e, self.hidden))
                    ys[start:start + c] = self._linear(h, self.down, e, self.dim)
                start += c
        y = torch.empty(t * k, self.dim, dtype=torch.float32, device=x.device)
        y[order] = ys.float() * weights.reshape(-1)[order, None].float()  # back to (token, slot) order
        return y.view(t, k, self.dim).sum(dim=1).to(x.dtype)

    def _tiled_ok(self, x: torch.Tensor, pairs: int) -> bool:
        """GGUF experts through moe_grouped_gemm.py: 16-bit activations (its dot's operand type: fp32 ones
        would be rounded to bf16, which the per-expert path does not do), a device the Triton kernels run on
        (tl.dot in bf16 needs Ampere or newer), DEVSTRAL_MOE_GROUPED=triton."""
        if not self.quantized or pairs > GROUPED_MAX_PAIRS_PER_EXPERT * self.n_experts:
            return False
        if x.dtype not in (torch.bfloat16, torch.float16) or not use_triton(x) or grouped_mode() != "triton":
            return False
        return not x.is_cuda or torch.cuda.get_device_capability(x.device) >= (8, 0)

    def _tiled(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """gate, up, SwiGLU, down: three grouped launches over the quantized experts and one silu_mul."""
        from devstral.kernels import moe_grouped_gemm
        from devstral.kernels.silu_mul import silu_mul

        g = moe_grouped_gemm.grouped_gemm(xs, counts, self.gate, self.hidden)
        u = moe_grouped_gemm.grouped_gemm(xs, counts, self.up, self.hidden)
        return moe_grouped_gemm.grouped_gemm(silu_mul(g, u), counts, self.down, self.dim)

    def _grouped_ok(self, x: torch.Tensor, pairs: int) -> bool:
        if self.quantized:  # dequantized to x's dtype, only where DEVSTRAL_MOE_GROUPED asks for it
            return (grouped_mode() == "dequant" and _scratch_refused is None
                    and pairs <= GROUPED_MAX_PAIRS_PER_EXPERT * self.n_experts and _grouped_mm_ok(x, self.hidden, x.dtype))
        return _grouped_mm_ok(x, self.hidden, self.gate.dtype)

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        """The experts through torch's grouped GEMM (GGUF ones dequantized into one scratch first), or
        None where this build refuses the call or the scratch does not fit (both known on the host, before
        anything is queued): the caller then runs one matmul per expert."""
        from devstral.kernels.silu_mul import silu_mul

        global _grouped_mm_refused, _scratch_refused
        offs = counts.cumsum(0).to(torch.int32)
        scratch = None
        if self.quantized:
            try:
                scratch = torch.empty(self.n_experts * self.hidden * self.dim, dtype=xs.dtype, device=xs.device)
            except torch.OutOfMemoryError:
                _scratch_refused = (f"{self.n_experts * self.hidden * self.dim * xs.element_size() / 2**30:.2f} GiB "
                                    "of dequantized experts")
                log.warning("note: no room for %s (the grouped prefill's scratch); one quantized matmul per expert "
                            "instead: lower --gpu-memory-fraction, --max-batched-tokens or --ctx-size to leave room",
                            _scratch_refused)
                return None
        try:
            g = torch._grouped_mm(xs, self._weights(self.gate, scratch, self.hidden, self.dim), offs=offs)
            u = torch._grouped_mm(xs, self._weights(self.up, scratch, self.hidden, self.dim), offs=offs)
            return torch._grouped_mm(silu_mul(g, u), self._weights(self.down, scratch, self.dim, self.hidden),
                                     offs=offs)
        except RuntimeError as e:
            _grouped_mm_refused = str(e).splitlines()[0]
            log.warning("note: torch._grouped_mm refused the experts (%s); one matmul per expert instead",
                        _grouped_mm_refused)
            return None

    def _weights(self, w, scratch: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
        """[E, K, N] for the grouped GEMM: a bf16 stack transposed, or a GGUF stack dequantized into the
        scratch (the previous projection's matmul, queued before on the same stream, has read it)."""
        if not isinstance(w, PackedGGUF):
            return w.transpose(1, 2)
        from devstral.kernels.gguf_dequant import dequantize

        out = scratch[:self.n_experts * n * k].view(self.n_experts * n, k)
        return dequantize(w, dtype=scratch.dtype, out=out).view(self.n_experts, n, k).transpose(1, 2)

    @staticmethod
    def _linear(x: torch.Tensor, w, e: int, n: int) -> torch.Tensor:
        if isinstance(w, PackedGGUF):
            from devstral.kernels.gguf_linear import linear

            return linear(x, PackedRows(lambda: w, e * n, (e + 1) * n))
        return x @ w[e].t()


def _grouped_mm_ok(x: torch.Tensor, hidden: int, w_dtype: torch.dtype) -> bool:
    """torch's grouped GEMM: bf16, 16-byte-aligned rows (x's and the hidden activations'); on CUDA it
    needs Hopper or newer."""
    if _grouped_mm_refused is not None or not hasattr(torch, "_grouped_mm") or x.dtype != torch.bfloat16 or w_dtype != torch.bfloat16:
        return False
    if x.shape[1] % 8 or hidden % 8:
        return False
    return not x.is_cuda or torch.cuda.get_device_capability(x.device) >= (9, 0)


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: widest tiles, fewest programs
    from devstral.kernels.gguf_config import sm_count

    return sm_count(device)
