"""Weights from safetensors: HF layout (sharded or not) and Mistral's native `consolidated` layout.

Tensors are read one at a time from the memory-mapped files and converted straight to the target
dtype and device, so loading never holds two copies of the model.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from devstral.config import ModelConfig, config_key, read_json
from devstral.errors import DevstralError
from devstral.formats.finite import check_finite

# Names of vision-tower and projector tensors, in HF and Mistral checkpoints: the text decoder skips
# them; model/vision.py loads the HF ones (vision_param_name).
_VISION = re.compile(
    r"^(model\.)?(vision_tower|multi_modal_projector|vision_encoder|vision_language_adapter|patch_merger|"
    r"pre_mm_projector_norm)\."
)
_MISTRAL_NAMES = [
    (re.compile(r"^tok_embeddings\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^norm\.weight$"), "model.norm.weight"),
    (re.compile(r"^output\.weight$"), "lm_head.weight"),
    (re.compile(r"^layers\.(\d+)\.attention\.wq\.weight$"), r"model.layers.\1.self_attn.q_proj.weight"),
    (re.compile(r"^layers\.(\d+)\.attention\.wk\.weight$"), r"model.layers.\1.self_attn.k_proj.weight"),
    (re.compile(r"^layers\.(\d+)\.attention\.wv\.weight$"), r"model.layers.\1.self_attn.v_proj.weight"),
    (re.compile(r"^layers\.(\d+)\.attention\.wo\.weight$"), r"model.layers.\1.self_attn.o_proj.weight"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.w1\.weight$"), r"model.layers.\1.mlp.gate_proj.weight"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.w2\.weight$"), r"model.layers.\1.mlp.down_proj.weight"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.w3\.weight$"), r"model.layers.\1.mlp.up_proj.weight"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight$"),
     r"model.layers.\1.block_sparse_moe.experts.\2.\3.weight"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.gate\.weight$"), r"model.layers.\1.block_sparse_moe.gate.weight"),
    (re.compile(r"^layers\.(\d+)\.attention_norm\.weight$"), r"model.layers.\1.input_layernorm.weight"),
    (re.compile(r"^layers\.(\d+)\.ffn_norm\.weight$"), r"model.layers.\1.post_attention_layernorm.weight"),
]
_HF_PREFIXES = [("model.language_model.", "model."), ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head.")]


def weight_files(folder: Path) -> tuple[str, list[Path]]:
    """('hf' | 'mistral', shard paths) for a model folder."""
    for layout, index_name, single in (("hf", "model.safetensors.index.json", "model.safetensors"),
                                       ("mistral", "consolidated.safetensors.index.json", "consolidated.safetensors")):
        index = folder / index_name
        if index.is_file():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise DevstralError(f"{index}: not a valid safetensors index (weight_map must map tensor "
                                    "names to file names)")
            files = [folder / f for f in sorted(set(weight_map.values()))]
            outside = [f for f in weight_map.values() if Path(f).name != f]
            if outside:
                raise DevstralError(f"{index}: weight_map names {outside[0]!r}, not a file in this folder")
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise DevstralError(f"{index}: shard {missing[0]} is missing")
            return layout, files
        if (folder / single).is_file():
            return layout, [folder / single]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return "hf", shards
    shards = sorted(folder.glob("consolidated*.safetensors"))
    if shards:
        return "mistral", shards
    raise DevstralError(f"{folder}: no weights found (expected model.safetensors, shards with an index, "
                        "or consolidated.safetensors)")


def permute_for_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral pairs rotary dims (2i, 2i+1); HF pairs (i, i + d/2). Reorder each head's rows to match."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def permute_for_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_for_rotate_half (used when writing Mistral's layout)."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def canonical_name(name: str, layout: str) -> str | None:
    """Map a checkpoint tensor name to our module name; None for tensors we skip (vision)."""
    if _VISION.match(name):
        return None
    if layout == "mistral":
        for pattern, repl in _MISTRAL_NAMES:
            if pattern.match(name):
                return pattern.sub(repl, name)
        return name
    for old, new in _HF_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


_HF_VISION = re.compile(r"^(model\.)?(?P<rest>(vision_tower|multi_modal_projector)\..+)$")


def vision_param_name(name: str, layout: str) -> str | None:
    """A checkpoint tensor name -> model/vision.VisionModel's parameter name, None if not a vision
    tensor we load (HF layout only: transformers >= 5 saves them under `model.`, 4.x at the top)."""
    m = _HF_VISION.match(name) if layout == "hf" else None
    return m.group("rest") if m else None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> list[TensorEntry]:
    """Parse and validate a safetensors header: every offset must lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise DevstralError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
        n = struct.unpack("<Q", raw)[0]
        if n > min(size - 8, 100 << 20):
            raise DevstralError(f"{path}: corrupt safetensors file (header length {n} exceeds the file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            reason = " ".join(str(e).split())[:120] or type(e).__name__
            raise DevstralError(f"{path}: corrupt safetensors file (header is not valid JSON: {reason})") from None
    if not isinstance(header, dict):
        raise DevstralError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(_int(d) for d in info["shape"])
            begin, end = (_int(x) for x in info["data_offsets"])
            if any(d < 0 for d in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise DevstralError(f"{path}: corrupt safetensors file (bad header entry for tensor {name})") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= size - 8 - n or end - begin != nbytes:
            raise DevstralError(f"{path}: corrupt safetensors file (tensor {name} lies outside the file or its "
                                f"size disagrees with its shape)")
        entries.append(TensorEntry(name, dtype, shape, 8 + n + begin, 8 + n + end))
    return entries


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError
    return v


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_config_against_weights(folder: Path, cfg: ModelConfig) -> None:
    """Compare the config's sizes with the tensor shapes in the safetensors headers, before anything
    is built: a config that says 1e9 layers, or a vocabulary the embedding does not have, is one line
    naming the key instead of an allocation without end."""
    layout, files = weight_files(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        for e in read_header(path):
            ours = canonical_name(e.name, layout)
            # (a bitsandbytes-packed weight is [numel/2, 1] bytes: its real shape is checked as it is read)
            if ours is not None and (e.dtype.is_floating_point or len(e.shape) != 2 or e.shape[1] != 1):
                shapes[ours] = e.shape
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    n_layers = max(layers) + 1 if layers else 0
    if n_layers != cfg.n_layers:
        raise DevstralError(f"{config_key(cfg, 'n_layers')} is {cfg.n_layers} but the weights in {folder} "
                            f"hold {n_layers} layers")
    checks = [("model.embed_tokens.weight", (("vocab_size", cfg.vocab_size), ("dim", cfg.dim))),
              ("model.layers.0.self_attn.q_proj.weight", (("n_heads", cfg.n_heads * cfg.head_dim), ("dim", cfg.dim))),
              ("model.layers.0.self_attn.k_proj.weight", (("n_kv_heads", cfg.n_kv_heads * cfg.head_dim),)),
              ("model.layers.0.mlp.gate_proj.weight", (("hidden_dim", cfg.hidden_dim),)),
              ("model.layers.0.block_sparse_moe.experts.0.w1.weight", (("hidden_dim", cfg.hidden_dim),)),
              ("model.layers.0.block_sparse_moe.gate.weight", (("n_experts", cfg.n_experts),))]
    for name, dims in checks:
        shape = shapes.get(name)
        if shape is None or len(shape) != 2:
            continue  # a missing or odd tensor is reported, by name, when the weights are read
        for axis, (field, want) in enumerate(dims):
            if shape[axis] != want:
                what = {"n_heads": " x head_dim", "n_kv_heads": " x head_dim"}.get(field, "")
                shown = (f"{getattr(cfg, field)}{what} = {want}" if what else str(want))
                raise DevstralError(f"{config_key(cfg, field)} gives {shown} but tensor {name} in {folder} has "
                                    f"shape {list(shape)}")


def iter_tensors(folder: Path, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device | str,
                 keep_dtype: Callable[[str], bool] | None = None, part: str = "text",
                 notice: bool = True, shard: tuple[int, int] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor in dtype on device), one tensor in flight at a time.

    Each file is memory-mapped; a tensor is converted from its mapped bytes straight into its final
    dtype and device, and the pages it came from are released at once (MADV_DONTNEED), so the
    process never holds the checkpoint's pages and the loaded model together. A tensor holding NaN
    or infinity is refused, by name, as it is read. Tensors whose name `keep_dtype` accepts keep their
    stored dtype (quantization statistics).

    `part`: "text" (the decoder; vision tensors are skipped, with a one-line notice unless `notice` is
    False) or "vision" (model/vision.py's names).

    `shard=(rank, world)` yields only that tensor-parallel rank's slice of each split decoder weight
    (parallel/sharding.py), read straight from the mapped file: the other ranks' bytes are never
    touched.
    """
    from devstral.parallel.sharding import rank_slice

    layout, files = weight_files(folder)
    skipped = 0
    for path in files:
        entries = read_header(path)
        if not entries:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for e in entries:
                ours = canonical_name(e.name, layout) if part == "text" else vision_param_name(e.name, layout)
                if ours is None:
                    skipped += part == "text"
                    continue
                keep = not e.dtype.is_floating_point or (keep_dtype is not None and keep_dtype(ours))
                target = e.dtype if keep else dtype
                cut = rank_slice(ours, e.shape, *shard) if shard is not None and part == "text" else None
                shape = list(e.shape)
                if cut is not None:
                    shape[cut.dim] = cut.stop - cut.start
                if e.end == e.start:
                    out = torch.empty(shape, dtype=target, device=device)
                else:
                    view = memoryview(mm)[e.start:e.end]
                    with warnings.catch_warnings():  # read-only buffer: we only read it, then copy
                        warnings.simplefilter("ignore", UserWarning)
                        t = torch.frombuffer(view, dtype=torch.uint8).view(e.dtype).reshape(e.shape)
                    if cut is not None:
                        t = t.narrow(cut.dim, cut.start, cut.stop - cut.start)
                    out = t.to(device=device, dtype=target, copy=True).contiguous()
                    del t
                    view.release()
                if part == "text" and layout == "mistral" and ours.endswith(("q_proj.weight", "k_proj.weight")):
                    heads = cfg.n_heads if ours.endswith("q_proj.weight") else cfg.n_kv_heads
                    if cut is not None:  # a rank's rows are whole heads: the permutation is per head
                        heads //= shard[1]
                    out = permute_for_rotate_half(out, heads).contiguous()
                _release(mm, e.start, e.end)
                check_finite(out, e.name, path)
                yield ours, out
    if skipped and notice:
        print(f"note: skipped {skipped} vision-tower tensors (text-only inference)", file=sys.stderr)


def _release(mm: mmap.mmap, start: int, end: int) -> None:
    page = mmap.PAGESIZE
    lo = start - start % page
    if hasattr(mmap, "MADV_DONTNEED") and end > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)
