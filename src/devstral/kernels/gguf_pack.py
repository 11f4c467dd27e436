"""GGUF blocks -> a planar GPU layout (and back, exactly), for the Triton kernels in gguf_*.py.

A GGUF row is a run of blocks, each mixing fp16 scales, packed sub-block scales and quant bits in
one misaligned record (34, 144, 176 or 210 bytes). The kernels want each kind of field in its own
array, 16-byte aligned, so that a thread loads 16 bytes of quants with one instruction and every
field is found by a multiply-add. The planar layout of an [N, K] weight is one uint8 buffer holding
one [N, per-row] array per field:

  q    int32  the quant bits (low 4 bits for Q4_K/Q5_K/Q6_K, all 8 for Q8_0), E values per word
  qh   the high bits: Q5_K one byte per word (bit s = 5th bit of value s), Q6_K one int16 per word
       (bits 2s..2s+1 = the top two bits of value s)
  sc   sub-block scales: int8 (Q6_K); Q4_K/Q5_K one byte per sub-block, the low 4 bits of its 6-bit scale
       (low nibble) and of its 6-bit min (high nibble)
  mn   Q4_K/Q5_K: the top 2 bits of each sub-block's scale (bits 0-1) and min (bits 2-3), a nibble per
       sub-block, two a byte (sub-block j: nibble j & 1 of byte j // 2; planar_scale_min_ref below)
  d    fp16 super-block scale (per 256 weights; per 32 for Q8_0)
  dmin fp16 super-block min scale (Q4_K/Q5_K)

Order of the values inside `q`: a sub-block of SB weights (32 for Q4_K/Q5_K/Q8_0, 16 for Q6_K) is
WPS consecutive words (4, 4, 8 and 2 of them) holding E values each (8 nibbles or 4 bytes); value s
of word v is weight s*WPS + v of the sub-block. So a thread's 16-byte load covers one sub-block
(one scale), and the activations that meet value s of WPS neighbouring words are contiguous.

Sizes per 256 weights: Q4_K 144 bytes, Q5_K 176, Q6_K 210 and Q8_0 272, exactly the file's: every type
1.0x the file, plus up to ALIGN - 1 bytes of padding after each field array.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as QType

from devstral.errors import DevstralError
from devstral.quant.dequant import k4_scale_min
from devstral.quant.layout import block_info, row_bytes

ALIGN = 256  # byte alignment of each field array inside the buffer


@dataclass(frozen=True)
class PlanarFormat:
    block: int  # weights per GGUF block
    sub: int  # weights per sub-block (one scale)
    wps: int  # words per sub-block in `q`
    bits: int  # bits per value in `q` (4 or 8)
    fields: tuple[tuple[str, torch.dtype, int], ...]  # (name, dtype, weights per element)

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    def row_elems(self, k: int) -> dict[str, int]:
        return {name: k // per for name, _, per in self.fields}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {name: dt for name, dt, _ in self.fields}


_U8, _I8, _I16, _I32, _F16 = torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16
FORMATS: dict[QType, PlanarFormat] = {
    QType.Q4_K: PlanarFormat(256, 32, 4, 4, (("q", _I32, 8), ("sc", _U8, 32), ("mn", _U8, 64),
                                              ("d", _F16, 256), ("dmin", _F16, 256))),
    QType.Q5_K: PlanarFormat(256, 32, 4, 4, (("q", _I32, 8), ("qh", _U8, 8), ("sc", _U8, 32),
                                              ("mn", _U8, 64), ("d", _F16, 256), ("dmin", _F16, 256))),
    QType.Q6_K: PlanarFormat(256, 16, 2, 4, (("q", _I32, 8), ("qh", _I16, 8), ("sc", _I8, 16),
                                              ("d", _F16, 256))),
    QType.Q8_0: PlanarFormat(32, 32, 8, 8, (("q", _I32, 4), ("d", _F16, 32))),
}
SUPPORTED = frozenset(FORMATS)


class PackedGGUF:
    """A quantized [n, k] weight in the planar layout: one uint8 buffer and typed views into it."""

    def __init__(self, qtype: QType, n: int, k: int, buf: torch.Tensor):
        self.qtype, self.n, self.k = QType(qtype), int(n), int(k)
        self.fmt = FORMATS[self.qtype]
        self.buf = buf
        self.arrays = _views(self.fmt, self.n, self.k, buf)
        self.rows_of: tuple[int, int] | None = None  # (first row, rows of the whole buffer) for a row slice

    @classmethod
    def empty(cls, qtype: QType, n: int, k: int, device: torch.device | str) -> PackedGGUF:
        return cls(qtype, n, k, torch.empty(packed_nbytes(qtype, n, k), dtype=_U8, device=device))

    def row_slice(self, start: int, stop: int) -> PackedGGUF:
        """Rows start..stop as a weight of their own, sharing this buffer (every field keeps its row
        stride, which is all the kernels use)."""
        if self.rows_of is not None:
            raise ValueError("a row slice of a row slice")
        out = object.__new__(PackedGGUF)
        out.qtype, out.n, out.k, out.fmt, out.buf = self.qtype, stop - start, self.k, self.fmt, self.buf
        out.arrays = {name: a[start:stop] for name, a in self.arrays.items()}
        out.rows_of = (start, self.n)
        return out

    def rebind(self, buf: torch.Tensor) -> PackedGGUF:
        """The same weight over another buffer (after the module moved to another device)."""
        if self.rows_of is None:
            return PackedGGUF(self.qtype, self.n, self.k, buf)
        start, total = self.rows_of
        return PackedGGUF(self.qtype, total, self.k, buf).row_slice(start, start + self.n)

    @property
    def device(self) -> torch.device:
        return self.buf.device

    def nbytes(self) -> int:
        if self.rows_of is not None:
            return sum(a.numel() * a.element_size() for a in self.arrays.values())
        return self.buf.numel()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.arrays[name]

    def get(self, name: str) -> torch.Tensor | None:
        return self.arrays.get(name)


def concat_rows(parts: list[PackedGGUF]) -> PackedGGUF:
    """One weight holding the rows of several (same type, same K, one device), in order: what lets
    q/k/v or gate/up run as one launch. The caller drops the parts for row slices of the result."""
    first = parts[0]
    if any((p.qtype, p.k, p.device) != (first.qtype, first.k, first.device) for p in parts):
        raise ValueError("concat_rows: parts differ in type, K or device")
    out = PackedGGUF.empty(first.qtype, sum(p.n for p in parts), first.k, first.device)
    for name, arr in out.arrays.items():
        torch.cat([p[name] for p in parts], dim=0, out=arr)
    return out


def _layout(fmt: PlanarFormat, n: int, k: int) -> tuple[dict[str, int], int]:
    offsets, off = {}, 0
    for name, dtype, per in fmt.fields:
        offsets[name] = off
        size = n * (k // per) * torch.empty((), dtype=dtype).element_size()
        off += -(-size // ALIGN) * ALIGN
    return offsets, off


def packed_nbytes(qtype: QType, n: int, k: int) -> int:
    return _layout(FORMATS[QType(qtype)], n, k)[1]


def _views(fmt: PlanarFormat, n: int, k: int, buf: torch.Tensor) -> dict[str, torch.Tensor]:
    offsets, total = _layout(fmt, n, k)
    if buf.dtype != _U8 or buf.numel() != total:
        raise ValueError(f"planar buffer of {buf.numel()} bytes, expected {total}")
    out = {}
    for name, dtype, per in fmt.fields:
        elems = n * (k // per)
        size = elems * torch.empty((), dtype=dtype).element_size()
        out[name] = buf[offsets[name]:offsets[name] + size].view(dtype).view(n, k // per)
    return out


# --- GGUF block <-> integer fields in natural weight order ---------------------------------------
# Each decoder turns uint8 blocks [nb, type_size] into a dict of integer tensors: q [nb, block]
# (unsigned levels), and the scale fields; each encoder is its exact inverse.

def _f16_field(b: torch.Tensor, off: int) -> torch.Tensor:
    return b[:, off:off + 2].contiguous().view(_F16).reshape(-1)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1).contiguous().view(_U8)


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """[.., 32] bytes -> [.., 2, 32]: low nibbles (weights 0..31) then high (32..63)."""
    return torch.stack((b & 0x0F, b >> 4), dim=-2)


def _q4k_fields(b: torch.Tensor) -> dict[str, torch.Tensor]:
    nb = b.shape[0]
    sc, mn = k4_scale_min(b[:, 4:16])
    q = _nibbles(b[:, 16:144].reshape(nb, 4, 32)).reshape(nb, 256)
    return {"d": _f16_field(b, 0), "dmin": _f16_field(b, 2), "sc": sc, "mn": mn, "q": q}


def _pack_k4_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    return torch.cat((sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                      (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)), dim=1)


def _q4k_blocks(f: dict[str, torch.Tensor]) -> torch.Tensor:
    q = f["q"].reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat((_f16_bytes(f["d"]), _f16_bytes(f["dmin"]), _pack_k4_scales(f["sc"], f["mn"]), qs), dim=1)


def _q5k_fields(b: torch.Tensor) -> dict[str, torch.Tensor]:
    nb = b.shape[0]
    sc, mn = k4_scale_min(b[:, 4:16])
    low = _nibbles(b[:, 48:176].reshape(nb, 4, 32)).reshape(nb, 8, 32)
    shifts = torch.arange(8, dtype=_U8, device=b.device).reshape(1, 8, 1)
    high = (b[:, 16:48].reshape(nb, 1, 32) >> shifts) & 1  # bit s of qh[i]: weight 32s + i
    q = (low | (high << 4)).reshape(nb, 256)
    return {"d": _f16_field(b, 0), "dmin": _f16_field(b, 2), "sc": sc, "mn": mn, "q": q}


def _q5k_blocks(f: dict[str, torch.Tensor]) -> torch.Tensor:
    q = f["q"]
    low = (q & 0x0F).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    shifts = torch.arange(8, dtype=_U8, device=q.device).reshape(1, 8, 1)
    qh = ((q >> 4).reshape(-1, 8, 32) << shifts).sum(dim=1, dtype=_U8)
    return torch.cat((_f16_bytes(f["d"]), _f16_bytes(f["dmin"]), _pack_k4_scales(f["sc"], f["mn"]), qh, qs), dim=1)


def _q6k_fields(b: torch.Tensor) -> dict[str, torch.Tensor]:
    nb = b.shape[0]
    ql, qh = b[:, :128].reshape(nb, 2, 2, 32), b[:, 128:192].reshape(nb, 2, 1, 32)
    # quarter k of a 128-weight half: low nibble of ql[32*(k%2) + l] (high nibble when k >= 2),
    # top bits (qh[l] >> 2k) & 3
    low = torch.stack((ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4), dim=2)
    shifts = torch.tensor([0, 2, 4, 6], dtype=_U8, device=b.device).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 3
    q = (low | (high << 4)).reshape(nb, 256)
    return {"d": _f16_field(b, 208), "sc": b[:, 192:208].contiguous().view(_I8), "q": q}


def _q6k_blocks(f: dict[str, torch.Tensor]) -> torch.Tensor:
    quarters = f["q"].reshape(-1, 2, 4, 32)
    low, high = quarters & 0x0F, quarters >> 4
    ql = torch.cat((low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)), dim=2)
    shifts = torch.tensor([0, 2, 4, 6], dtype=_U8, device=quarters.device).reshape(1, 1, 4, 1)
    qh = (high << shifts).sum(dim=2, dtype=_U8)
    return torch.cat((ql.reshape(-1, 128), qh.reshape(-1, 64), f["sc"].contiguous().view(_U8),
                      _f16_bytes(f["d"])), dim=1)


def _q80_fields(b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"d": _f16_field(b, 0), "q": b[:, 2:34]}  # int8 levels kept as their bytes


def _q80_blocks(f: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat((_f16_bytes(f["d"]), f["q"]), dim=1)


_FIELDS = {QType.Q4_K: (_q4k_fields, _q4k_blocks), QType.Q5_K: (_q5k_fields, _q5k_blocks),
           QType.Q6_K: (_q6k_fields, _q6k_blocks), QType.Q8_0: (_q80_fields, _q80_blocks)}


# --- integer fields <-> planar rows ----------------------------------------------------------------

def _to_words(q: torch.Tensor, fmt: PlanarFormat, rows: int, k: int) -> torch.Tensor:
    """Levels [rows, k] (uint8) in weight order -> words [rows, k / per_word] int32, planar order."""
    e, wps = fmt.per_word, fmt.wps
    # weight (j, s, v) of sub-block j is value s of word (j, v)
    q = q.reshape(rows, k // fmt.sub, e, wps).transpose(2, 3)  # [rows, j, v, s]
    if fmt.bits == 4:
        q = q.reshape(rows, k // fmt.sub, wps, 4, 2)
        q = q[..., 0] | (q[..., 1] << 4)  # byte b of the word holds values 2b (low) and 2b+1
    return q.contiguous().reshape(rows, -1).view(_I32)


def _from_words(words: torch.Tensor, fmt: PlanarFormat, rows: int, k: int) -> torch.Tensor:
    e, wps = fmt.per_word, fmt.wps
    b = words.contiguous().view(_U8).reshape(rows, k // fmt.sub, wps, 4)
    if fmt.bits == 4:
        b = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(rows, k // fmt.sub, wps, e)
    return b.transpose(2, 3).reshape(rows, k)


def _high_to_planar(q: torch.Tensor, fmt: PlanarFormat, rows: int, k: int, qtype: QType) -> torch.Tensor:
    high = (q >> 4).reshape(rows, k // fmt.sub, fmt.per_word, fmt.wps).transpose(2, 3)  # [.., v, s]
    if qtype == QType.Q5_K:
        shifts = torch.arange(8, dtype=_U8, device=q.device)
        return (high << shifts).sum(dim=-1, dtype=_U8).reshape(rows, -1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=_U8, device=q.device)
    pairs = (high.reshape(rows, -1, 2, 4) << shifts).sum(dim=-1, dtype=_U8)  # [.., word, 2 bytes]
    return pairs.reshape(rows, -1).view(_I16)


def _high_from_planar(qh: torch.Tensor, fmt: PlanarFormat, rows: int, k: int, qtype: QType) -> torch.Tensor:
    if qtype == QType.Q5_K:
        shifts = torch.arange(8, dtype=_U8, device=qh.device)
        high = (qh.reshape(rows, -1, 1) >> shifts) & 1
    else:
        shifts = torch.tensor([0, 2, 4, 6], dtype=_U8, device=qh.device)
        high = (qh.contiguous().view(_U8).reshape(rows, -1, 2, 1) >> shifts) & 3
    high = high.reshape(rows, k // fmt.sub, fmt.wps, fmt.per_word).transpose(2, 3)
    return high.reshape(rows, k)


# Q4_K/Q5_K's 6-bit sub-block scales and mins, 12 bytes a super-block as in the file (at a byte each they were
# 16: 148 bytes read per 256 weights instead of 144, +2.8% of a decode step that streams the weights once), in
# a layout every kernel decodes with a few integer ops a sub-block and no gather across the file's 12-byte
# record: sc, a byte per sub-block j, holds the low 4 bits of its scale (low nibble) and of its min (high
# nibble); mn, a byte per two sub-blocks, holds in nibble j & 1 of byte j // 2 the scale's top 2 bits (bits
# 0-1 of the nibble) and the min's (bits 2-3). The kernels' twin is gguf_decode.planar_scale_min.

def planar_scale_min_ref(sc: torch.Tensor, mn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Planar sc [.., S] and mn [.., S / 2] (uint8) -> the 6-bit scales and mins [.., S] (uint8)."""
    h = torch.stack((mn & 0x0F, mn >> 4), dim=-1).flatten(-2)  # sub-block j's nibble: nibble j & 1 of byte j // 2
    return (sc & 0x0F) | ((h & 3) << 4), (sc >> 4) | ((h >> 2) << 4)


