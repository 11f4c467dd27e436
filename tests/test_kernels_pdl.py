"""Programmatic dependent launch (kernels/pdl.py), checked offline: every kernel of the decode chain,
compiled for sm_90 as a dependent launch, touches no memory the kernel before it may have written until
griddepcontrol.wait.

A dependent may be scheduled while the kernel before it still runs; the wait is what orders it after
that kernel's writes. So in each kernel's PTX nothing is stored (st.global, atomics) before the wait,
and only what no kernel before can have written is loaded before it: the GEMV's first tile of weights,
the norm's weight (and, when the caller vouches for it, the residual stream it adds to). A load
or store moved above the wait would be a race that shows only now and then on the GPU; here it fails
in CI. The kernels compile in a subprocess (no interpreter state from other tests).
"""

from __future__ import annotations

import json
import re
import sys

import pytest

pytest.importorskip("triton")

MEMORY_OPS = {"loads": re.compile(r"\bld\.global|\bcp\.async\.(?:ca|cg)"),
              "stores": re.compile(r"\bst\.global|\batom\.|\bred\."),
              "prefetches": re.compile(r"\bprefetch\.global\.L2")}


def _compile(fn, sig: dict, const: dict, **options) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**sig, **dict.fromkeys(const, "constexpr")}
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "launch_pdl": True, **options})
    ptx = k.asm["ptx"]
    at = ptx.find("griddepcontrol.wait")
    head = ptx[:at] if at >= 0 else ptx
    # global loads after the first CTA barrier behind the wait (a reduction's): each one more L2 round trip
    tail = ptx[at:] if at >= 0 else ptx
    bar = tail.find("bar.sync")
    late = len(MEMORY_OPS["loads"].findall(tail[bar:])) if bar >= 0 else 0
    return {"launch_pdl": bool(k.metadata.launch_pdl), "waits": ptx.count("griddepcontrol.wait"),
            "timer_reads": ptx.count("%globaltimer"),
            "signals": ptx.count("griddepcontrol.launch_dependents"), "loads_after_barrier": late,
            "signals_before_wait": head.count("griddepcontrol.launch_dependents"),
            "loads_after_wait": len(MEMORY_OPS["loads"].findall(tail)) if at >= 0 else 0,
            **{name: len(op.findall(head)) for name, op in MEMORY_OPS.items()}}


def _sig(names: str, pointers: dict) -> dict:
    return {n: pointers.get(n, "i32") for n in names.split()}


def _gemv(stream: bool, stages: int, fixed: bool = False) -> dict:
    from devstral.kernels.gguf_gemv_wide import _wide_kernel

    sig = _sig("x_ptr out_ptr bias_ptr ws_ptr cnt_ptr q_ptr qh_ptr sc_ptr mn_ptr d_ptr dm_ptr M N K s_xm s_om s_q s_qh "
               "s_sc s_d one SPLIT_K",
               {"x_ptr": "*i32", "out_ptr": "*i64" if fixed else "*bf16", "bias_ptr": "*bf16",
                "ws_ptr": "*i64" if fixed else "*fp32", "cnt_ptr": "*i32",
                "q_ptr": "*i32", "qh_ptr": "*i32", "sc_ptr": "*u8", "mn_ptr": "*u8", "d_ptr": "*fp16",
                "dm_ptr": "*fp16"})
    const = dict(QT=0, SB=32, WPS=4, E=8, BN=64, NS=8, BM=1, SPLIT=not stream, HAS_BIAS=False, EVEN_N=True,
                 EVEN_K=True, ASM=True, INT8=True, STAGES=stages, XQ=True, PDL=True, STREAM=stream, FIXED=fixed)
    return _compile(_wide_kernel, sig, const, num_stages=max(stages, 1))


