"""Which kernel and which launch configuration for a quantized matmul of a given shape.

Five paths, by the number of activation rows M:
  wide     M <= 8                streaming float GEMV (gguf_gemv_wide.py): several rows per thread, next
                                 tile prefetched; the default for Q4_K / Q8_0 at M = 1
  wide_i8  M <= 8                the same with int8 activations and dp4a (Q4_K/Q5_K/Q6_K/Q8_0), where
                                 measured
  wide_xq  M <= 8                wide_i8 with the activations quantized once beforehand (gguf_xq.py)
  wide_tma M = 1                 wide_xq's arithmetic on weight tiles brought by TMA into a shared-memory
                                 pipeline (gguf_gemv_tma.py): only where a tuned entry names it
  idot     M <= 8                Q4_K/Q6_K/Q8_0: int8 activations, dp4a on the packed weights (gguf_idot.py)
  gemv     M <= gemv_max_m       CUDA-core fused dequantize-GEMV (reads each weight byte once)
  gemm     M <= gemm_max_m       tensor-core GEMM that dequantizes tiles in registers
  dequant  larger M              dequantize a band of rows into a reused bf16 scratch, then cuBLAS

At decode sizes (M <= 8) a tuned table's "gguf_decode" entry for the exact shape wins: the path and
launch config benchmarks/gguf_gemv_sweep.py measured fastest at the smallest measured M >= m (1, 2,
4, 8). Otherwise a tuned table's "kinds" (per type: the fastest path at each measured M) decides the
path when present, else the defaults below. Launch configs come from a tuned table when one matches the device (or, without one, a GPU of the same
architecture and SM count: table_for) and the exact shape
(benchmarks/quant_kernels.py writes it: copy its "tuned" object to kernels/tuned/<device>.json, or
point DEVSTRAL_KERNEL_TUNING at the file), otherwise from the rules below. Everything here is host
arithmetic on shapes: nothing reads GPU memory, so the choice is the same inside a CUDA graph.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

import torch

# defaults until a tuned table says otherwise (per type: the M where each path stops)
DEFAULT_THRESHOLDS = {"gemv_max_m": 4, "gemm_max_m": 512}
# sub-blocks per GEMV tile: 256 weights of a row per iteration
GEMV_NS = {"Q4_K": 8, "Q5_K": 8, "Q6_K": 16, "Q8_0": 8}
GEMM_NSUB = {"Q4_K": 4, "Q5_K": 4, "Q6_K": 8, "Q8_0": 4}
# integer-dot GEMV (gguf_idot.py): the types it reads, the rows it serves, sub-blocks per tile at M <= 2
IDOT_TYPES = ("Q4_K", "Q6_K", "Q8_0")
IDOT_MAX_M = 8
IDOT_NS = {"Q4_K": 8, "Q6_K": 16, "Q8_0": 4}
# paths that quantize the activations to int8 (DEVSTRAL_GGUF_FLOAT_GEMV=1 turns them into the float ones)
INT8_KINDS = ("idot", "wide_i8", "wide_xq", "wide_tma")
WIDE_INT8_KINDS = ("wide_i8", "wide_xq")  # the streaming GEMV with int8 activations (in-kernel / gguf_xq)
# the types the streaming GEMV has an int8-activation row dot for (the MoE expert kernels share it); not
# IDOT_TYPES, which are gguf_idot.py's
WIDE_INT8_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0")
# the streaming GEMV (gguf_gemv_wide.py): types it is the default for without a measured table, the
# batch sizes the sweep measures (others use the next measured one up)
WIDE_DEFAULT_TYPES = ("Q4_K", "Q8_0")
DECODE_MS = (1, 2, 4, 8)
TUNED_DIR = Path(__file__).parent / "tuned"
log = logging.getLogger(__name__)


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@functools.cache
def tuned_table(device_label: str) -> dict:
    """The tuned table for a device name ({} when there is none)."""
    path = os.environ.get("DEVSTRAL_KERNEL_TUNING")
    candidates = [Path(path)] if path else [TUNED_DIR / f"{_slug(device_label)}.json"]
    for p in candidates:
        if p.is_file():
            with open(p) as f:
                return json.load(f)
    return {}


def table_for(device: torch.device | None) -> dict:
    """The tuned table for this device: its own, or DEVSTRAL_KERNEL_TUNING's, or else one measured on a GPU of the same
    architecture and SM count (see sibling_table); {} off CUDA."""
    if device is None or device.type != "cuda":
        return {}
    return tuned_table(device_name(device)) or sibling_table(device_capability(device), sm_count(device))


@functools.cache
def device_capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


@functools.cache
def sibling_table(capability: tuple[int, int], sms: int) -> dict:
    """A table measured on another GPU of this compute capability and SM count (its "capability" and "sms"): an H100
    SXM takes the H200's -- the same 132 SMs, cores and 228 KB of shared memory a block, so its measured tiles fit
    and rank alike though the H100's memory is slower (Devstral-shape Q8_0 decode on an H100, one lease: 105.4 tok/s
    with the H200's table, 93.1 with the rules below). {} when none matches."""
    if os.environ.get("DEVSTRAL_KERNEL_TUNING"):
        return {}
    for path in sorted(TUNED_DIR.glob("*.json")):
        with open(path) as f:
            table = json.load(f)
        if tuple(table.get("capability", ())) == tuple(capability) and table.get("sms") == sms:
            log.info("no kernel table measured on this GPU: using %s's (same architecture and SM count)",
                     table.get("device", path.stem))
            return table
    return {}


