"""The split-KV paged decode kernel against `decode_attention_ref` (gather the pages, dequantize as
kv_format does, SDPA with the causal/window mask): every KV kind, GQA ratios, sliding windows,
partial last blocks, scattered block tables, padding rows (context 1), one split or many, the splits
merged in the same launch (arrival counters) or by a second kernel, scores laid out tokens- or
heads-major.

CPU: Triton's interpreter, plus the PTX that dequantizes the 1-byte kinds on the GPU, run through a
small emulator of its instructions against `kv_format.dequantize` for every byte. GPU (`-m gpu`): the
compiled kernel at Devstral-Small shapes (32 query heads over 8 kv heads, head_dim 128) up to 32k
contexts for every kind, and CUDA graphs captured at one batch and replayed with other contexts.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from devstral.kernels.kv_format import QUANT_KINDS, KVLayer, storage  # noqa: E402
from devstral.kernels.kv_store import store_kv_ref  # noqa: E402
from devstral.kernels.paged_attention import decode_attention_ref  # noqa: E402
from devstral.kernels.paged_attention_triton import (  # noqa: E402
    DecodeConfig,
    arrival_counters,
    decode_attention_triton,
)

KINDS = ["bf16", "fp16", "fp32", "fp8", "q8_0", "q4_0"]
# Triton 3.6's interpreter turns 1-element arrays into loop bounds (numpy deprecates that)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def filled_cache(kind, context_lens, n_kv_heads, head_dim, block_size, dtype, device, seed, spare_blocks=3):
    """A pool holding each sequence's keys/values for positions 0..len-1 in blocks scattered at random
    (block tables padded with zeros), written through the reference store."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    vdtype, nv, sdtype, ns = storage(kind, head_dim)

    def alloc(n, dt):
        return None if dt is None else torch.zeros(num_blocks, block_size, n_kv_heads, n, dtype=dt, device=device)

    layer = KVLayer(alloc(nv, vdtype), alloc(nv, vdtype), alloc(ns, sdtype), alloc(ns, sdtype), kind)
    order = torch.randperm(num_blocks, generator=g)
    width = max(blocks_per_seq) + 2
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(context_lens):
        tables[b, :blocks_per_seq[b]] = order[used:used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        pos = torch.arange(n)
        slots = (tables[b][pos // block_size].long() * block_size + pos % block_size).to(device)
        k = (torch.randn(n, n_kv_heads, head_dim, generator=g) * 2).to(dtype).to(device)
        v = torch.randn(n, n_kv_heads, head_dim, generator=g).to(dtype).to(device)
        store_kv_ref(k, v, layer, slots)
    return layer, tables.to(device), torch.tensor(context_lens, dtype=torch.int32, device=device)


def queries(batch, n_heads, n_kv_heads, head_dim, dtype, device, seed):
    """q [B, H, D] as a view of a fused qkv row (strided batch dim)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, (n_heads + 2 * n_kv_heads) * head_dim, generator=g).to(dtype).to(device)
    return qkv[:, :n_heads * head_dim].view(batch, n_heads, head_dim)


def check(kind, context_lens, *, n_heads, n_kv_heads, head_dim, block_size, window=None, configs, device="cpu",
          seed=0, dtype=None):
    dtype = dtype or (torch.float32 if kind == "fp32" else torch.bfloat16)
    layer, tables, lens = filled_cache(kind, context_lens, n_kv_heads, head_dim, block_size, dtype, device, seed)
    q = queries(len(context_lens), n_heads, n_kv_heads, head_dim, dtype, device, seed + 1)
    scale = head_dim ** -0.5
    ref = decode_attention_ref(q, layer, tables, lens, scale, window).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for cfg in configs:
        out = decode_attention_triton(q, layer, tables, lens, scale, window,
                                      max_context=tables.shape[1] * block_size, config=cfg)
        assert out.dtype == q.dtype and out.shape == q.shape
        err = (out.float() - ref).abs().max().item()
        assert err <= tol * max(1.0, ref.abs().max().item()), f"{kind} {cfg}: max error {err}"


# ---------------------------------------------------------------- CPU, through the interpreter
# A few seconds in CI; DEVSTRAL_KERNEL_SWEEP=1 adds the full cross product (about a minute).
SPLIT3 = [DecodeConfig(block_n=16, splits=3, fused_merge=True), DecodeConfig(block_n=16, splits=3),
          DecodeConfig(block_n=16, splits=3, prefetch=True)]  # the block table read before the wait
sweep = pytest.mark.skipif(not os.environ.get("DEVSTRAL_KERNEL_SWEEP"),
                           reason="the interpreter sweep runs with DEVSTRAL_KERNEL_SWEEP=1")


@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches_reference_for_every_kind(kind):
    # GQA 3:1 (query tile padded to 16 rows), a padding row (context 1), partial last blocks, 3 splits
    check(kind, [1, 37, 70], n_heads=6, n_kv_heads=2, head_dim=32, block_size=8, configs=SPLIT3,
          seed=KINDS.index(kind))


@pytest.mark.parametrize("window", [1, 24])
def test_decode_sliding_window(window):
    check("bf16", [3, 40, 66], n_heads=4, n_kv_heads=4, head_dim=16, block_size=8, window=window,
          configs=SPLIT3, seed=window)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(8, 2), (16, 1)])
def test_decode_gqa_ratios_and_automatic_splits(n_heads, n_kv_heads):
    check("q8_0", [50, 9, 128], n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=32, block_size=16,
          configs=[DecodeConfig(block_n=32)], seed=n_heads)


def test_decode_one_split_writes_the_output_directly():
    check("fp8", [17, 64], n_heads=4, n_kv_heads=2, head_dim=32, block_size=32,
          configs=[DecodeConfig(block_n=16, splits=1)], seed=11)


def test_decode_fp16_queries_over_a_small_valued_fp8_cache():
    """fp16 dequantizes fp8 values row by row instead of folding the tiny scales into the probabilities."""
    layer, tables, lens = filled_cache("fp8", [30, 45], 2, 32, 8, torch.float16, "cpu", seed=12)
    layer.v.copy_((layer.v.float() * 0.5).to(layer.v.dtype))
    layer.v_scale.mul_(1e-3)  # values around 1e-3: scales around 2e-6
    q = queries(2, 4, 2, 32, torch.float16, "cpu", 13)
    ref = decode_attention_ref(q, layer, tables, lens, 0.17).float()
    out = decode_attention_triton(q, layer, tables, lens, 0.17, max_context=tables.shape[1] * 8,
                                  config=DecodeConfig(block_n=16, splits=2)).float()
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_decode_fp16_queries_over_a_bf16_cache():
    check("bf16", [20, 33], n_heads=4, n_kv_heads=2, head_dim=16, block_size=8, dtype=torch.float16,
          configs=SPLIT3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [None, 20])
def test_fused_merge_with_rows_using_fewer_splits(kind, window):
    """One launch merges the splits: rows of 1, 9, 17, 40 and 70 keys over 4 splits of whole 16-key
    tiles use 1, 1, 2, 3 and 4 of them (fewer inside a window); each row's last arriving split
    merges it, a row with one used split writes its output directly."""
    check(kind, [1, 9, 17, 40, 70], n_heads=6, n_kv_heads=2, head_dim=32, block_size=8, window=window,
          configs=[DecodeConfig(block_n=16, splits=4, fused_merge=True)], seed=KINDS.index(kind) + (window or 0))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("window", [None, 20])
def test_min_chunk_gives_short_rows_one_split(fused, window):
    """A split takes at least min_chunk keys (rounded up to whole tiles): with 4 splits of 16-key tiles and
    min_chunk 20 (so 32), rows of 1, 9, 17 and 30 keys use one split, which writes the output itself (pass 2
    skips the row), 40 keys two and 70 three; the grid is the same 4 splits for all."""
    check("bf16", [1, 9, 17, 30, 40, 70], n_heads=6, n_kv_heads=2, head_dim=32, block_size=8, window=window,
          configs=[DecodeConfig(block_n=16, splits=4, fused_merge=fused, min_chunk=20)], seed=31 + (window or 0))


def test_a_bad_min_chunk_setting_names_the_variable(monkeypatch):
    from devstral.errors import DevstralError
    from devstral.kernels import paged_attention_triton as pa

    monkeypatch.setenv("DEVSTRAL_ATTN_MIN_CHUNK", "512k")
    pa._env_defaults.cache_clear()
    try:
        with pytest.raises(DevstralError, match="DEVSTRAL_ATTN_MIN_CHUNK='512k'"):
            DecodeConfig()
        monkeypatch.setenv("DEVSTRAL_ATTN_MIN_CHUNK", "256")
        pa._env_defaults.cache_clear()
        assert DecodeConfig().min_chunk == 256 and DecodeConfig(min_chunk=0).min_chunk == 0
    finally:
        pa._env_defaults.cache_clear()


def test_min_chunk_one_split_row_leaves_pass_two_no_work():
    """With every row inside one split, pass 2 must not touch the output: poison the partials it would read
    and the result still matches the reference."""
    layer, tables, lens = filled_cache("bf16", [5, 12], 2, 32, 8, torch.bfloat16, "cpu", seed=41)
    q = queries(2, 4, 2, 32, torch.bfloat16, "cpu", 42)
    real_empty = torch.empty

    def poisoned(*shape, dtype=None, device=None, **kw):
        t = real_empty(*shape, dtype=dtype, device=device, **kw)
        if dtype == torch.float32:
            t.fill_(float("nan"))
        return t

    ref = decode_attention_ref(q, layer, tables, lens, 0.2).float()
    try:
        torch.empty = poisoned
        out = decode_attention_triton(q, layer, tables, lens, 0.2, max_context=tables.shape[1] * 8,
                                      config=DecodeConfig(block_n=16, splits=3, min_chunk=16))
    finally:
        torch.empty = real_empty
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 2e-2 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("tokens_major", [False, True])
@pytest.mark.parametrize("kind", ["bf16", "fp8", "q4_0"])
def test_scores_in_either_orientation(kind, tokens_major):
    check(kind, [13, 50], n_heads=8, n_kv_heads=2, head_dim=32, block_size=8,
          configs=[DecodeConfig(block_n=16, splits=2, tokens_major=tokens_major),
                   DecodeConfig(block_n=16, splits=1, tokens_major=tokens_major)], seed=21)


@settings(max_examples=12, deadline=None)
@given(lens=st.lists(st.integers(1, 90), min_size=1, max_size=4), splits=st.integers(2, 6),
       kind=st.sampled_from(["bf16", "q8_0"]))
def test_fused_merge_twice_in_a_row_gives_identical_results(lens, splits, kind):
    """The last split of each group re-arms its counter: a second launch sees zeros and gives the same
    bits (the merge adds the splits in a fixed order, whichever arrives last); both match the reference."""
    layer, tables, ctx = filled_cache(kind, lens, 2, 32, 8, torch.bfloat16, "cpu", seed=sum(lens))
    q = queries(len(lens), 4, 2, 32, torch.bfloat16, "cpu", seed=splits)
    cfg = DecodeConfig(block_n=16, splits=splits, fused_merge=True)
    first = decode_attention_triton(q, layer, tables, ctx, 0.17, max_context=tables.shape[1] * 8, config=cfg)
    assert not arrival_counters(torch.device("cpu")).any()
    second = decode_attention_triton(q, layer, tables, ctx, 0.17, max_context=tables.shape[1] * 8, config=cfg)
    assert torch.equal(first, second)
    assert not arrival_counters(torch.device("cpu")).any()
    ref = decode_attention_ref(q, layer, tables, ctx, 0.17).float()
    assert (first.float() - ref).abs().max() <= 2e-2 * max(1.0, ref.abs().max().item())


def _run_ptx(asm: str, word: np.ndarray, n_out: int) -> list[np.ndarray]:
    """The few PTX instructions the dequantization uses, on uint32 arrays ($0.. are the outputs, the
    input word follows them)."""
    regs = {f"${n_out}": word.astype(np.uint32)}

    def value(tok):
        return np.uint32(int(tok, 0)) if tok[0].isdigit() else regs[tok]

    def f16_bits(byte):
        e4m3 = torch.from_numpy(byte.astype(np.uint8)).view(torch.float8_e4m3fn)
        return e4m3.half().view(torch.int16).numpy().astype(np.uint32) & 0xFFFF

    for stmt in filter(None, (x.strip() for x in asm.strip("{} ").split(";"))):
        op, rest = stmt.split(None, 1)
        if op == ".reg":
            continue
        if rest.startswith("{"):  # mov.b32 {lo, hi}, x: the two 16-bit halves
            lo, hi, src = re.match(r"\{(\w+), (\w+)\}, (\S+)", rest).groups()
            regs[lo], regs[hi] = value(src) & np.uint32(0xFFFF), value(src) >> np.uint32(16)
            continue
        dst, *args = (a.strip() for a in rest.split(","))
        a = [value(x) for x in args]
        if op == "mov.b32":
            r = a[0]
        elif op == "xor.b32":
            r = a[0] ^ a[1]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "shr.b32":
            r = a[0] >> a[1]
        elif op == "prmt.b32":  # byte i of the result: byte sel_i of (a[1] << 32 | a[0])
            pool = (np.uint64(a[1]) << np.uint64(32)) | np.asarray(a[0], np.uint64)
            r = sum(((pool >> np.uint64(8 * ((int(a[2]) >> 4 * i) & 7))) & np.uint64(0xFF)) << np.uint64(8 * i)
                    for i in range(4)).astype(np.uint32)
        elif op == "cvt.rn.f16x2.e4m3x2":
            r = f16_bits(a[0] & 0xFF) | (f16_bits(a[0] >> 8) << np.uint32(16))
        elif op == "cvt.f32.f16":
            r = a[0].astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
        else:
            raise NotImplementedError(op)
        regs[dst] = np.asarray(r, np.uint32)
    return [regs[f"${i}"].view(np.float32) for i in range(n_out)]


def _fma(f, scale, bias):
    """The kernel's fma(f, scale * 2^-8, -bias * scale): both constants rounded to float32 as the
    kernel computes them, the fma exact (float64 holds f x scale' and the sum), rounded once."""
    from devstral.kernels import kv_tile_triton as kt

    mul, add = np.float32(scale) * np.float32(kt.BITS_8_15.value), np.float32(scale) * np.float32(-bias)
    return np.float32(f.astype(np.float64) * np.float64(mul) + np.float64(add))


@pytest.mark.parametrize("kind", ["fp8", "q8_0", "q4_0"])
def test_dequantization_ptx_is_exact(kind):
    """Every byte in every position of a word, through the kernel's PTX (emulated), gives the float32
    `kv_format.dequantize` computes (up to the sign of zero), for scales across fp16's range."""
    from devstral.kernels import kv_tile_triton as kt
    from devstral.kernels.kv_format import dequantize

    byte = np.arange(256, dtype=np.uint32)
    scales = [1.0, 6e-8, 65504.0, 0.0137, -3.1e-3] if kind == "q4_0" else [1.0, 6e-8, 65504.0, 0.0137]
    for pos in range(4):
        word = byte << np.uint32(8 * pos)
        if kind == "fp8":
            got = _run_ptx(kt.E4M3_WORD_ASM.value, word, 4)[pos]
            want = torch.from_numpy(byte.astype(np.uint8)).view(torch.float8_e4m3fn).float().numpy()
            finite = np.isfinite(want)
            assert np.array_equal(got[finite], want[finite])
            continue
        outs = _run_ptx(kt.Q8_0_ASM.value if kind == "q8_0" else kt.Q4_0_ASM.value, word, 4 if kind == "q8_0" else 8)
        for sc in scales:
            d = torch.full((256, 1), sc, dtype=torch.float16)
            if kind == "q8_0":
                values = torch.from_numpy(byte.astype(np.uint8).view(np.int8)).repeat(32).view(32, 256).T
                want = dequantize(values.contiguous(), d, "q8_0", torch.float32)[:, 0].numpy()
                got = _fma(outs[pos], d[0, 0].float().item(), kt.Q8_0_BIAS.value)
                assert np.array_equal(got, want), (pos, sc)
            else:
                packed = torch.from_numpy(byte.astype(np.uint8)).repeat(16).view(16, 256).T.contiguous()
                values = dequantize(packed, d, "q4_0", torch.float32).numpy()  # [:, j] low nibble, [:, j + 16] high
                for nibble, col in ((0, 0), (1, 16)):
                    got = _fma(outs[pos + 4 * nibble], d[0, 0].float().item(), kt.Q4_0_BIAS.value)
                    assert np.array_equal(got, values[:, col]), (pos, nibble, sc)


def test_split_count_fills_the_last_wave_with_the_fewest_splits():
    """num_splits' contract, checked exhaustively on a grid of batches, slots and contexts: the fewest
    splits whose programs fill the last wave to WAVE_EFFICIENCY, else the best fill; never more than
    one split per MIN_SPLIT_TOKENS of max_context (nor MAX_SPLITS)."""
    import math

    from devstral.kernels import paged_attention_triton as pa

    def fill(programs, slots):
        return programs / (math.ceil(programs / slots) * slots)

    for batch in (1, 2, 3, 8, 16, 48, 64, 256):
        for slots in (132, 264, 396, 456):
            for max_context in (256, 4096, 131072):
                s = pa.num_splits(batch, 8, max_context, slots, DecodeConfig())
                useful = min(pa.MAX_SPLITS, max(1, -(-max_context // pa.MIN_SPLIT_TOKENS)))
                assert 1 <= s <= useful
                fills = [fill(batch * 8 * t, slots) for t in range(1, useful + 1)]
                good = [t + 1 for t, f in enumerate(fills) if f >= pa.WAVE_EFFICIENCY]
                assert s == (good[0] if good else 1 + fills.index(max(fills)))
    assert pa.num_splits(64, 8, 131072, 396, DecodeConfig()) == 3  # 1536 programs: 3.9 of 4 waves
    assert pa.num_splits(1, 8, 131072, 396, DecodeConfig(splits=7)) == 7


def test_blocks_per_sm_follows_cuda_occupancy_rules():
    from devstral.kernels.paged_attention_triton import blocks_per_sm

    h100 = dict(regs_per_sm=65536, smem_per_sm=233472, threads_per_sm=2048)
    assert blocks_per_sm(128, 72192, 4, **h100) == 3  # shared memory bound: 3 x 73 KB
    assert blocks_per_sm(190, 40960, 4, **h100) == 2  # 190 registers round to 192: 24576 per block
    assert blocks_per_sm(32, 0, 16, **h100) == 4  # threads bound: 2048 / 512
    assert blocks_per_sm(255, 200_000, 8, **h100) == 1


@sweep
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [None, 1, 5, 24, 1000])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_interpreter_sweep(kind, window, block_size):
    check(kind, [1, 2, 31, 70, 129], n_heads=8, n_kv_heads=2, head_dim=32, block_size=block_size, window=window,
          configs=[DecodeConfig(block_n=16, splits=1), DecodeConfig(block_n=16, splits=4),
                   DecodeConfig(block_n=32)], seed=block_size + (window or 0))


# ---------------------------------------------------------------- GPU
DEVSTRAL = dict(n_heads=32, n_kv_heads=8, head_dim=128, block_size=16)
GPU_CONFIGS = [DecodeConfig(), DecodeConfig(splits=1), DecodeConfig(fused_merge=True), DecodeConfig(block_n=32),
               DecodeConfig(num_stages=3), DecodeConfig(block_n=128, num_warps=8),
               DecodeConfig(block_n=128), DecodeConfig(min_chunk=512), DecodeConfig(min_chunk=1024, fused_merge=True),
               DecodeConfig(min_chunk=256, splits=1), DecodeConfig(prefetch=True),
               DecodeConfig(prefetch=True, fused_merge=True)]  # the benchmark's candidates


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_decode_batch_of_mixed_contexts(kind):
    lens = [1, 17, 300, 1024, 2049, 513, 4000, 64]
    check(kind, lens, **DEVSTRAL, configs=GPU_CONFIGS, device="cuda", seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_decode_long_context(kind):
    """32k keys: the dequantization's PTX (fp8, q8_0, q4_0) over many tiles, in both orientations."""
    check(kind, [32768, 1], **DEVSTRAL, configs=[DecodeConfig(), DecodeConfig(tokens_major=kind not in QUANT_KINDS),
                                                 DecodeConfig(block_n=128), DecodeConfig(fused_merge=True)],
          device="cuda", seed=2)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fp8", "q8_0", "q4_0"])
def test_gpu_decode_fp16_queries_over_quantized_caches(kind):
    check(kind, [3000, 17, 1], **DEVSTRAL, configs=[DecodeConfig()], device="cuda", seed=6, dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [1, 4096])
def test_gpu_decode_sliding_window(window):
    check("bf16", [5000, 100, 4096], **DEVSTRAL, window=window, configs=GPU_CONFIGS[:2], device="cuda", seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,fused,min_chunk", [("bf16", True, 0), ("bf16", False, 0), ("q8_0", True, 0),
                                                  ("bf16", False, 512), ("q8_0", True, 512), ("bf16", False, -1),
                                                  ("q4_0", True, -1)])
def test_gpu_decode_replays_in_a_cuda_graph_with_other_contexts(kind, fused, min_chunk):
    """Captured with every row at context 1; replayed with long, short and padding rows: the split grid
    comes from max_context alone, so the graph stays valid; the fused merge's counters are back at zero
    after every replay (the same contexts replayed twice give the same bits)."""
    dev, bs = "cuda", 16
    lens_a = [2000, 1, 700, 33]
    layer, tables, lens = filled_cache(kind, lens_a, 8, 128, bs, torch.bfloat16, dev, seed=4)
    q = queries(4, 32, 8, 128, torch.bfloat16, dev, 5)
    static_q, static_lens = q.clone(), torch.ones_like(lens)
    max_context = tables.shape[1] * bs
    cfg = DecodeConfig(fused_merge=fused, min_chunk=max(min_chunk, 0), prefetch=min_chunk < 0)  # -1: prefetch
    decode_attention_triton(static_q, layer, tables, static_lens, 0.088, None, max_context=max_context, config=cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(static_q, layer, tables, static_lens, 0.088, None, max_context=max_context,
                                      config=cfg)
    for new_lens in ([2000, 1, 700, 33], [1, 1999, 16, 512]):
        static_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        first = out.clone()
        graph.replay()
        ref = decode_attention_ref(static_q, layer, tables, static_lens, 0.088, None)
        torch.cuda.synchronize()
        assert torch.equal(first, out)
        assert (out.float() - ref.float()).abs().max().item() < 2e-2
    assert not arrival_counters(torch.device(dev)).any()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "fp8", "q8_0", "q4_0"])
def test_gpu_fused_merge_in_a_large_batch(kind):
    """64 rows of mixed contexts (and padding rows) over 8 kv heads: 512 groups count their splits in
    one launch, many merging at once; the same bits launch after launch."""
    lens = [1 + (i * 997) % 6000 for i in range(64)]
    check(kind, lens, **DEVSTRAL, configs=[DecodeConfig(fused_merge=True), DecodeConfig(splits=7, fused_merge=True)],
          device="cuda", seed=8)
    layer, tables, ctx = filled_cache(kind, lens[:8], 8, 128, 16, torch.bfloat16, "cuda", seed=9)
    q = queries(8, 32, 8, 128, torch.bfloat16, "cuda", 10)
    cfg = DecodeConfig(fused_merge=True)
    runs = [decode_attention_triton(q, layer, tables, ctx, 0.088, max_context=8192, config=cfg) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