def _all() -> dict:
    import triton.language as tl

    from devstral.kernels import (
        gguf_xq,
        kv_store_triton,
        paged_attention_triton,
        rms_norm_triton,
        rope_kv_store_triton,
        rope_triton,
        silu_mul_triton,
    )

    bf16 = "*bf16"
    stamp_ptr = {"stamps_ptr": "*i64"}  # DEVSTRAL_STAMPS=1 (kernels/stamps.py): the same kernels timing themselves
    out = {}

    def norm(delta, xq, settled=False, stamped=False):
        """RMSNorm; xq: also writing the GEMV's activations in both layouts (rms_norm_triton.py)."""
        return _compile(
            rms_norm_triton._rms_norm_kernel,
            _sig("x_ptr x_row_stride delta_ptr delta_row_stride w_ptr out_ptr res_ptr xq_ptr xq_second n_cols eps"
                 + (" stamps_ptr" if stamped else ""),
                 {"x_ptr": bf16, "delta_ptr": bf16, "w_ptr": bf16, "out_ptr": bf16, "res_ptr": bf16, "xq_ptr": "*i32",
                  "eps": "fp32", **stamp_ptr}),
            dict(HAS_DELTA=delta, BLOCK=8192, PDL=True, XQ_A=0 if xq else -1, XQ_B=1 if xq else -1, XB=16,
                 X_SETTLED=settled, STAMPS=stamped),
            num_warps=16)

    for delta, xq, settled in ((False, False, False), (True, False, False), (False, True, False), (True, True, False),
                               (True, False, True), (True, True, True)):
        out[f"rms_norm{'_add' if delta else ''}{'_xq' if xq else ''}{'_settled' if settled else ''}"] = norm(
            delta, xq, settled)
    out["rms_norm_add_xq_settled_stamps"] = norm(True, True, True, stamped=True)
    out["silu_mul"] = _compile(silu_mul_triton._silu_mul_kernel,
                               _sig("gate_ptr up_ptr out_ptr n_cols gate_row_stride up_row_stride",
                                    {"gate_ptr": bf16, "up_ptr": bf16, "out_ptr": bf16}), dict(BLOCK=2048, PDL=True))
    names = ("q_ptr k_ptr cos_ptr sin_ptr qs_ptr q_out_ptr k_out_ptr T n_heads n_kv_heads q_sb q_st q_sh k_sb k_st "
             "k_sh c_sb c_st s_sb s_st qs_sb qs_st")
    out["rope"] = _compile(rope_triton._rope_kernel, _sig(names, dict.fromkeys(names.split()[:7], bf16)),
                           dict(HALF=64, BLOCK_HALF=64, BLOCK_H=32, BLOCK_HK=8, HAS_Q_SCALE=True, PDL=True),
                           enable_fp_fusion=False)
    names = "k_ptr v_ptr slot_ptr kc_ptr vc_ptr ks_ptr vs_ptr k_st k_sh v_st v_sh c_sb c_so c_sh s_sb s_so s_sh n_heads"
    for kind, cache, scale in ((kv_store_triton.KIND_FLOAT, bf16, bf16), (kv_store_triton.KIND_Q8_0, "*i8", "*fp16")):
        out[f"store_kv_{kind}"] = _compile(
            kv_store_triton._store_kv_kernel,
            _sig(names, {"k_ptr": bf16, "v_ptr": bf16, "slot_ptr": "*i64", "kc_ptr": cache, "vc_ptr": cache,
                         "ks_ptr": scale, "vs_ptr": scale}),
            dict(PAGE=16, HEAD_DIM=128, BLOCK_H=8, KIND=kind, PDL=True), enable_fp_fusion=False)

    def rope_store(kind, cache, scale, stamped=False):
        names = ("q_ptr k_ptr v_ptr cos_ptr sin_ptr qs_ptr q_out_ptr k_out_ptr slot_ptr kc_ptr vc_ptr ks_ptr vs_ptr "
                 "n_heads n_kv_heads q_st q_sh k_st k_sh v_st v_sh c_st s_st qs_st c_sb c_so c_sh s_sb s_so s_sh"
                 + (" stamps_ptr" if stamped else ""))
        return _compile(
            rope_kv_store_triton._rope_store_kernel,
            _sig(names, {**dict.fromkeys(names.split()[:8], bf16), "qs_ptr": "*fp32", "slot_ptr": "*i64",
                         "kc_ptr": cache, "vc_ptr": cache, "ks_ptr": scale, "vs_ptr": scale, **stamp_ptr}),
            dict(HALF=64, BLOCK_HALF=64, BLOCK_H=32, BLOCK_HK=8, PAGE=16, KIND=kind, HAS_Q_SCALE=True, PDL=True,
                 STAMPS=stamped),
            enable_fp_fusion=False)

    for kind, cache, scale in ((kv_store_triton.KIND_FLOAT, bf16, bf16), (kv_store_triton.KIND_Q8_0, "*i8", "*fp16")):
        out[f"rope_store_kv_{kind}"] = rope_store(kind, cache, scale)
    out["rope_store_kv_stamps"] = rope_store(kv_store_triton.KIND_FLOAT, bf16, bf16, stamped=True)
    pa = paged_attention_triton

    def split(output=pa.OUT_PARTIALS, kind=0, cache=bf16, scale=bf16, tokens_major=False, stamped=False, **extra):
        """The decode attention's pass 1 (bf16 cache and partials unless told otherwise)."""
        names = ("q_ptr q_sb q_sh k_ptr v_ptr ks_ptr vs_ptr c_sb c_so c_sh s_sb s_so s_sh table_ptr table_sb len_ptr "
                 "out_ptr out_sb out_sh part_out_ptr part_lse_ptr arrivals_ptr xq_ptr xq_sb scale_log2e window num_splits min_chunk "
                 "n_heads" + (" stamps_ptr" if stamped else ""))
        return _compile(
            pa._decode_split_kernel,
            _sig(names, {"q_ptr": bf16, "k_ptr": cache, "v_ptr": cache, "ks_ptr": scale, "vs_ptr": scale,
                         "table_ptr": "*i32", "len_ptr": "*i32", "out_ptr": bf16, "part_out_ptr": "*fp32",
                         "part_lse_ptr": "*fp32", "arrivals_ptr": "*i32", "xq_ptr": "*i32", "scale_log2e": "fp32",
                         **stamp_ptr}),
            dict(GROUP=4, HEAD_DIM=128, PAGE=16, BLOCK_H=16, BLOCK_N=64, KIND=kind, HAS_WINDOW=False,
                 OUTPUT=output.value, DOT_T=tl.bfloat16, PRECISION="tf32", FOLD_V_SCALE=True,
                 SCALES=4 if kind else 1, TOKENS_MAJOR=tokens_major, ASM=True, MERGE_HEADS=4, MERGE_CHUNK=16,
                 PDL=True, STAMPS=stamped, **{"XQ": -1, **extra}), num_stages=2)

    def merge(stamped=False, **extra):
        """The decode attention's pass 2."""
        return _compile(
            pa._decode_merge_kernel,
            _sig("part_out_ptr part_lse_ptr len_ptr out_ptr out_sb out_sh window num_splits min_chunk n_heads xq_ptr "
                 "xq_sb" + (" stamps_ptr" if stamped else ""),
                 {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "len_ptr": "*i32", "out_ptr": bf16,
                  "xq_ptr": "*i32", **stamp_ptr}),
            dict(HEAD_DIM=128, BLOCK_S=8, BLOCK_N=64, HAS_WINDOW=False, MERGE_CHUNK=8, PDL=True, STAMPS=stamped, XQ=-1)
            | extra)

    for output, suffix in ((pa.OUT_PARTIALS, ""), (pa.OUT_DIRECT, "_direct"), (pa.OUT_MERGED, "_merged")):
        out[f"decode_split{suffix}"] = split(output)
        out[f"decode_split{suffix}_q8_0"] = split(output, kind=2, cache="*i32", scale="*fp16", tokens_major=True)
    out["decode_split_prefetch"] = split(PREFETCH=True, ROW_LINES=2, LINE=64)  # DecodeConfig(prefetch=True)
    # pass 1 writing the o projection's int8 activations: the fused merge, and one split for the grid
    out["decode_split_merged_xq"] = split(pa.OUT_MERGED, LEN_EARLY=True, XQ=0)
    out["decode_split_direct_xq"] = split(pa.OUT_DIRECT, LEN_EARLY=True, XQ=1)
    out["decode_merge"] = merge()
    # decode_attention_triton(settled=True), the engine's call: both passes read the context length before the wait
    out["decode_split_len_early"] = split(LEN_EARLY=True)
    out["decode_merge_len_early"] = merge(LEN_EARLY=True)
    out["decode_split_stamps"] = split(stamped=True)
    out["decode_merge_stamps"] = merge(stamped=True)
    # the engine's merge at 45 splits (Devstral on an H200): 64 split rows, one chunk
    out["decode_merge_64"] = merge(BLOCK_S=64, MERGE_CHUNK=64, LEN_EARLY=True)
    out["decode_merge_64_xq"] = merge(BLOCK_S=64, MERGE_CHUNK=64, LEN_EARLY=True, XQ=0)  # writing o's activations
    out["quantize"] = _compile(gguf_xq._quantize_kernel, _sig("x_ptr out_ptr K s_xm s_om", {"x_ptr": bf16, "out_ptr": "*i32"}),
                               dict(LAYOUT=0, BLOCKS=16, PDL=True))
    for stream in (False, True):
        for stages in (1, 3):
            out[f"gemv{'_stream' if stream else ''}_stages{stages}"] = _gemv(stream, stages)
    out["gemv_stages0"] = _gemv(False, 0)  # one K-tile a program (gguf_gemv_wide.one_tile)
    # fixed-point outputs (kernels/fixed_point.py): the atomics and the other buffer's zeroing after the wait
    out["gemv_fixed_stages0"] = _gemv(False, 0, fixed=True)
    out["gemv_fixed_stream_stages1"] = _gemv(True, 1, fixed=True)
    out.update(_moe())
    return out


