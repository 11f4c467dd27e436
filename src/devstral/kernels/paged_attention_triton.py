"""Decode attention over the paged KV cache: split-KV flash decoding, GQA-aware (Triton). Semantics:
`paged_attention.decode_attention_ref`.

Pass 1, grid (sequence, kv head, split): one program reads its share of one sequence's keys and
values for one kv head once, and serves all the query heads of that GQA group with them (a
[BLOCK_H >= 16, head_dim] query tile, so both products run on tensor cores). Tiles of BLOCK_N tokens
are gathered through the block table, dequantized in registers (fp8 scales are folded into the
scores and, except for fp16 queries, the probabilities; q8_0/q4_0 are expanded to q's dtype as the
reference does), and reduced with an online softmax in base 2. With one split (or a row whose
context fits in one), the program writes the output itself. Otherwise each split writes its
normalized partial output and log-sum-exp, and pass 2, grid (sequence, query head), merges them
(`_merge_splits`).

DEVSTRAL_FUSED_MERGE=1 (or `DecodeConfig(fused_merge=True)`) merges in the same launch instead: every
split with keys counts itself in at its (sequence, kv head) group's int32 counter (an acq_rel atomic
after a CTA barrier, so its partials are visible first); the one that arrives last merges the group's
heads in split order -- the same sum whichever finished last -- writes the output and re-arms the
counter to zero. A row's later splits that have no keys (a short context uses few) take no part: the
last program expects `used` arrivals, the number of splits with keys, which every program computes
alike. The counters (MAX_GROUPS per device, `arrival_counters`) are allocated once, before any
CUDA-graph capture, and are zero at the start of every launch. It is off by default: in the engine on
the H200 (Devstral-Small Q4_K_M, CUDA graphs) it won at 512 keys in session 8 (170.6 against 168.7 tok/s)
and lost at 32k (127.1 against 131.7), where the last program's merge of 45 splits is a serial tail at the
launch's end; on session 25's kernels it lost at both (220.2 -> 216.3 and 168.9 -> 161.0; Q8_0 154.5 ->
150.2 and 127.3 -> 120.0): the split pass took 10.8 us a layer where the two passes take 4.1 + 4.1.

The 1-byte kinds (fp8, q8_0, q4_0) are read as int32 words (cp.async'd like the 2-byte tiles, then
unpacked four values at a time by a few lines of PTX, exactly: kv_tile_triton.py loads every kind's tiles), a token's q8_0/q4_0 scales as one
[BLOCK_N, head_dim / 32] tile broadcast in registers, and their scores are computed tokens-major,
k q^T [BLOCK_N, BLOCK_H] (then v^T p): the dequantized tile is the products' first operand (on sm_90
both are wgmma, fed it from registers), which spares the per-iteration shuffling of the query's
fragments that a heads-major product costs once a 1-byte operand sets its layout. Before, each
q8_0/q4_0 value's scale was its own synchronous 2-byte global load and the tile went through shared
memory a byte at a time (H200: fp8 at a third of bf16's bytes per second, q8_0 at a tenth, q4_0 at a
fiftieth; docs/architecture.md has the counts).

CUDA graphs: the grid depends only on the batch size, `max_context` and the device (how many
programs it runs at once, see `num_splits`), never on the values of `context_lens`. Each row divides
its own context (or window) evenly over the splits, in whole tiles, so a short row uses few splits
and the rest exit at once; a padding row (context_len 1) costs one tile. Bytes read: every key and
value in the window once, plus the partials (B x H x splits x (head_dim + 1) float32, written and
read once).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from devstral.errors import DevstralError
from devstral.kernels import gguf_xq, pdl, stamps
from devstral.kernels.gguf_config import DECODE_MS
from devstral.kernels.gguf_xq import pack_blocks
from devstral.kernels.interpret_triton import kernels_for, on_interpreter
from devstral.kernels.kv_format import QUANT_KINDS, KVLayer
from devstral.kernels.kv_store_triton import KIND_CODES, fp8_supported
from devstral.kernels.kv_tile_triton import columns, tile
from devstral.kernels.pdl import gdc_launch_dependents, gdc_wait

LOG2E = 1.4426950408889634
MAX_SPLITS = 128  # a power of two: the fused merge loads every split's log-sum-exp at once
_LSE_TILE = tl.constexpr(MAX_SPLITS)
OUT_DIRECT, OUT_PARTIALS, OUT_MERGED = (tl.constexpr(i) for i in range(3))  # what pass 1 writes (its OUTPUT)
MERGE_ROWS = 64  # partial rows (split x head) a merge step loads: 64 x head_dim float32, 64 registers a thread at 128
MAX_GROUPS = 1 << 16  # (sequence, kv head) arrival counters a device keeps for the fused merge
MIN_SPLIT_TOKENS = 256  # a split shorter than this at max_context costs more in partials than it buys
WAVE_EFFICIENCY = 0.9  # the fewest splits whose programs fill this much of the GPU's last wave
DEFAULT_CTAS_PER_SM = 3  # the default config on an H100/H200 (72 KB of shared memory, 128 registers)
MIN_CHUNK = 0  # keys a split takes at least (DecodeConfig.min_chunk): off, every value tried lost on the H200


class DecodeConfig:
    """Launch parameters of pass 1.

    num_stages 5 is the fewest with which Triton 3.6's pipeliner double-buffers the K/V tiles behind
    their block-table lookup (seen in the sm_90a TTGIR, checked by tests/test_kernels_compile.py): with
    fewer, each tile has one buffer and its load never overlaps the previous tile's math.
    `splits` None: chosen by `num_splits` from the batch, max_context and how many programs the GPU
    runs at once, which is `ctas_per_sm` x SMs (None: read from the compiled kernel's registers and
    shared memory).
    `min_chunk`: the fewest keys a split takes (rounded up to whole tiles; None: MIN_CHUNK, or
    DEVSTRAL_ATTN_MIN_CHUNK). The grid is sized for max_context, but a row shorter than min_chunk is one
    split that writes its output itself, and pass 2 skips it: a short context pays for neither the
    partials nor the merge, whatever the captured graph's max_context.
    `prefetch` (None: on unless DEVSTRAL_ATTN_PREFETCH=0): under dependent launch, a split reads the context
    length and the block table and asks L2 for its first tile's keys and values before it waits for the RoPE
    kernel, so that after the wait its tile loads hit L2."""

    def __init__(self, block_n: int = 64, num_warps: int = 4, num_stages: int = 5, splits: int | None = None,
                 ctas_per_sm: int | None = None, tokens_major: bool | None = None, fused_merge: bool | None = None,
                 min_chunk: int | None = None, prefetch: bool | None = None):
        env_fused, env_min_chunk, env_prefetch = _env_defaults()
        self.block_n, self.num_warps, self.num_stages = block_n, num_warps, num_stages
        self.splits, self.ctas_per_sm, self.tokens_major = splits, ctas_per_sm, tokens_major
        self.fused_merge = env_fused if fused_merge is None else fused_merge
        self.min_chunk = env_min_chunk if min_chunk is None else min_chunk
        self.prefetch = env_prefetch if prefetch is None else prefetch

    def __repr__(self) -> str:
        return (f"DecodeConfig(block_n={self.block_n}, num_warps={self.num_warps}, num_stages={self.num_stages}, "
                f"splits={self.splits}, ctas_per_sm={self.ctas_per_sm}, tokens_major={self.tokens_major}, "
                f"fused_merge={self.fused_merge}, min_chunk={self.min_chunk}, prefetch={self.prefetch})")


@functools.cache
def _env_defaults() -> tuple[bool, int, bool]:
    """DEVSTRAL_FUSED_MERGE=1 (off: it lost at long context, module docstring), DEVSTRAL_ATTN_MIN_CHUNK
    (MIN_CHUNK) and DEVSTRAL_ATTN_PREFETCH=0 (on: never slower in four H200 measurements, +0.06% to +0.4% at
    512 keys and +0.05% at 32k, docs/architecture.md), read once per process: a DecodeConfig is built for
    every decode call."""
    raw = os.environ.get("DEVSTRAL_ATTN_MIN_CHUNK", str(MIN_CHUNK)).strip()
    if not raw.isdigit():
        raise DevstralError(f"DEVSTRAL_ATTN_MIN_CHUNK={raw!r}: expected a whole number of keys (0 turns it off)")
    return (os.environ.get("DEVSTRAL_FUSED_MERGE", "0") == "1", int(raw),
            os.environ.get("DEVSTRAL_ATTN_PREFETCH", "1") != "0")


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
def _split_range(length, s, num_splits, window, min_chunk, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Keys [lo, length) of a row; split s covers [start, end) of them in whole BLOCK_N tiles, at least
    min_chunk keys (a multiple of BLOCK_N) to a split, so that a short row uses few of them."""
    if HAS_WINDOW:
        lo = tl.maximum(length - window, 0)
    else:
        lo = length * 0
    chunk = tl.maximum(tl.cdiv(tl.cdiv(length - lo, num_splits), BLOCK_N) * BLOCK_N, min_chunk)
    start = lo + s * chunk
    end = tl.minimum(start + chunk, length)
    return start, end, chunk, lo


