"""Decode attention over the paged KV cache: split-KV flash decoding, GQA-aware (Triton). Semantics:
`paged_attention.decode_attention_ref`.

Pass 1, grid (sequence, kv head, split): one program reads its share of one sequence's keys and
values for one kv head once, and serves all the query heads of that GQA group with them (a
[BLOCK_H >= 16, head_dim] query tile, so both products run on tensor cores). Tiles of BLOCK_N tokens
are gathered through the block table, dequantized in registers (fp8 scales are folded into the
scores and, except for fp16 queries, the probabilities; q8_0/q4_0 are expanded to q's dtype as the
reference does), and reduced with an online softmax in base 2. Each split writes its normalized
partial output and log-sum-exp; pass 2, grid (sequence, query head), merges the splits. With one
split, pass 1 writes the output itself and pass 2 is skipped.

CUDA graphs: the grid depends only on the batch size, `max_context` and the device (how many
programs it runs at once, see `num_splits`), never on the values of `context_lens`. Each row divides its own context (or window) evenly over the splits, in
whole tiles, so a short row uses few splits and the rest exit at once; a padding row (context_len 1)
costs one tile. Bytes read: every key and value in the window once, plus the partials (B x H x
splits x (head_dim + 1) float32, written and read once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from devstral.kernels import pdl
from devstral.kernels.interpret_triton import kernels_for, on_interpreter
from devstral.kernels.kv_format import KVLayer
from devstral.kernels.kv_store_triton import KIND_CODES, fp8_supported
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait

LOG2E = 1.4426950408889634
MAX_SPLITS = 128
MIN_SPLIT_TOKENS = 256  # a split shorter than this at max_context costs more in partials than it buys
WAVE_EFFICIENCY = 0.9  # the fewest splits whose programs fill this much of the GPU's last wave
DEFAULT_CTAS_PER_SM = 3  # the default config on an H100/H200 (72 KB of shared memory, 128 registers)


class DecodeConfig:
    """Launch parameters of pass 1.

    num_stages 5 is the fewest with which Triton 3.6's pipeliner double-buffers the K/V tiles behind
    their block-table lookup (seen in the sm_90a TTGIR, checked by tests/test_kernels_compile.py): with
    fewer, each tile has one buffer and its load never overlaps the previous tile's math.
    `splits` None: chosen by `num_splits` from the batch, max_context and how many programs the GPU
    runs at once, which is `ctas_per_sm` x SMs (None: read from the compiled kernel's registers and
    shared memory)."""

    def __init__(self, block_n: int = 64, num_warps: int = 4, num_stages: int = 5, splits: int | None = None,
                 ctas_per_sm: int | None = None):
        self.block_n, self.num_warps, self.num_stages = block_n, num_warps, num_stages
        self.splits, self.ctas_per_sm = splits, ctas_per_sm

    def __repr__(self) -> str:
        return (f"DecodeConfig(block_n={self.block_n}, num_warps={self.num_warps}, num_stages={self.num_stages}, "
                f"splits={self.splits}, ctas_per_sm={self.ctas_per_sm})")


def num_splits(batch: int, n_kv_heads: int, max_context: int, slots: int, cfg: DecodeConfig) -> int:
    """Splits per row: the fewest whose batch x kv heads x splits programs fill the last of the waves
    of `slots` concurrent programs to WAVE_EFFICIENCY (a long row's splits all take the same time, so
    a partly filled last wave idles the rest of the GPU), else the best fill; at most one split per
    MIN_SPLIT_TOKENS of max_context."""
    if cfg.splits is not None:
        return max(1, cfg.splits)
    rows = batch * n_kv_heads
    useful = max(1, min(MAX_SPLITS, triton.cdiv(max_context, max(MIN_SPLIT_TOKENS, cfg.block_n))))
    best, best_fill = 1, 0.0
    for splits in range(1, useful + 1):
        programs = rows * splits
        fill = programs / (triton.cdiv(programs, slots) * slots)
        if fill >= WAVE_EFFICIENCY:
            return splits
        if fill > best_fill + 1e-9:
            best, best_fill = splits, fill
    return best


SMEM_SCRATCH = 16 * 1024  # shared memory pass 1 takes besides its K/V tiles (query tile, layout conversions)


def fitting_stages(cfg: DecodeConfig, head_dim: int, cache_itemsize: int, smem_per_block: int | None) -> int:
    """cfg.num_stages, or fewer where the pipelined K/V tiles of this cache dtype would not fit in a
    block's shared memory. Triton 3.6 keeps num_stages - 1 buffers of one [block_n, head_dim] tile
    plus the other tile (sm_90 builds: fp32 cache, block_n 128, 5 stages take 279,680 bytes, over the
    H200's 232,448; 3 stages take 148,096); the 2-byte and quantized caches are not multi-buffered."""
    if smem_per_block is None:
        return cfg.num_stages
    tile = cfg.block_n * head_dim * cache_itemsize
    stages = cfg.num_stages
    while stages > 1 and stages * tile + SMEM_SCRATCH > smem_per_block:
        stages -= 1
    return stages


def _smem_per_block(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None) or props.shared_memory_per_block


def concurrent_programs(kernel, device: torch.device, cfg: DecodeConfig) -> int:
    """How many pass-1 programs the GPU runs at once: SMs x programs per SM, the latter from the
    compiled kernel's registers, shared memory and warps as Triton's fused-softmax tutorial computes
    occupancy (or cfg.ctas_per_sm, or a default)."""
    if device.type != "cuda":
        return 4 * DEFAULT_CTAS_PER_SM
    props = torch.cuda.get_device_properties(device)
    per_sm = cfg.ctas_per_sm or _ctas_per_sm(kernel, device, props) or DEFAULT_CTAS_PER_SM
    return props.multi_processor_count * per_sm


def _ctas_per_sm(kernel, device: torch.device, props) -> int | None:
    try:
        from triton.runtime import driver

        kernel._init_handles()  # loads the binary: n_regs is known from then on
        regs_per_sm = driver.active.utils.get_device_properties(device.index or 0)["max_num_regs"]
        return blocks_per_sm(kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps, regs_per_sm=regs_per_sm,
                             smem_per_sm=props.shared_memory_per_multiprocessor,
                             threads_per_sm=props.max_threads_per_multi_processor)
    except (AttributeError, KeyError, RuntimeError, TypeError):
        return None


def blocks_per_sm(regs: int, smem: int, num_warps: int, *, regs_per_sm: int, smem_per_sm: int,
                  threads_per_sm: int) -> int:
    """Resident blocks per SM for a kernel's registers per thread, shared memory per block and warps:
    registers are allocated per warp in units of 256, and the driver reserves 1 KB of shared memory
    per block (CUDA's occupancy rules for sm_80/sm_90)."""
    by_regs = regs_per_sm // (triton.cdiv(max(regs, 1) * 32, 256) * 256 * num_warps)
    by_smem = smem_per_sm // (smem + 1024) if smem else 32
    return max(1, min(by_regs, by_smem, threads_per_sm // (32 * num_warps), 32))


@triton.jit
def _split_range(length, s, num_splits, window, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Keys [lo, length) of a row; split s covers [start, end) of them in whole BLOCK_N tiles."""
    if HAS_WINDOW:
        lo = tl.maximum(length - window, 0)
    else:
        lo = length * 0
    chunk = tl.cdiv(tl.cdiv(length - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + s * chunk
    end = tl.minimum(start + chunk, length)
    return start, end, chunk, lo


@triton.jit
def _tile(c_ptr, s_ptr, rows, scale_rows, nmask, d, HEAD_DIM: tl.constexpr, KIND: tl.constexpr, OUT_T: tl.constexpr,
          UNSCALED: tl.constexpr):
    """A [BLOCK_N, HEAD_DIM] tile of keys or values in OUT_T, dequantized as `kv_format.dequantize`
    does; with UNSCALED an fp8 tile comes back without its per-token scale (the caller folds it in)."""
    m2 = nmask[:, None]
    if KIND == 1 and not UNSCALED:  # fp8 e4m3, one float32 scale per token
        x = tl.load(c_ptr + rows[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
        tile = (x * tl.load(s_ptr + scale_rows, mask=nmask, other=0.0)[:, None]).to(OUT_T)
    elif KIND == 2:  # q8_0
        x = tl.load(c_ptr + rows[:, None] + d[None, :], mask=m2, other=0).to(tl.float32)
        sc = tl.load(s_ptr + scale_rows[:, None] + (d // 32)[None, :], mask=m2, other=0.0).to(tl.float32)
        tile = (x * sc).to(OUT_T)
    elif KIND == 3:  # q4_0: value i of a 32-block is nibble i // 16 of byte i % 16
        col = (d // 32) * 16 + d % 16
        shift = ((d // 16) % 2) * 4
        byte = tl.load(c_ptr + rows[:, None] + col[None, :], mask=m2, other=0).to(tl.int32)
        nib = (byte >> shift[None, :]) & 15
        sc = tl.load(s_ptr + scale_rows[:, None] + (d // 32)[None, :], mask=m2, other=0.0).to(tl.float32)
        tile = ((nib.to(tl.float32) - 8.0) * sc).to(OUT_T)
    else:  # float kinds and fp8
        tile = tl.load(c_ptr + rows[:, None] + d[None, :], mask=m2, other=0.0).to(OUT_T)
    return tile


@triton.jit(do_not_specialize=["window", "num_splits"])
def _decode_split_kernel(q_ptr, q_sb, q_sh, k_ptr, v_ptr, ks_ptr, vs_ptr, c_sb, c_so, c_sh, s_sb, s_so, s_sh,
                         table_ptr, table_sb, len_ptr, out_ptr, out_sb, out_sh, part_out_ptr, part_lse_ptr,
                         scale_log2e, window, num_splits, n_heads,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_N: tl.constexpr, KIND: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         DIRECT: tl.constexpr, DOT_T: tl.constexpr, PRECISION: tl.constexpr,
                         FOLD_V_SCALE: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: the o projection's GEMV may start now; wait for the kernel before
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(len_ptr + b)
    start, end, chunk, lo = _split_range(length, s, num_splits, window, BLOCK_N, HAS_WINDOW)
    if start < end:
        Q_T = q_ptr.dtype.element_ty
        h = tl.arange(0, BLOCK_H)
        hmask = h < GROUP
        heads = kvh * GROUP + h
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b.to(tl.int64) * q_sb + heads[:, None] * q_sh + d[None, :], mask=hmask[:, None],
                    other=0.0).to(DOT_T)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
        table = table_ptr + b.to(tl.int64) * table_sb
        for n0 in tl.range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            page = tl.load(table + n // PAGE, mask=nmask, other=0).to(tl.int64)
            slot_at = page * c_sb + (n % PAGE) * c_so + kvh * c_sh
            scale_at = page * s_sb + (n % PAGE) * s_so + kvh * s_sh
            k = _tile(k_ptr, ks_ptr, slot_at, scale_at, nmask, d, HEAD_DIM, KIND, Q_T, True).to(DOT_T)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e
            if KIND == 1:
                scores = scores * tl.load(ks_ptr + scale_at, mask=nmask, other=0.0)[None, :]
            scores = tl.where(nmask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            if KIND == 1 and FOLD_V_SCALE:
                p = p * tl.load(vs_ptr + scale_at, mask=nmask, other=0.0)[None, :]
            v = _tile(v_ptr, vs_ptr, slot_at, scale_at, nmask, d, HEAD_DIM, KIND, Q_T, FOLD_V_SCALE).to(DOT_T)
            acc = tl.dot(p.to(DOT_T), v, acc * alpha[:, None], input_precision=PRECISION)
            m = m_new
        out = acc / l_sum[:, None]
        if DIRECT:
            tl.store(out_ptr + b.to(tl.int64) * out_sb + heads[:, None] * out_sh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
        else:
            row = (b.to(tl.int64) * n_heads + heads) * num_splits + s
            tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=hmask[:, None])
            tl.store(part_lse_ptr + row, m + tl.log2(l_sum), mask=hmask)


@triton.jit(do_not_specialize=["window", "num_splits"])
def _decode_merge_kernel(part_out_ptr, part_lse_ptr, len_ptr, out_ptr, out_sb, out_sh, window, num_splits,
                         n_heads, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_WINDOW: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: the o projection's GEMV may start now; wait for the split pass
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    length = tl.load(len_ptr + b)
    _, _, chunk, lo = _split_range(length, 0, num_splits, window, BLOCK_N, HAS_WINDOW)
    used = tl.cdiv(length - lo, chunk)
    s = tl.arange(0, BLOCK_S)
    smask = s < used
    row = (b.to(tl.int64) * n_heads + h) * num_splits + s
    lse = tl.load(part_lse_ptr + row, mask=smask, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))
    weight = weight / tl.sum(weight, axis=0)
    d = tl.arange(0, HEAD_DIM)
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(parts * weight[:, None], axis=0)
    tl.store(out_ptr + b.to(tl.int64) * out_sb + h * out_sh + d, out.to(out_ptr.dtype.element_ty))


def _supported(q: torch.Tensor, layer: KVLayer) -> bool:
    head_dim, page = q.shape[-1], layer.k.shape[1]
    pow2 = lambda x: x > 0 and not x & (x - 1)  # noqa: E731
    return (pow2(head_dim) and head_dim >= 16 and pow2(page) and q.shape[1] % layer.k.shape[2] == 0
            and layer.k.stride(-1) == 1 and layer.k.stride() == layer.v.stride()
            and (layer.kind != "fp8" or fp8_supported(q.device)))


def decode_attention_triton(q: torch.Tensor, layer: KVLayer, block_tables: torch.Tensor, context_lens: torch.Tensor,
                            scale: float, window: int | None = None, *, max_context: int | None = None,
                            config: DecodeConfig | None = None) -> torch.Tensor:
    """q [B, n_heads, head_dim] (last dim contiguous) -> [B, n_heads, head_dim] in q's dtype.
    `max_context` bounds every context_len (None: the block table's width)."""
    if not _supported(q, layer):
        from devstral.kernels.paged_attention import decode_attention_ref

        return decode_attention_ref(q, layer, block_tables, context_lens, scale, window)
    B, H, D = q.shape
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    launch = _Launch(q if q.stride(-1) == 1 else q.contiguous(), layer, block_tables, context_lens, scale, window,
                     out, config or DecodeConfig())
    splits = launch.splits(max_context)
    if splits == 1:
        launch.split_pass((B, launch.n_kv_heads, 1), 1, out, out)
        return out
    part_out = torch.empty((B, H, splits, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B, H, splits), dtype=torch.float32, device=q.device)
    launch.split_pass((B, launch.n_kv_heads, splits), splits, part_out, part_lse)
    block_s = triton.next_power_of_2(splits)
    launch.kernels._decode_merge_kernel[(B, H)](
        part_out, part_lse, context_lens, out, out.stride(0), out.stride(1), window or 0, splits, H,
        HEAD_DIM=D, BLOCK_S=block_s, BLOCK_N=launch.cfg.block_n, HAS_WINDOW=window is not None,
        PDL=launch.pdl, num_warps=4 if block_s * D <= 8192 else 8, launch_pdl=launch.pdl)
    return out


def planned_splits(q: torch.Tensor, layer: KVLayer, block_tables: torch.Tensor, context_lens: torch.Tensor,
                   window: int | None = None, *, max_context: int | None = None,
                   config: DecodeConfig | None = None) -> int:
    """The split count `decode_attention_triton` uses for these arguments (for reports)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return _Launch(q, layer, block_tables, context_lens, 1.0, window, out, config or DecodeConfig()).splits(max_context)


_SLOTS: dict[tuple, int] = {}  # concurrent pass-1 programs per (device, compiled variant)


class _Launch:
    """One decode call's arguments to pass 1, and its split count."""

    def __init__(self, q, layer: KVLayer, block_tables, context_lens, scale: float, window: int | None, out,
                 cfg: DecodeConfig):
        B, H, D = q.shape
        self.q, self.layer, self.block_tables, self.window, self.cfg = q, layer, block_tables, window, cfg
        self.batch, self.n_kv_heads, page = B, layer.k.shape[2], layer.k.shape[1]
        self.bound_default = block_tables.shape[1] * page
        self.kernels = kernels_for(q, __name__)
        self.interpreted = on_interpreter(q)
        scales = (layer.k_scale, layer.v_scale) if layer.k_scale is not None else (layer.k, layer.v)
        ss = scales[0].stride()
        self.args = (q, q.stride(0), q.stride(1), layer.k, layer.v, scales[0], scales[1],
                     layer.k.stride(0), layer.k.stride(1), layer.k.stride(2), ss[0], ss[1], ss[2],
                     block_tables, block_tables.stride(0), context_lens, out, out.stride(0), out.stride(1))
        self.tail = (scale * LOG2E, window or 0)
        dot_t = tl.float32 if self.interpreted or q.dtype == torch.float32 else (
            tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16)
        self.pdl = pdl.enabled(q.device)
        self.constexprs = dict(PDL=self.pdl, GROUP=H // self.n_kv_heads, HEAD_DIM=D, PAGE=page,
                               BLOCK_H=max(16, triton.next_power_of_2(H // self.n_kv_heads)), BLOCK_N=cfg.block_n,
                               KIND=KIND_CODES[layer.kind], HAS_WINDOW=window is not None, DOT_T=dot_t,
                               PRECISION="ieee" if dot_t == tl.float32 else "tf32", num_warps=cfg.num_warps,
                               num_stages=fitting_stages(cfg, D, layer.k.element_size(),
                                                         None if self.interpreted else _smem_per_block(q.device)),
                               # fp8 value scales multiply the probabilities, except in fp16, whose
                               # range would flush p x scale (scales go down to ~1e-6) to zero
                               FOLD_V_SCALE=q.dtype != torch.float16)

    def split_pass(self, grid, splits: int, part_out, part_lse, *, warmup: bool = False):
        args = (*self.args, part_out, part_lse, *self.tail, splits, self.q.shape[1])
        kernel = self.kernels._decode_split_kernel
        if warmup:
            return kernel.warmup(*args, grid=grid, DIRECT=False, **self.constexprs)
        return kernel[grid](*args, DIRECT=splits == 1, **self.constexprs, launch_pdl=self.pdl)

    def splits(self, max_context: int | None) -> int:
        if self.cfg.splits is not None:
            return max(1, self.cfg.splits)
        bound = self.bound_default if max_context is None else max_context
        if self.window is not None:
            bound = min(bound, self.window)
        key = (self.q.device, tuple(sorted((k, str(v)) for k, v in self.constexprs.items())), self.cfg.ctas_per_sm)
        if key not in _SLOTS:  # compiles pass 1 once (host only: done in the warm-up before a capture)
            kernel = None
            if not self.interpreted:
                f32 = torch.empty(1, dtype=torch.float32, device=self.q.device)
                kernel = self.split_pass((1, 1, 1), 2, f32, f32, warmup=True)
            _SLOTS[key] = concurrent_programs(kernel, self.q.device, self.cfg)
        return num_splits(self.batch, self.n_kv_heads, bound, _SLOTS[key], self.cfg)