def _moe() -> dict:
    """The mixture-of-experts decode kernels: the router, and the Q4_K expert gate/up and down (float
    activations in the register-prefetch loop; xq: activations quantized beforehand, pipelined loop)."""
    from devstral.kernels import moe_gemv, moe_router

    out = {"moe_router": _compile(
        moe_router._router_kernel,
        _sig("x_ptr w_ptr ids_ptr wt_ptr ws_ptr cnt_ptr T D s_xm s_wm n_split",
             {"x_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i64", "wt_ptr": "*fp32", "ws_ptr": "*fp32",
              "cnt_ptr": "*i32"}),
        dict(E=8, BE=8, BD=512, KP=2, TOPK=2, PDL=True))}
    fields = {"q": "*i32", "qh": "*i32", "sc": "*u8", "mn": "*u8", "d": "*fp16", "dm": "*fp16"}
    const = dict(TOPK=2, QT=0, SB=32, WPS=4, E=8, BN=64, NS=8, SPLIT=True, EVEN_N=True, EVEN_K=True, ASM=True,
                 PDL=True)
    for xq in (False, True):
        act = "*i32" if xq else "*bf16"  # gguf_xq's words
        loop = dict(INT8=True, XQ=True, STAGES=3) if xq else dict(INT8=False, STAGES=1)
        suffix = "_xq" if xq else ""
        out["moe_gate_up" + suffix] = _compile(
            moe_gemv._gguf_gate_up_kernel,
            _sig("x_ptr h_ptr ids_ptr ws_ptr cnt_ptr aq aqh asc amn ad adm bq bqh bsc bmn bd bdm P N K s_xm s_hm as_q "
                 "as_qh as_sc as_d bs_q bs_qh bs_sc bs_d one SPLIT_K",
                 {"x_ptr": act, "h_ptr": "*bf16", "ids_ptr": "*i64", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
                  **{p + f: t for p in "ab" for f, t in fields.items()}}),
            {**const, **loop, "GLU": True}, num_stages=loop["STAGES"])
        out["moe_down" + suffix] = _compile(
            moe_gemv._gguf_down_kernel,
            _sig("h_ptr out_ptr res_ptr ids_ptr w_ptr ws_ptr cnt_ptr q qh sc mn d dm T N K s_hm s_om s_rm s_q s_qh "
                 "s_sc s_d one SPLIT_K",
                 {"h_ptr": act, "out_ptr": "*bf16", "res_ptr": "*bf16", "ids_ptr": "*i64", "w_ptr": "*fp32",
                  "ws_ptr": "*fp32", "cnt_ptr": "*i32", **fields}),
            {**const, **loop, "RES": True}, num_stages=loop["STAGES"])
    return out