@triton.jit
def _along_tokens(x, TOKENS_MAJOR: tl.constexpr):
    """A per-token vector, broadcastable against the scores (tokens on axis 0 when TOKENS_MAJOR)."""
    if TOKENS_MAJOR:
        y = x[:, None]
    else:
        y = x[None, :]
    return y


@triton.jit
def _along_heads(x, TOKENS_MAJOR: tl.constexpr):
    """A per-head vector, broadcastable against the scores and the accumulator."""
    if TOKENS_MAJOR:
        y = x[None, :]
    else:
        y = x[:, None]
    return y


@triton.jit
def _scores(q_op, k, TOKENS_MAJOR: tl.constexpr, PRECISION: tl.constexpr):
    """k q^T [BLOCK_N, BLOCK_H] (q_op = q^T) or q k^T [BLOCK_H, BLOCK_N] (q_op = q)."""
    if TOKENS_MAJOR:
        scores = tl.dot(k, q_op, input_precision=PRECISION)
    else:
        scores = tl.dot(q_op, tl.trans(k), input_precision=PRECISION)
    return scores


@triton.jit
def _accumulate(acc, p, v, TOKENS_MAJOR: tl.constexpr, PRECISION: tl.constexpr):
    """acc + v^T p [HEAD_DIM, BLOCK_H], or acc + p v [BLOCK_H, HEAD_DIM]."""
    if TOKENS_MAJOR:
        acc = tl.dot(tl.trans(v), p, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(p, v, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _prefetch_l2(ptrs):
    """`prefetch.global.L2` of each address: the line comes into L2, no register waits for it."""
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.b32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _prefetch_first_tile(k_ptr, v_ptr, table, start, end, kvh, c_sb, c_so, c_sh, PAGE: tl.constexpr,
                         BLOCK_N: tl.constexpr, ROW_LINES: tl.constexpr, LINE: tl.constexpr, ASM: tl.constexpr):
    """Ask L2 for the keys and values of a split's first tile: one request per 128-byte line, ROW_LINES lines
    of LINE cache elements a (token, kv head) row (rows past the split's end repeat its last one). Under
    the interpreter only the block-table load remains."""
    n = tl.minimum(start + tl.arange(0, BLOCK_N), end - 1)
    page = tl.load(table + n // PAGE).to(tl.int64)
    at = (page * c_sb + (n % PAGE) * c_so + kvh * c_sh)[:, None] + (tl.arange(0, ROW_LINES) * LINE)[None, :]
    if ASM:
        _prefetch_l2(k_ptr + at)
        _prefetch_l2(v_ptr + at)


@triton.jit(do_not_specialize=["window", "num_splits", "min_chunk"])
def _decode_split_kernel(q_ptr, q_sb, q_sh, k_ptr, v_ptr, ks_ptr, vs_ptr, c_sb, c_so, c_sh, s_sb, s_so, s_sh,
                         table_ptr, table_sb, len_ptr, out_ptr, out_sb, out_sh, part_out_ptr, part_lse_ptr, arrivals_ptr,
                         xq_ptr, xq_sb, scale_log2e, window, num_splits, min_chunk, n_heads,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_N: tl.constexpr, KIND: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         OUTPUT: tl.constexpr, DOT_T: tl.constexpr, PRECISION: tl.constexpr,
                         FOLD_V_SCALE: tl.constexpr, SCALES: tl.constexpr = 1, TOKENS_MAJOR: tl.constexpr = False,
                         ASM: tl.constexpr = False, MERGE_HEADS: tl.constexpr = 1, MERGE_CHUNK: tl.constexpr = 1,
                         PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False, ROW_LINES: tl.constexpr = 1,
                         LINE: tl.constexpr = 64, LEN_EARLY: tl.constexpr = False, XQ: tl.constexpr = -1,
                         stamps_ptr=None, STAMPS: tl.constexpr = False):
    if STAMPS:  # kernels/stamps.py
        t_start = stamps.now()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    if LEN_EARLY or PREFETCH:  # written before the kernel before started (decode_attention_triton's `settled`)
        length = tl.load(len_ptr + b)
    if PDL:  # kernels/pdl.py: the merge pass (fused: the o projection's GEMV) may start now; wait for the kernel before
        gdc_launch_dependents()
        if LEN_EARLY and not PREFETCH:
            # a split without keys reads nothing the RoPE kernel writes: it leaves without waiting, and its slot
            # goes to the merge's and the o projection's programs (296 of the 360 programs at 512 keys, 280 at 640; H200:
            # attention 417 -> 383 us a step, benchmarks/results/decode_ab_prewait_h200.json)
            w_start, w_end, _, _ = _split_range(length, s, num_splits, window, min_chunk, BLOCK_N, HAS_WINDOW)
            if w_start < w_end:
                gdc_wait()
        elif not PREFETCH:
            gdc_wait()
    if STAMPS:
        t_waited = stamps.now()
    if not (LEN_EARLY or PREFETCH):
        length = tl.load(len_ptr + b)
    start, end, chunk, lo = _split_range(length, s, num_splits, window, min_chunk, BLOCK_N, HAS_WINDOW)
    if STAMPS:
        program = (b * tl.num_programs(1) + kvh) * tl.num_programs(2) + s
        if start >= end:
            stamps.record(stamps_ptr, stamps.SPLIT, program, t_start, t_waited, 0, stamps.now())
    if start < end:
        if PREFETCH:
            # before the wait (DecodeConfig.prefetch): the context length and block table, which the host wrote
            # before the step, and the first tile's keys and values into L2 -- all but the newest token's were
            # written by earlier steps, and a line the RoPE kernel rewrites meanwhile is updated in L2 (coherent)
            _prefetch_first_tile(k_ptr, v_ptr, table_ptr + b.to(tl.int64) * table_sb, start, end, kvh, c_sb, c_so,
                                 c_sh, PAGE, BLOCK_N, ROW_LINES, LINE, ASM)
            if PDL:
                gdc_wait()
            if STAMPS:
                t_waited = stamps.now()
        Q_T = q_ptr.dtype.element_ty
        h = tl.arange(0, BLOCK_H)
        hmask = h < GROUP
        heads = kvh * GROUP + h
        cols = columns(HEAD_DIM, KIND)
        q = tl.load(q_ptr + b.to(tl.int64) * q_sb + heads[:, None] * q_sh + cols[None, :], mask=hmask[:, None],
                    other=0.0)
        q_op = q.to(DOT_T)
        if TOKENS_MAJOR:
            q_op = tl.trans(q_op)
            acc = tl.zeros([HEAD_DIM, BLOCK_H], tl.float32)
        else:
            acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_H], tl.float32)
        table = table_ptr + b.to(tl.int64) * table_sb
        for n0 in tl.range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            page = tl.load(table + n // PAGE, mask=nmask, other=0).to(tl.int64)
            slot_at = page * c_sb + (n % PAGE) * c_so + kvh * c_sh
            scale_at = (page * s_sb + (n % PAGE) * s_so + kvh * s_sh) * SCALES  # strides in units of SCALES
            k = tile(k_ptr, ks_ptr, slot_at, scale_at, nmask, HEAD_DIM, KIND, Q_T, True, ASM).to(DOT_T)
            scores = _scores(q_op, k, TOKENS_MAJOR, PRECISION)
            if KIND == 1:
                k_scale = tl.load(ks_ptr + scale_at, mask=nmask, other=0.0) * scale_log2e
                scores = scores * _along_tokens(k_scale, TOKENS_MAJOR)
            else:
                scores = scores * scale_log2e
            scores = tl.where(_along_tokens(nmask, TOKENS_MAJOR), scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0 if TOKENS_MAJOR else 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - _along_heads(m_new, TOKENS_MAJOR))
            l_sum = l_sum * alpha + tl.sum(p, axis=0 if TOKENS_MAJOR else 1)
            if KIND == 1 and FOLD_V_SCALE:
                p = p * _along_tokens(tl.load(vs_ptr + scale_at, mask=nmask, other=0.0), TOKENS_MAJOR)
            v = tile(v_ptr, vs_ptr, slot_at, scale_at, nmask, HEAD_DIM, KIND, Q_T, FOLD_V_SCALE, ASM).to(DOT_T)
            acc = _accumulate(acc * _along_heads(alpha, TOKENS_MAJOR), p.to(DOT_T), v, TOKENS_MAJOR, PRECISION)
            m = m_new
        out = acc / _along_heads(l_sum, TOKENS_MAJOR)
        if STAMPS:
            t_work = stamps.after(tl.max(l_sum, axis=0))
        if TOKENS_MAJOR:
            out = tl.trans(out)
        out_rows = out_ptr + b.to(tl.int64) * out_sb
        row_xq = xq_ptr + b.to(tl.int64) * xq_sb
        if OUTPUT == OUT_DIRECT:
            _write_heads(out, out_rows, out_sh, heads, cols, hmask, row_xq, kvh * GROUP, GROUP, BLOCK_H, HEAD_DIM, KIND, XQ)
        else:
            used = tl.cdiv(length - lo, chunk)  # the splits of this row with keys: 0 .. used - 1
            if used == 1:  # the row's only split: nothing to merge (pass 2 skips the row, and packs it itself)
                _write_heads(out, out_rows, out_sh, heads, cols, hmask, row_xq, kvh * GROUP, GROUP, BLOCK_H, HEAD_DIM,
                             KIND, XQ if OUTPUT == OUT_MERGED else -1)
            else:
                row = (b.to(tl.int64) * n_heads + heads) * num_splits + s
                tl.store(part_out_ptr + row[:, None] * HEAD_DIM + cols[None, :], out, mask=hmask[:, None])
                tl.store(part_lse_ptr + row, m + tl.log2(l_sum), mask=hmask)
                if OUTPUT == OUT_MERGED:
                    group = b * tl.num_programs(1) + kvh
                    _arrive_and_merge(part_out_ptr, part_lse_ptr, arrivals_ptr + group, out_rows, out_sh, kvh * GROUP,
                                      (b.to(tl.int64) * n_heads + kvh * GROUP) * num_splits, num_splits, used, row_xq,
                                      GROUP, HEAD_DIM, MERGE_HEADS, MERGE_CHUNK, XQ)
        if STAMPS:
            stamps.record(stamps_ptr, stamps.SPLIT, program, t_start, t_waited, t_work, stamps.now())


@triton.jit
def _write_heads(out, out_rows, out_sh, heads, cols, hmask, row_xq, first_head, GROUP: tl.constexpr,
                 BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, KIND: tl.constexpr, XQ: tl.constexpr):
    """A split's output tile [BLOCK_H, HEAD_DIM] float32 (in `columns` order) as the row's output for the
    GROUP heads from first_head, and with XQ >= 0 their blocks of the o projection's int8 activations."""
    stored = out.to(out_rows.dtype.element_ty)
    tl.store(out_rows + heads[:, None] * out_sh + cols[None, :], stored, mask=hmask[:, None])
    if XQ >= 0:
        _pack_heads(_in_order(stored.to(tl.float32), BLOCK_H, HEAD_DIM, KIND), row_xq, first_head, GROUP, BLOCK_H,
                    HEAD_DIM, XQ)


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, first_rows, hmask, used, HEAD_DIM: tl.constexpr,
                  BLOCK_S: tl.constexpr, CHUNK: tl.constexpr):
    """The merged outputs [NH, HEAD_DIM] float32 of the heads whose split partials are rows
    first_rows[h] + s, s < used: each split weighted by exp2(lse - the largest lse) over the weights'
    sum, the weighted partials added in split order, CHUNK splits a step (whichever program merges,
    the same sum). Loads bypass L1 (.cg): other programs wrote the partials during this launch.

    Where one chunk holds every split (CHUNK >= BLOCK_S: the two-pass merge kernel, up to 64 splits), the
    chunk's partials are loaded beside the log-sum-exps, before the weights that need those: one L2 round
    trip on the decode chain instead of two, and the same arithmetic as the loop's single step."""
    s = tl.arange(0, BLOCK_S)
    lse = tl.load(part_lse_ptr + first_rows[:, None] + s[None, :], mask=hmask[:, None] & (s < used)[None, :],
                  other=float("-inf"), cache_modifier=".cg")
    d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([first_rows.shape[0], HEAD_DIM], tl.float32)
    if CHUNK >= BLOCK_S:
        split_lse, parts, ok = _chunk_loads(part_out_ptr, part_lse_ptr, first_rows, hmask, used, 0, d, HEAD_DIM, CHUNK)
        top, total = _lse_top_total(lse, hmask)
        weight = tl.where(ok, tl.exp2(split_lse - top[None, :]) / total[None, :], 0.0)
        acc += tl.sum(parts * weight[:, :, None], axis=0)
    else:
        top, total = _lse_top_total(lse, hmask)
        for s0 in range(0, used, CHUNK):
            split_lse, parts, ok = _chunk_loads(part_out_ptr, part_lse_ptr, first_rows, hmask, used, s0, d, HEAD_DIM, CHUNK)
            weight = tl.where(ok, tl.exp2(split_lse - top[None, :]) / total[None, :], 0.0)
            acc += tl.sum(parts * weight[:, :, None], axis=0)
    return acc


@triton.jit
def _lse_top_total(lse, hmask):
    """Per head [NH]: the largest log-sum-exp of its splits, and the sum of exp2(lse - largest)."""
    top = tl.where(hmask, tl.max(lse, axis=1), 0.0)
    total = tl.where(hmask, tl.sum(tl.exp2(lse - top[:, None]), axis=1), 1.0)
    return top, total


@triton.jit
def _chunk_loads(part_out_ptr, part_lse_ptr, first_rows, hmask, used, s0, d, HEAD_DIM: tl.constexpr,
                 CHUNK: tl.constexpr):
    """Splits s0 .. s0 + CHUNK - 1 of each head: their log-sum-exps [CHUNK, NH], partial outputs
    [CHUNK, NH, HEAD_DIM] and which of them exist [CHUNK, NH]."""
    split = s0 + tl.arange(0, CHUNK)
    ok = (split < used)[:, None] & hmask[None, :]
    rows = first_rows[None, :] + split[:, None]  # [CHUNK, NH]
    split_lse = tl.load(part_lse_ptr + rows, mask=ok, other=float("-inf"), cache_modifier=".cg")
    parts = tl.load(part_out_ptr + rows[:, :, None] * HEAD_DIM + d[None, None, :], mask=ok[:, :, None],
                    other=0.0, cache_modifier=".cg")
    return split_lse, parts, ok


@triton.jit
def _arrive_and_merge(part_out_ptr, part_lse_ptr, arrival_ptr, out_rows, out_sh, first_head, first_row, num_splits,
                      used, row_xq, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, MERGE_HEADS: tl.constexpr,
                      CHUNK: tl.constexpr, XQ: tl.constexpr):
    """After a split stored its partials: count it in at its (sequence, kv head) group's counter. The
    split that arrives last (the other used - 1 have stored theirs) merges the group's heads, whose
    partial rows start at first_row, writes their output (and with XQ >= 0 its blocks of the o
    projection's int8 activations at row_xq) and re-arms the counter to zero for the next launch."""
    tl.debug_barrier()  # every thread's partials are stored before the counter moves (the atomic releases)
    arrived = tl.atomic_add(arrival_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == used - 1:
        h = tl.arange(0, MERGE_HEADS)
        hmask = h < GROUP
        merged = _merge_splits(part_out_ptr, part_lse_ptr, first_row + h.to(tl.int64) * num_splits, hmask, used,
                               HEAD_DIM, _LSE_TILE, CHUNK)
        d = tl.arange(0, HEAD_DIM)
        stored = merged.to(out_rows.dtype.element_ty)
        tl.store(out_rows + (first_head + h)[:, None] * out_sh + d[None, :], stored, mask=hmask[:, None])
        if XQ >= 0:
            _pack_heads(stored.to(tl.float32), row_xq, first_head, GROUP, MERGE_HEADS, HEAD_DIM, XQ)
        tl.store(arrival_ptr, 0)


@triton.jit(do_not_specialize=["window", "num_splits", "min_chunk"])
def _decode_merge_kernel(part_out_ptr, part_lse_ptr, len_ptr, out_ptr, out_sb, out_sh, window, num_splits,
                         min_chunk, n_heads, xq_ptr, xq_sb, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, MERGE_CHUNK: tl.constexpr,
                         PDL: tl.constexpr = False, LEN_EARLY: tl.constexpr = False, XQ: tl.constexpr = -1,
                         stamps_ptr=None, STAMPS: tl.constexpr = False):
    """Pass 2 of the two-pass path, grid (sequence, query head). A row whose keys fit in one split has
    its output written by pass 1 already. XQ >= 0 (a gguf_xq layout): every program also writes its head's
    blocks of the o projection's int8 activations, the quantization of the output as stored (a row pass 1
    wrote is read back), so the GEMV after needs no quantize launch."""
    if STAMPS:  # kernels/stamps.py
        t_start = stamps.now()
    b = tl.program_id(0)
    h = tl.program_id(1)
    if LEN_EARLY:  # as in pass 1
        length = tl.load(len_ptr + b)
    if PDL:  # kernels/pdl.py: wait for the split pass, and only then let the o projection's GEMV start
        # Signalled at the start, the o GEMV's programs got resident during the split pass and sent their only
        # weight tile (12 MB at Devstral shape) to DRAM while the splits made their few round trips: a split
        # took 6.3-6.5 us from its wait to its product, 3.5 us once o starts here (H200 stamps); decode
        # 212.2 -> 214.9 tok/s (benchmarks/results/decode_ab_merge_late_h200.json)
        gdc_wait()
        gdc_launch_dependents()
    if STAMPS:
        t_waited = stamps.now()
        t_work = t_waited * 0
    if not LEN_EARLY:
        length = tl.load(len_ptr + b)
    _, _, chunk, lo = _split_range(length, 0, num_splits, window, min_chunk, BLOCK_N, HAS_WINDOW)
    used = tl.cdiv(length - lo, chunk)
    d = tl.arange(0, HEAD_DIM)
    out_at = out_ptr + b.to(tl.int64) * out_sb + h * out_sh + d[None, :]
    if XQ >= 0:  # a row pass 1 wrote (during the launch this one waited for; .cg: not through L1), read beside the
        # partials so that the PTX keeps every load ahead of the merge's barriers
        direct = tl.load(out_at, mask=(used == 1) & (d[None, :] >= 0), other=0.0, cache_modifier=".cg")
    if used > 1:
        first_row = (b.to(tl.int64) * n_heads + h) * num_splits + tl.zeros([1], tl.int64)
        merged = _merge_splits(part_out_ptr, part_lse_ptr, first_row, first_row >= 0, used, HEAD_DIM, BLOCK_S,
                               MERGE_CHUNK).to(out_ptr.dtype.element_ty)
        if STAMPS:
            t_work = stamps.after(tl.max(tl.max(merged.to(tl.float32), axis=1), axis=0))
        tl.store(out_at, merged)
        if XQ >= 0:
            _pack_head(merged.to(tl.float32), xq_ptr + b.to(tl.int64) * xq_sb, h, HEAD_DIM, XQ)
    elif XQ >= 0:
        _pack_head(direct.to(tl.float32), xq_ptr + b.to(tl.int64) * xq_sb, h, HEAD_DIM, XQ)
    if STAMPS:
        stamps.record(stamps_ptr, stamps.MERGE, b * tl.num_programs(1) + h, t_start, t_waited, t_work, stamps.now())


@triton.jit
def _pack_head(x, row_xq, h, HEAD_DIM: tl.constexpr, LAYOUT: tl.constexpr):
    """One head's output [1, HEAD_DIM] (float32 of the stored values) -> its blocks of the row's xq words."""
    _pack_heads(x, row_xq, h, 1, 1, HEAD_DIM, LAYOUT)


@triton.jit
def _pack_heads(x, row_xq, first_head, n_heads, NH: tl.constexpr, HEAD_DIM: tl.constexpr, LAYOUT: tl.constexpr):
    """Heads first_head .. first_head + n_heads - 1 of a row's output, x [NH >= n_heads, HEAD_DIM] (float32 of
    the stored values, in head-dim order) -> their HEAD_DIM / 32 blocks each of the row's gguf_xq words
    (gguf_xq.pack_blocks: the same bits as quantize() of the stored row)."""
    per: tl.constexpr = HEAD_DIM // 32
    i = tl.arange(0, NH * per)
    head = i // per
    pack_blocks(tl.reshape(x, (NH * per, 32)), row_xq + ((first_head + head) * per + i % per) * 12, head < n_heads,
                LAYOUT, NH * per)


@triton.jit
def _in_order(x, NH: tl.constexpr, HEAD_DIM: tl.constexpr, KIND: tl.constexpr):
    """A tile [NH, HEAD_DIM] held in `columns` order -> head-dim order: q4_0's columns 2j, 2j + 1 of a
    32-block hold values j and j + 16 (nothing moves for the other kinds)."""
    if KIND == 3:
        x = tl.reshape(tl.permute(tl.reshape(x, (NH, HEAD_DIM // 32, 16, 2)), (0, 1, 3, 2)), (NH, HEAD_DIM))
    return x


def _supported(q: torch.Tensor, layer: KVLayer) -> bool:
    head_dim, page = q.shape[-1], layer.k.shape[1]
    pow2 = lambda x: x > 0 and not x & (x - 1)  # noqa: E731
    return (pow2(head_dim) and head_dim >= 16 and pow2(page) and q.shape[1] % layer.k.shape[2] == 0
            and layer.k.stride(-1) == 1 and layer.k.stride() == layer.v.stride()
            and (layer.k_scale is None or _whole_scale_rows(layer))
            and (layer.kind not in QUANT_KINDS or _words_fit(layer.k))
            and (layer.kind != "fp8" or fp8_supported(q.device)))


def _cache_words(layer: KVLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache as the kernel addresses it: the 1-byte kinds' bytes as int32 words (see `_interleave4`)."""
    if layer.kind in QUANT_KINDS:
        return layer.k.view(torch.int32), layer.v.view(torch.int32)
    return layer.k, layer.v


def _words_fit(cache: torch.Tensor) -> bool:
    return cache.shape[-1] % 4 == 0 and cache.storage_offset() % 4 == 0 and all(st % 4 == 0 for st in cache.stride()[:3])


def _whole_scale_rows(layer: KVLayer) -> bool:
    """A (token, head)'s scales are contiguous and every stride is a whole number of them: the kernel
    takes the strides in those units, so that the compiler knows a row's alignment (and loads its
    scales as one vector)."""
    sc = layer.k_scale
    return (sc.stride() == layer.v_scale.stride() and sc.stride(-1) == 1
            and all(st % sc.shape[-1] == 0 for st in sc.stride()[:3]))


def decode_attention_triton(q: torch.Tensor, layer: KVLayer, block_tables: torch.Tensor, context_lens: torch.Tensor,
                            scale: float, window: int | None = None, *, max_context: int | None = None,
                            config: DecodeConfig | None = None, settled: bool = False,
                            xq_layout: int | None = None) -> torch.Tensor:
    """q [B, n_heads, head_dim] (last dim contiguous) -> [B, n_heads, head_dim] in q's dtype.
    `max_context` bounds every context_len (None: the block table's width). `settled`: the caller vouches
    that context_lens was written before the kernel before this one started (the engine's step inputs,
    copied in before the step): then under dependent launch both passes read it before they wait, one L2
    round trip off the chain each (kernels/pdl.py). A wrong promise is a race, hence opt-in.
    `xq_layout` (a gguf_xq layout: the o projection's GEMV quantizes its input so): at decode sizes, whichever
    program writes a row's output (the merge pass, pass 1 for a row in one split, the fused merge's last split)
    also writes those words, and they are offered (gguf_xq.offer), so that the GEMV's quantize() launches
    nothing; past the decode sizes nothing changes."""
    if not _supported(q, layer):
        from devstral.kernels.paged_attention import decode_attention_ref

        return decode_attention_ref(q, layer, block_tables, context_lens, scale, window)
    B, H, D = q.shape
    writes_xq = xq_layout is not None and 0 < B <= DECODE_MS[-1] and D % gguf_xq.BLOCK == 0 \
        and triton.next_power_of_2(D // gguf_xq.BLOCK) == D // gguf_xq.BLOCK
    # with xq, a normal tensor even in inference mode: its version counter tells gguf_xq of an in-place write
    with torch.inference_mode(False) if writes_xq else contextlib.nullcontext():
        out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    launch = _Launch(q if q.stride(-1) == 1 else q.contiguous(), layer, block_tables, context_lens, scale, window,
                     out, config or DecodeConfig(), settled)
    splits = launch.splits(max_context)
    xq = torch.empty(B, H * D // gguf_xq.BLOCK, gguf_xq.WORDS, dtype=torch.int32, device=q.device) if writes_xq \
        else None
    layout = xq_layout if writes_xq else -1
    if splits == 1:
        launch.split_pass((B, launch.n_kv_heads, 1), 1, out, out, OUT_DIRECT.value, xq=xq, layout=layout)
    else:
        part_out = torch.empty((B, H, splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, H, splits), dtype=torch.float32, device=q.device)
        arrivals = launch.arrivals(splits)
        if arrivals is not None:
            launch.split_pass((B, launch.n_kv_heads, splits), splits, part_out, part_lse, OUT_MERGED.value, arrivals,
                              xq=xq, layout=layout)
        else:
            launch.split_pass((B, launch.n_kv_heads, splits), splits, part_out, part_lse, OUT_PARTIALS.value)
            launch.merge_pass(splits, part_out, part_lse, context_lens, out, window, xq, layout)
    if writes_xq:
        gguf_xq.offer(out.view(B, H * D), {xq_layout: xq})
    return out


_ARRIVALS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device) -> torch.Tensor | None:
    """The device's fused-merge counters: MAX_GROUPS int32, zero between launches (the last split of
    each group re-arms its counter), allocated once per device by the first decode call, which the
    engine makes before any CUDA-graph capture. None when the first call is itself being captured
    (the launch then takes the two-pass path)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _ARRIVALS.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _ARRIVALS[device] = torch.zeros(MAX_GROUPS, dtype=torch.int32, device=device)
    return buf


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
                 cfg: DecodeConfig, settled: bool = False):
        B, H, D = q.shape
        self.q, self.layer, self.block_tables, self.window, self.cfg = q, layer, block_tables, window, cfg
        self.batch, self.n_kv_heads, page = B, layer.k.shape[2], layer.k.shape[1]
        self.bound_default = block_tables.shape[1] * page
        self.kernels = kernels_for(q, __name__)
        self.interpreted = on_interpreter(q)
        scales = (layer.k_scale, layer.v_scale) if layer.k_scale is not None else (layer.k, layer.v)
        per_head = layer.k_scale.shape[-1] if layer.k_scale is not None else 1
        ss = [st // per_head for st in scales[0].stride()[:3]]  # whole (token, head) scale rows: see _supported
        k, v = _cache_words(layer)
        self.args = (q, q.stride(0), q.stride(1), k, v, scales[0], scales[1],
                     k.stride(0), k.stride(1), k.stride(2), ss[0], ss[1], ss[2],
                     block_tables, block_tables.stride(0), context_lens, out, out.stride(0), out.stride(1))
        self.tail = (scale * LOG2E, window or 0)
        self.min_chunk = triton.cdiv(max(cfg.min_chunk, 0), cfg.block_n) * cfg.block_n  # whole tiles
        dot_t = tl.float32 if self.interpreted or q.dtype == torch.float32 else (
            tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16)
        self.pdl = pdl.enabled(q.device)
        self.stamps_ptr, self.stamps = stamps.kernel_args(q.device, out)
        self.len_early = self.pdl and settled
        self.constexprs = dict(PDL=self.pdl, GROUP=H // self.n_kv_heads, HEAD_DIM=D, PAGE=page,
                               BLOCK_H=max(16, triton.next_power_of_2(H // self.n_kv_heads)), BLOCK_N=cfg.block_n,
                               KIND=KIND_CODES[layer.kind], HAS_WINDOW=window is not None, DOT_T=dot_t,
                               PRECISION="ieee" if dot_t == tl.float32 else "tf32", num_warps=cfg.num_warps,
                               num_stages=fitting_stages(cfg, D, layer.k.element_size(),
                                                         None if self.interpreted else _smem_per_block(q.device)),
                               # fp8 value scales multiply the probabilities, except in fp16, whose
                               # range would flush p x scale (scales go down to ~1e-6) to zero
                               FOLD_V_SCALE=q.dtype != torch.float16, SCALES=per_head,
                               ASM=not self.interpreted,  # PTX for the 1-byte kinds' dequantization
                               TOKENS_MAJOR=cfg.tokens_major if cfg.tokens_major is not None else layer.kind in QUANT_KINDS,
                               PREFETCH=cfg.prefetch, LEN_EARLY=self.len_early, ROW_LINES=triton.cdiv(k.shape[-1] * k.element_size(), 128),
                               LINE=128 // k.element_size(),
                               MERGE_HEADS=triton.next_power_of_2(H // self.n_kv_heads),
                               MERGE_CHUNK=max(1, MERGE_ROWS // triton.next_power_of_2(H // self.n_kv_heads)))

    def split_pass(self, grid, splits: int, part_out, part_lse, output: int, arrivals=None, *, xq=None,
                   layout: int = -1, warmup: bool = False):
        """Pass 1. `xq` [B, blocks, words] and its gguf_xq `layout`: the o projection's int8 activations, which
        the rows it writes itself (OUT_DIRECT, or OUT_MERGED's one-split rows and merges) also get."""
        arrivals = part_lse if arrivals is None else arrivals  # unused unless OUTPUT is OUT_MERGED
        xq = part_lse if xq is None else xq  # unused unless layout >= 0
        args = (*self.args, part_out, part_lse, arrivals, xq, xq.stride(0), *self.tail, splits, self.min_chunk,
                self.q.shape[1])
        kernel = self.kernels._decode_split_kernel
        if warmup:
            return kernel.warmup(*args, grid=grid, OUTPUT=output, XQ=layout, **self.constexprs)
        return kernel[grid](*args, OUTPUT=output, XQ=layout, **self.constexprs, stamps_ptr=self.stamps_ptr,
                            STAMPS=self.stamps, launch_pdl=self.pdl)

    def merge_pass(self, splits: int, part_out, part_lse, context_lens, out, window: int | None, xq, layout: int):
        """Pass 2, grid (sequence, query head); with layout >= 0 it also writes xq (see split_pass)."""
        B, H, D = out.shape
        xq = part_lse if xq is None else xq
        block_s = triton.next_power_of_2(splits)
        self.kernels._decode_merge_kernel[(B, H)](
            part_out, part_lse, context_lens, out, out.stride(0), out.stride(1), window or 0, splits, self.min_chunk, H,
            xq, xq.stride(0), HEAD_DIM=D, BLOCK_S=block_s, BLOCK_N=self.cfg.block_n, HAS_WINDOW=window is not None,
            MERGE_CHUNK=min(block_s, MERGE_ROWS), PDL=self.pdl, LEN_EARLY=self.len_early, XQ=layout,
            num_warps=4 if block_s * D <= 8192 else 8, stamps_ptr=self.stamps_ptr, STAMPS=self.stamps,
            launch_pdl=self.pdl)

    def fused_merge(self) -> bool:
        return self.cfg.fused_merge and self.batch * self.n_kv_heads <= MAX_GROUPS

    def arrivals(self, splits: int) -> torch.Tensor | None:
        """The counters for a fused merge of `splits` splits, or None for the two-pass path."""
        if not self.fused_merge() or splits > MAX_SPLITS:
            return None
        return arrival_counters(self.q.device)

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
                output = OUT_MERGED.value if self.fused_merge() else OUT_PARTIALS.value
                kernel = self.split_pass((1, 1, 1), 2, f32, f32, output, warmup=True)
            _SLOTS[key] = concurrent_programs(kernel, self.q.device, self.cfg)
        return num_splits(self.batch, self.n_kv_heads, bound, _SLOTS[key], self.cfg)