def _planar_from_scale_min(scale: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 6-bit scales and mins [.., S] (uint8) -> planar sc [.., S] and mn [.., S / 2]: the inverse of
    planar_scale_min_ref."""
    sc = (scale & 0x0F) | ((mins & 0x0F) << 4)
    h = (scale >> 4) | ((mins >> 4) << 2)
    return sc, h[..., 0::2] | (h[..., 1::2] << 4)


def _fields_to_planar(f: dict[str, torch.Tensor], fmt: PlanarFormat, qtype: QType, rows: int, k: int):
    q = f["q"].reshape(rows, k)
    out = {"q": _to_words(q & 0x0F if fmt.bits == 4 else q, fmt, rows, k)}
    if "qh" in fmt.dtypes():
        out["qh"] = _high_to_planar(q, fmt, rows, k, qtype)
    for name in ("sc", "d", "dmin"):
        if name in f:
            out[name] = f[name].reshape(rows, -1)
    if "mn" in f:
        out["sc"], out["mn"] = _planar_from_scale_min(out["sc"], f["mn"].reshape(rows, -1))
    return out


def _planar_to_fields(p: dict[str, torch.Tensor], fmt: PlanarFormat, qtype: QType, rows: int, k: int):
    q = _from_words(p["q"], fmt, rows, k)
    if "qh" in p:
        q = q | (_high_from_planar(p["qh"], fmt, rows, k, qtype) << 4)
    nb = rows * k // fmt.block
    f = {"q": q.reshape(nb, fmt.block)}
    for name in ("sc", "d", "dmin"):
        if name in p:
            f[name] = p[name].reshape(nb, -1) if name == "sc" else p[name].reshape(-1)
    if "mn" in p:
        sc, mn = planar_scale_min_ref(p["sc"], p["mn"])
        f["sc"], f["mn"] = sc.reshape(nb, -1), mn.reshape(nb, -1)
    return f


# --- public ------------------------------------------------------------------------------------------

def pack(raw: torch.Tensor, qtype: QType, n: int, k: int, *, name: str = "?",
         device: torch.device | str | None = None, chunk_rows: int | None = None) -> PackedGGUF:
    """GGUF bytes of an [n, k] weight -> PackedGGUF on `device` (default: raw's device).

    Works in bands of rows so the temporaries stay small next to the weight itself."""
    qtype = QType(qtype)
    if qtype not in FORMATS:
        raise DevstralError(f"tensor {name}: no planar GPU layout for {qtype.name}")
    fmt = FORMATS[qtype]
    per_row = row_bytes(qtype, k, name=name)
    raw = raw.reshape(-1)
    if raw.dtype != _U8:
        raw = raw.view(_U8)
    if raw.numel() != n * per_row:
        raise DevstralError(f"tensor {name}: {raw.numel()} bytes of data, but {qtype.name} [{n}, {k}] needs "
                            f"{n * per_row}")
    raw = raw.reshape(n, per_row)
    device = torch.device(device) if device is not None else raw.device
    out = PackedGGUF.empty(qtype, n, k, device)
    decode = _FIELDS[qtype][0]
    _, type_size = block_info(qtype)
    step = chunk_rows or max(1, (8 << 20) // max(k, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        blocks = raw[r0:r1].to(device).reshape(-1, type_size)
        planar = _fields_to_planar(decode(blocks), fmt, qtype, r1 - r0, k)
        for name_, arr in planar.items():
            out[name_][r0:r1].copy_(arr.reshape(r1 - r0, -1))
    return out


def unpack(p: PackedGGUF, rows: slice | None = None) -> torch.Tensor:
    """PackedGGUF -> the GGUF bytes it came from, uint8 [n, bytes per row] (the exact inverse of pack)."""
    rows = rows or slice(0, p.n)
    r0, r1, _ = rows.indices(p.n)
    if r1 <= r0:
        return torch.empty(0, row_bytes(p.qtype, p.k), dtype=_U8, device=p.device)
    fmt = FORMATS[p.qtype]
    planar = {name: arr[r0:r1] for name, arr in p.arrays.items()}
    fields = _planar_to_fields(planar, fmt, p.qtype, r1 - r0, p.k)
    blocks = _FIELDS[p.qtype][1](fields)
    return blocks.reshape(r1 - r0, row_bytes(p.qtype, p.k))
