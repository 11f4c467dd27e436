"""The routed-expert kernels compiled offline for sm_90 (H100/H200; Triton's own ptxas and nvdisasm, no
GPU): no register spills, and SASS instructions per weight in the K loop near the dense streaming GEMV's
(tests/test_kernels_gguf_wide.py counts those: Q4_K 3.65 float / 2.34 int8 / 1.63 xq, Q6_K 7.6 / 6.2 /
3.38 at 8 rows a thread). The expert kernels run the same row dot; a change that falls off that frame (layout
conversions, per-weight scale work, activations reloaded per row) lands far above these bounds.

Counted when written: gate_up Q4_K at BN 64 (gate and up streamed together, 4 rows a thread each) 3.96
float / 2.51 int8 / 1.87 xq (activations quantized beforehand, gguf_xq.py); down at BN 128 Q4_K
3.65 / 2.34 / 1.64, Q6_K 7.77 / 6.24 / 3.40. With Q4_K's scales and mins packed in 12 bytes a super-block
(gguf_pack.py): gate_up 4.06 / 2.61 / 1.95, down 3.75 / 2.45 / 1.74 (bounds kept).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

TYPES = {"Q4_K": (0, 32, 4, 8, "*u8", "*u8"), "Q6_K": (2, 16, 2, 8, "*i8", "*i16")}
MODES = ("float", "int8", "xq")  # activations: fp32 / int8 quantized in the threads / beforehand (gguf_xq.py)
CASES = {("gate_up", "Q4_K", 64): (4.3, 2.8, 2.05), ("down", "Q4_K", 128): (4.0, 2.6, 1.8),
         ("down", "Q6_K", 128): (8.2, 6.6, 3.6)}


def _fields(prefix: str, qh_t: str, sc_t: str) -> dict:
    return {prefix + "q": "*i32", prefix + "qh": qh_t, prefix + "sc": sc_t, prefix + "mn": "*u8",
            prefix + "d": "*fp16", prefix + "dm": "*fp16"}


def _count(kind: str, qtype: str, bn: int, mode: str) -> dict:
    from devstral.kernels import sass_stats
    from devstral.kernels.moe_gemv import _gguf_down_kernel, _gguf_gate_up_kernel

    qt, sb, wps, e, sc_t, qh_t = TYPES[qtype]
    const = dict(TOPK=2, QT=qt, SB=sb, WPS=wps, E=e, BN=bn, NS=8, SPLIT=True, EVEN_N=True, EVEN_K=True, ASM=True,
                 INT8=mode != "float", XQ=mode == "xq", STAGES=1)
    act = "*i32" if mode == "xq" else "*bf16"  # gguf_xq's words
    if kind == "gate_up":
        ints = ("P", "N", "K", "s_xm", "s_hm", "as_q", "as_qh", "as_sc", "as_d", "bs_q", "bs_qh", "bs_sc", "bs_d",
                "one", "SPLIT_K")
        sig = {"x_ptr": act, "h_ptr": "*bf16", "ids_ptr": "*i64", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
               **_fields("a", qh_t, sc_t), **_fields("b", qh_t, sc_t), **dict.fromkeys(ints, "i32")}
        fn, weights, const["GLU"] = _gguf_gate_up_kernel, 2 * bn * 8 * sb, True
        aligned = ["N", "K", "s_xm", "s_hm", "as_q", "as_qh", "as_sc", "bs_q", "bs_qh", "bs_sc"]
    else:
        ints = ("T", "N", "K", "s_hm", "s_om", "s_rm", "s_q", "s_qh", "s_sc", "s_d", "one", "SPLIT_K")
        sig = {"h_ptr": act, "out_ptr": "*bf16", "res_ptr": "*bf16", "ids_ptr": "*i64", "w_ptr": "*fp32",
               "ws_ptr": "*fp32", "cnt_ptr": "*i32", **_fields("", qh_t, sc_t), **dict.fromkeys(ints, "i32")}
        fn, weights, const["RES"] = _gguf_down_kernel, bn * 8 * sb, True  # the residual, as the model runs it
        aligned = ["N", "K", "s_hm", "s_om", "s_rm", "s_q", "s_qh", "s_sc"]
    # what the launcher specializes at Mixtral's shapes: aligned pointers, strides and sizes divisible by 16
    div16 = [n for n, t in sig.items() if t.startswith("*")] + aligned
    st = sass_stats.loop_stats(sass_stats.compile_sass(fn, sig, const, div16=div16, num_warps=4))
    return {"per_weight": st.instructions / (weights / 128), "spilled": st.registers_spilled}


def _counts() -> dict:
    return {f"{kind}|{qtype}|{bn}|{mode}": _count(kind, qtype, bn, mode) for (kind, qtype, bn) in CASES for mode in MODES}


@pytest.fixture(scope="module")
def counts():
    from devstral.kernels import sass_stats

    if not sass_stats.tools_available():
        pytest.skip("Triton's ptxas / nvdisasm not shipped on this platform")
    return sass_stats.offline_json(__file__)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{c[0]}_{c[1]}_bn{c[2]}")
def test_expert_kernels_stay_on_the_streaming_frame_on_sm90(counts, case, mode):
    st = counts["|".join(map(str, (*case, mode)))]
    assert not st["spilled"]
    assert st["per_weight"] < CASES[case][MODES.index(mode)], st


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    print(json.dumps(_counts()))