def split_k(tiles: int, k_steps: int, sms: int, *, min_steps: int = 2, max_split: int = 16) -> int:
    """Split K until there are about two programs per SM, keeping >= min_steps iterations each."""
    want = 2 * sms
    s = 1
    while s < max_split and tiles * s < want and k_steps // (2 * s) >= min_steps:
        s *= 2
    return s


def gemv_bm(m: int) -> int:
    return 1 if m == 1 else (2 if m == 2 else 4)


def idot_bm(m: int) -> int:
    return m if m <= 2 else (4 if m <= 4 else 8)


def measured_kind(table: dict, qtype: str, m: int) -> str | None:
    """The fastest path the benchmark measured for this type at the smallest measured M >= m (summed
    over the model's matrix shapes), or None when the table has no per-M entry for the type."""
    kinds = table.get("kinds", {}).get(qtype)
    if not kinds:
        return None
    bucket = next((b for b in sorted(int(key) for key in kinds) if b >= m), None)
    kind = "dequant" if bucket is None else kinds[str(bucket)]
    return "dequant" if kind == "dequant_cublas" else kind


def decode_entry(table: dict, qtype: str, m: int, n: int, k: int) -> dict | None:
    """The sweep's winner for this exact shape at the smallest measured M >= m, or None."""
    entries = table.get("gguf_decode")
    bucket = next((b for b in DECODE_MS if b >= m), None)
    if not entries or bucket is None:
        return None
    return entries.get(f"{qtype}|{bucket}|{n}|{k}")