@pytest.fixture(scope="module")
def ptx_stats():
    from devstral.kernels import pdl, sass_stats

    if not sass_stats.tools_available():
        pytest.skip("Triton's ptxas not shipped on this platform")
    if pdl.gdc_wait is None:
        pytest.skip("this Triton has no griddepcontrol (dependent launch stays off)")
    return sass_stats.offline_json(__file__, "--ptx")


NORMS = ["rms_norm", "rms_norm_add", "rms_norm_xq", "rms_norm_add_xq", "rms_norm_add_settled", "rms_norm_add_xq_settled"]
SMALL = ["silu_mul", "rope", "store_kv_0", "store_kv_2", "rope_store_kv_0",
         "rope_store_kv_2", "decode_split", "decode_split_direct", "decode_split_merged", "decode_split_q8_0",
         "decode_split_direct_q8_0", "decode_split_merged_q8_0", "decode_merge", "quantize"]
SMALL_SETTLED = ["decode_split_len_early", "decode_merge_len_early", "decode_merge_64_xq"]
MOE = ["moe_router", "moe_gate_up", "moe_down", "moe_gate_up_xq", "moe_down_xq"]
GEMVS = ["gemv_stages1", "gemv_stages3", "gemv_stream_stages1", "gemv_stream_stages3", "gemv_stages0",
         "gemv_fixed_stages0", "gemv_fixed_stream_stages1"]