def wide_config(qtype: str, m: int, n: int, k: int, sms: int) -> dict:
    """Launch config of the streaming GEMV without a measurement: 8 rows per thread at one activation
    row (BN=128 over 4 warps), 4 with more (BN=64: more would spill registers, counted offline), one
    super-block of a row per tile (half of one for Q6_K), split-K until two programs per SM."""
    bm = gemv_bm(m)
    ns, bn = 8, 128 if bm == 1 else 64
    sb = 16 if qtype == "Q6_K" else 32
    tiles = -(-n // bn) * -(-m // bm)
    return dict(bn=bn, ns=ns, bm=bm, split_k=split_k(tiles, k // (sb * ns), sms), num_warps=4)


def _decode_plan(hit: dict, qtype: str, m: int, n: int, k: int, sms: int) -> tuple[str, dict]:
    kind = hit["kind"]
    cfg = {key: v for key, v in hit.items() if key != "kind"}
    if kind in INT8_KINDS and os.environ.get("DEVSTRAL_GGUF_FLOAT_GEMV"):
        return "wide", wide_config(qtype, m, n, k, sms)
    cfg["bm"] = idot_bm(m) if kind == "idot" else gemv_bm(m)  # the entry's bucket may hold more rows than m
    return kind, cfg


def default_kind(qtype: str, m: int, limits: dict) -> str:
    if m == 1 and qtype in WIDE_DEFAULT_TYPES:
        # fewer instructions per weight than the float GEMV (SASS counted offline for sm_90:
        # tests/test_kernels_gguf_wide.py) and the next tile's loads in flight while computing
        return "wide"
    # Measured on an H200 (benchmarks/results/quant_kernels_h200.json): the integer-dot GEMV wins for
    # Q6_K up to 8 rows and for Q4_K from 2 rows; the float GEMV for Q4_K and Q8_0 at one row.
    if m <= IDOT_MAX_M and (qtype == "Q6_K" or (qtype == "Q4_K" and m >= 2)):
        return "idot"
    if m <= limits["gemv_max_m"]:
        return "gemv"
    return "gemm" if m <= limits["gemm_max_m"] else "dequant"


def gguf_plan(qtype: str, m: int, n: int, k: int, device: torch.device | None = None) -> tuple[str, dict]:
    table = table_for(device)
    limits = {**DEFAULT_THRESHOLDS, **table.get("thresholds", {}).get(qtype, {})}
    sms = sm_count(device) if device is not None and device.type == "cuda" else 132
    sb = 16 if qtype == "Q6_K" else 32
    hit = decode_entry(table, qtype, m, n, k) if m <= DECODE_MS[-1] else None
    if hit:
        return _decode_plan(hit, qtype, m, n, k, sms)
    kind = measured_kind(table, qtype, m) or default_kind(qtype, m, limits)
    if kind == "wide_tma":  # its tiles are measured per shape (a "gguf_decode" entry); without one, its loop's kind
        kind = "wide_xq"
    if kind in WIDE_INT8_KINDS and (qtype not in WIDE_INT8_TYPES or os.environ.get("DEVSTRAL_GGUF_FLOAT_GEMV")):
        kind = "wide"
    if kind in WIDE_INT8_KINDS:
        return kind, wide_config(qtype, m, n, k, sms)
    if kind == "wide":
        return "wide", wide_config(qtype, m, n, k, sms)
    if kind == "idot" and (qtype not in IDOT_TYPES or m > IDOT_MAX_M or os.environ.get("DEVSTRAL_GGUF_FLOAT_GEMV")):
        kind = "gemv"
    if kind == "idot":
        bm = idot_bm(m)
        hit = table.get("gguf_idot", {}).get(f"{qtype}|{bm}|{n}|{k}")
        if hit:
            return "idot", dict(hit)
        bn = 64 if bm <= 2 else 32
        ns = max(1, IDOT_NS[qtype] // (1 if bm <= 2 else 2))
        tiles = -(-n // bn)
        return "idot", dict(bn=bn, ns=ns, bm=bm, split_k=split_k(tiles, k // (sb * ns), sms), num_warps=4)
    if kind == "gemv":
        bm = gemv_bm(m)
        hit = table.get("gguf_gemv", {}).get(f"{qtype}|{bm}|{n}|{k}")
        if hit:
            return "gemv", dict(hit)
        ns = GEMV_NS[qtype]
        bn = 64 if bm == 1 else 32
        tiles = -(-n // bn) * -(-m // bm)
        return "gemv", dict(bn=bn, ns=ns, bm=bm, split_k=split_k(tiles, k // (sb * ns), sms), num_warps=4)
    if kind == "gemm":
        bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
        hit = table.get("gguf_gemm", {}).get(f"{qtype}|{bm}|{n}|{k}")
        if hit:
            return "gemm", dict(hit)
        nsub = GEMM_NSUB[qtype]
        bn = 128
        tiles = -(-n // bn) * -(-m // bm)
        return "gemm", dict(bn=bn, bm=bm, nsub=nsub, split_k=split_k(tiles, k // (sb * nsub), sms),
                            num_warps=8 if bm >= 128 else 4, num_stages=3 if bm <= 64 else 2)
    return "dequant", {}


def nf4_plan(m: int, n: int, k: int, device: torch.device | None = None) -> tuple[str, dict]:
    table = table_for(device)
    limits = {"gemv_max_m": 4, **table.get("thresholds", {}).get("NF4", {})}
    if m > limits["gemv_max_m"]:
        return "dequant", {}
    bm = gemv_bm(m)
    hit = table.get("nf4_gemv", {}).get(f"NF4|{bm}|{n}|{k}")
    if hit:
        return "gemv", dict(hit)
    sms = sm_count(device) if device is not None and device.type == "cuda" else 132
    bn, ns = 32, 4
    tiles = -(-n // bn) * -(-m // bm)
    return "gemv", dict(bn=bn, ns=ns, bm=bm, split_k=split_k(tiles, k // (64 * ns), sms), num_warps=4)


def fp8_plan(m: int, n: int, k: int, device: torch.device | None = None) -> tuple[str, dict]:
    table = table_for(device)
    limits = {"gemv_max_m": 4, **table.get("thresholds", {}).get("FP8", {})}
    if m > limits["gemv_max_m"]:
        return "scaled_mm", {}
    bm = gemv_bm(m)
    hit = table.get("fp8_gemv", {}).get(f"FP8|{bm}|{n}|{k}")
    if hit:
        return "gemv", dict(hit)
    sms = sm_count(device) if device is not None and device.type == "cuda" else 132
    bn, bk = 16, 512 // bm
    tiles = -(-n // bn) * -(-m // bm)
    return "gemv", dict(bn=bn, bk=bk, bm=bm, split_k=split_k(tiles, k // bk, sms), num_warps=4)