@pytest.mark.parametrize("name", SMALL)
def test_small_kernels_wait_before_touching_memory(ptx_stats, name):
    """SwiGLU, RoPE, the KV store (alone and with
    RoPE), decode attention (each of its outputs: direct, partials, partials merged in the launch through
    arrival counters), the activation quantization: the wait comes first; each also signals its dependents."""
    st = ptx_stats[name]
    assert st["launch_pdl"] and st["waits"] >= 1 and st["signals"] >= 1, st
    assert st["loads"] == 0 and st["stores"] == 0, st


@pytest.mark.parametrize("xq", ["", "_xq"])
def test_the_norm_loads_only_its_weight_and_a_settled_x_before_it_waits(ptx_stats, xq):
    """RMSNorm (alone and writing the GEMV's activations too) stores nothing before the wait and loads only
    what the kernel before cannot have written: its weight, and x when the caller says x is settled. x,
    delta and (in the non-xq kernel) the weight are tiles of one shape, so the counts say which is which:
    the plain norm's loads after the wait are x's, the add's twice that (x and delta); the settled add
    moves exactly x's loads before the wait and leaves delta's, as many, after it."""
    plain, add, settled = (ptx_stats[f"rms_norm{kind}{xq}{tail}"] for kind, tail in
                           (("", ""), ("_add", ""), ("_add", "_settled")))
    for st in (plain, add, settled):
        assert st["launch_pdl"] and st["waits"] == 1 and st["signals"] >= 1 and st["stores"] == 0, st
    x_loads = plain["loads_after_wait"]
    assert plain["loads"] >= 1 and add["loads"] == plain["loads"], (plain, add)  # the weight, and only it
    assert add["loads_after_wait"] == 2 * x_loads, (plain, add)
    assert settled["loads"] == plain["loads"] + x_loads and settled["loads_after_wait"] == x_loads, (plain, settled)
    if not xq:  # the weight is one row-shaped tile, like x
        assert plain["loads"] == x_loads, plain


@pytest.mark.parametrize("name", NORMS)
def test_the_norm_loads_everything_before_its_sum(ptx_stats, name):
    """RMSNorm issues all its loads (the row, the delta, the weight, and with xq its own blocks of them)
    before the row's sum of squares, whose cross-warp step is a barrier: one L2 round trip on the decode
    step's chain instead of two."""
    assert ptx_stats[name]["loads_after_barrier"] == 0, ptx_stats[name]


def test_decode_attention_prefetch_reads_only_before_it_waits(ptx_stats):
    """DecodeConfig(prefetch=True): before the wait the split reads the context length and its first tile's
    block-table entries (the host wrote both before the step) and asks L2 for that tile's keys and values;
    it stores nothing."""
    st = ptx_stats["decode_split_prefetch"]
    assert st["launch_pdl"] and st["waits"] >= 1 and st["signals"] >= 1, st
    assert st["stores"] == 0 and st["loads"] >= 2 and st["prefetches"] >= 2, st


@pytest.mark.parametrize("name", SMALL_SETTLED)
def test_decode_attention_reads_a_settled_context_length_before_it_waits(ptx_stats, name):
    """settled=True (the engine's step inputs were copied in before the step): each pass loads the row's
    context length before the wait -- one load, the only one -- and stores nothing before it."""
    st = ptx_stats[name]
    assert st["launch_pdl"] and st["waits"] == 1 and st["signals"] >= 1, st
    assert st["loads"] == 1 and st["stores"] == 0, st


@pytest.mark.parametrize("name", ["decode_merge_64", "decode_merge_64_xq"])
def test_the_merge_loads_its_partials_with_the_log_sum_exps(ptx_stats, name):
    """The merge pass (one chunk of splits, as the engine runs it) issues every partial's load before the
    log-sum-exps' cross-warp reduction that its weights need: one L2 round trip after its wait, not two
    (the loads sat behind that reduction's barrier before)."""
    st = ptx_stats[name]
    assert st["loads_after_wait"] >= 64 and st["loads_after_barrier"] == 0, st


@pytest.mark.parametrize("name", ["decode_merge", "decode_merge_len_early", "decode_merge_stamps",
                                  "decode_merge_64_xq"])
def test_the_merge_lets_the_o_projection_start_only_after_its_wait(ptx_stats, name):
    """The merge pass signals its dependent (the o projection's GEMV, whose programs send their only weight
    tile to DRAM as soon as they are resident) after its wait, so that those loads do not queue beside the
    split pass's round trips; the split pass itself signals first thing (its dependent is the merge, which
    loads nothing before its wait but the context length)."""
    st = ptx_stats[name]
    assert st["launch_pdl"] and st["waits"] == 1 and st["signals"] >= 1, st
    assert st["signals_before_wait"] == 0, st
    for split in ("decode_split", "decode_split_len_early"):
        assert ptx_stats[split]["signals_before_wait"] >= 1, ptx_stats[split]


@pytest.mark.parametrize("name", ["decode_split_merged_xq", "decode_split_direct_xq"])
def test_pass_one_writing_o_activations_stores_nothing_before_its_wait(ptx_stats, name):
    """Pass 1 packing the o projection's int8 activations (from the fused merge's last split, or from every
    split when one split covers the grid) stores nothing before the wait; the context length (settled) is
    the one load before it, and the merge's dependents are signalled as before."""
    st = ptx_stats[name]
    assert st["launch_pdl"] and st["waits"] >= 1 and st["signals"] >= 1, st
    assert st["stores"] == 0 and st["loads"] == 1, st


@pytest.mark.parametrize("name", MOE)
def test_moe_kernels_wait_before_touching_memory(ptx_stats, name):
    """The router and the expert GEMVs: the expert ids the GEMVs read are the router's output, so
    nothing is loaded before the wait (no weight prefetch, unlike the dense GEMV)."""
    st = ptx_stats[name]
    assert st["launch_pdl"] and st["waits"] >= 1 and st["signals"] >= 1, st
    assert st["loads"] == 0 and st["stores"] == 0, st


@pytest.mark.parametrize("name", GEMVS)
def test_gemv_writes_nothing_before_it_waits(ptx_stats, name):
    """The GEMV stores nothing before the wait: split-K partials, counters and the output come after it.
    The register-prefetch loop (one stage) issues its first tile's weight and scale loads before it --
    weights are never written -- so that they are on their way while the kernel before still runs; the
    shared-memory pipeline's prologue reads activations too, so it waits first. A program of one K-tile
    (stages0) loads all of its weights before it."""
    st = ptx_stats[name]
    assert st["launch_pdl"] and st["waits"] >= 1 and st["signals"] >= 1, st
    assert st["stores"] == 0, st
    if name.endswith(("stages1", "stages0")):
        assert st["loads"] >= 8, st


if __name__ == "__main__" and sys.argv[1:] == ["--ptx"]:
    print(json.dumps(_all()))


STAMPED = {"decode_split_stamps": "decode_split", "decode_merge_stamps": "decode_merge",
           "rms_norm_add_xq_settled_stamps": "rms_norm_add_xq_settled", "rope_store_kv_stamps": "rope_store_kv_0"}


@pytest.mark.parametrize("name", sorted(STAMPED))
def test_stamped_kernels_time_themselves_and_store_only_after_the_wait(ptx_stats, name):
    """DEVSTRAL_STAMPS=1 (kernels/stamps.py): the kernel reads %globaltimer (at its start, after the wait,
    after its work, at its end), still stores nothing before the wait and loads nothing more before it;
    compiled without stamps it reads no timer at all."""
    st, plain = ptx_stats[name], ptx_stats[STAMPED[name]]
    assert st["timer_reads"] >= 3 and plain["timer_reads"] == 0, (st, plain)
    assert st["stores"] == 0 and st["loads"] == plain["loads"] and st["waits"] == plain["waits"], (st, plain)
