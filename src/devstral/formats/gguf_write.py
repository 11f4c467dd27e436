"""Writing GGUF files llama.cpp loads: `export_gguf` (model folder, GGUF or state dict -> quantized GGUF).

Tensors are quantized and written one at a time (the header is written first from the shapes and the
recipe's types), so exporting never holds more than one tensor in float32. The file appears
atomically: it is written under a temporary name in the target folder and renamed at the end.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from devstral.config import ModelConfig
from devstral.errors import DevstralError
from devstral.formats.gguf_names import (
    EXPERT_STACKS,
    expert_parts,
    rotary_heads,
    to_gguf_name,
    to_llama_cpp_layout,
)
from devstral.formats.gguf_vocab import GGUFVocab
from devstral.tmpfiles import temp_path

QUANTIZATION_VERSION = 2


@dataclass
class TensorSource:
    """The tensors to export, under GGUF names and in llama.cpp's q/k layout."""

    config: ModelConfig
    vocab: GGUFVocab
    names: list[str]  # GGUF names, in file order
    shapes: dict[str, tuple[int, ...]]
    load: Callable[[str], torch.Tensor]  # GGUF name -> float tensor
    chat_template: str | None = None
    model_name: str = "model"


def _gguf_order(cfg: ModelConfig, has_output: bool) -> list[tuple[str, str]]:
    """(gguf name, our name) in llama.cpp's usual file order."""
    out: list[tuple[str, Any]] = [("token_embd.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layers):
        ffn = ("block_sparse_moe.gate",) if cfg.n_experts else ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        for ours in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "post_attention_layernorm", *ffn):
            name = f"model.layers.{i}.{ours}.weight"
            out.append((to_gguf_name(name), name))
        for stack in EXPERT_STACKS if cfg.n_experts else ():  # one 3-D tensor per projection
            name = f"blk.{i}.{stack}.weight"
            out.append((name, expert_parts(name, cfg.n_experts)))
    out.append(("output_norm.weight", "model.norm.weight"))
    if has_output:
        out.append(("output.weight", "lm_head.weight"))
    return out


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        from devstral.model.transformer import Transformer

        return {n: tuple(p.shape) for n, p in Transformer(cfg).named_parameters(remove_duplicate=False)}


def _shape_of(ours: Any, expected: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """A tensor's shape, or a stack of experts' [experts, rows, cols]."""
    return (len(ours), *expected[ours[0]]) if isinstance(ours, tuple) else expected[ours]


def _parts(ours: Any) -> tuple[str, ...]:
    return ours if isinstance(ours, tuple) else (ours,)


def source_from_state(state: dict[str, torch.Tensor], config: ModelConfig, vocab: GGUFVocab, *,
                      chat_template: str | None = None, model_name: str = "model") -> TensorSource:
    """Our-named tensors (as Transformer.state_dict() gives them) -> an export source."""
    has_output = "lm_head.weight" in state and not config.tie_embeddings and \
        state["lm_head.weight"].data_ptr() != state.get("model.embed_tokens.weight", state["lm_head.weight"]).data_ptr()
    expected = _expected_shapes(config)
    order = _gguf_order(config, has_output)
    for gguf_name, ours in order:
        for part in _parts(ours):
            if part not in state:
                raise DevstralError(f"state dict has no tensor {part} (needed for {gguf_name})")
            if tuple(state[part].shape) != expected[part]:
                raise DevstralError(f"tensor {part} has shape {list(state[part].shape)}, the config implies "
                                    f"{list(expected[part])}")
    by_gguf = dict(order)

    def load(name: str) -> torch.Tensor:
        parts = [state[p].detach().to("cpu", torch.float32) for p in _parts(by_gguf[name])]
        w = torch.stack(parts) if isinstance(by_gguf[name], tuple) else parts[0]
        return to_llama_cpp_layout(w, rotary_heads(name, config.n_heads, config.n_kv_heads))

    return TensorSource(config, vocab, [g for g, _ in order], {g: _shape_of(o, expected) for g, o in order}, load,
                        chat_template, model_name)


def source_from_folder(folder: Path) -> TensorSource:
    from safetensors import safe_open

    from devstral.formats.finite import check_finite
    from devstral.formats.gguf_chat import builtin_template, template_version_for
    from devstral.formats.gguf_vocab import vocab_from_folder
    from devstral.formats.safetensors import canonical_name, check_config_against_weights, weight_files

    cfg = ModelConfig.from_dir(folder)
    check_config_against_weights(folder, cfg)  # before planning per-layer tensors from its sizes
    vocab = vocab_from_folder(folder)
    layout, files = weight_files(folder)
    where: dict[str, tuple[Path, str]] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                ours = canonical_name(key, layout)
                if ours is not None:
                    where[ours] = (path, key)
    has_output = "lm_head.weight" in where and not cfg.tie_embeddings
    expected = _expected_shapes(cfg)
    order = _gguf_order(cfg, has_output)
    missing = [part for _, ours in order for part in _parts(ours) if part not in where]
    if missing:
        raise DevstralError(f"{folder}: tensor {missing[0]} is missing from the weights")
    by_gguf = dict(order)

    def read(ours: str) -> torch.Tensor:
        path, key = where[ours]
        with safe_open(str(path), framework="pt", device="cpu") as f:
            w = f.get_tensor(key).to(torch.float32)
        check_finite(w, key, path)
        if tuple(w.shape) != expected[ours]:
            raise DevstralError(f"{path}: tensor {key} has shape {list(w.shape)}, the config implies "
                                f"{list(expected[ours])}")
        return w

    def load(name: str) -> torch.Tensor:
        ours = by_gguf[name]
        w = torch.stack([read(p) for p in ours]) if isinstance(ours, tuple) else read(ours)
        heads = rotary_heads(name, cfg.n_heads, cfg.n_kv_heads)
        if layout == "mistral":
            return w  # Mistral's native layout already pairs adjacent rotary dimensions, as llama.cpp does
        return to_llama_cpp_layout(w, heads)

    version = template_version_for(vocab.version)
    template = builtin_template(version) if version else None
    if template is None:
        print(f"note: no chat template for tokenizer {vocab.version}; the GGUF will have none", file=sys.stderr)
    return TensorSource(cfg, vocab, [g for g, _ in order], {g: _shape_of(o, expected) for g, o in order}, load,
                        template, folder.resolve().name)


def source_from_gguf(path: Path) -> TensorSource:
    from devstral.formats.gguf_config import config_from_gguf
    from devstral.formats.gguf_read import GGUFFile
    from devstral.formats.gguf_vocab import vocab_from_gguf

    g = GGUFFile(path)
    names = [n for n in g.tensor_names if to_gguf_name_known(n)]
    unknown = [n for n in g.tensor_names if n not in names]
    if unknown:
        print(f"note: {len(unknown)} tensors not used by the text model are dropped ({unknown[0]}, ...)",
              file=sys.stderr)
    emb = g.info("token_embd.weight") if "token_embd.weight" in g.infos else None
    cfg = config_from_gguf(g.metadata, source=str(g.path), vocab_size=emb.shape[0] if emb else None,
                           has_output="output.weight" in g.infos)
    if emb is not None:
        from devstral.formats.gguf_model import check_gguf_config_against_tensors

        check_gguf_config_against_tensors(g, cfg)

    def load(name: str) -> torch.Tensor:
        from devstral.formats.finite import check_finite

        w = g.tensor(name)
        check_finite(w, name, g.path)
        return w

    return TensorSource(cfg, vocab_from_gguf(g.metadata), names, {n: g.info(n).shape for n in names}, load,
                        g.metadata.get("tokenizer.chat_template"),
                        str(g.metadata.get("general.name") or Path(path).stem))


def to_gguf_name_known(name: str) -> bool:
    from devstral.formats.gguf_names import from_gguf_name

    return from_gguf_name(name) is not None or expert_parts(name, 1) is not None


def _file_type(ftype: str) -> int:
    import gguf

    key = "ALL_F32" if ftype == "F32" else f"MOSTLY_{ftype}"
    return int(gguf.LlamaFileType[key])


def export_gguf(source: str | os.PathLike | dict[str, torch.Tensor] | TensorSource, out_path: str | os.PathLike,
                ftype: str = "Q4_K_M", *, config: ModelConfig | None = None, tokenizer_folder: str | os.PathLike | None = None,
                imatrix: str | os.PathLike | dict[str, torch.Tensor] | None = None,
                tensor_types: list[str] | None = None, chat_template: str | None = None, name: str | None = None,
                progress: bool = False) -> Path:
    """Write a llama.cpp-compatible GGUF and return its path.

    source: an HF or Mistral model folder, a .gguf file (requantized), or a state dict with our
    tensor names (then `config` and `tokenizer_folder`, the folder holding tekken.json or the SPM
    model, are required). ftype: Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q5_0, Q4_0, F16, BF16, F32.
    tensor_types: llama-quantize's --tensor-type "REGEX=TYPE" overrides. imatrix: a llama.cpp
    importance-matrix file (or {gguf tensor name: per-column importance}).
    """
    import gguf

    from devstral.quant import quantize
    from devstral.quant.recipes import FILE_TYPES, choose_type, parse_tensor_type_override, read_imatrix

    key = ftype.upper()
    if key not in FILE_TYPES:
        raise DevstralError(f"unknown quantization type {ftype!r}; choose one of {', '.join(FILE_TYPES)}")
    src = _resolve_source(source, config, tokenizer_folder)
    cfg = src.config
    overrides = [parse_tensor_type_override(t) for t in tensor_types or []]
    imat: dict[str, torch.Tensor] = {}
    if imatrix is not None:
        imat = dict(imatrix) if isinstance(imatrix, dict) else read_imatrix(imatrix)
    tied = "output.weight" not in src.names
    plan = [(n, choose_type(n, src.shapes[n], key, cfg.n_layers, overrides, tied_embeddings=tied,
                            has_imatrix=bool(imat), n_experts=cfg.n_experts)) for n in src.names]
    out = Path(out_path)
    if out.suffix != ".gguf":
        raise DevstralError(f"{out}: the output file must end in .gguf")
    if not out.parent.is_dir():
        raise DevstralError(f"{out.parent}: no such folder")
    tmp = temp_path(out)  # ours by name: a killed run's file is swept by the next `devstral quantize`
    arch = _arch(cfg)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _write_metadata(writer, src, key, name, chat_template)
        from devstral.quant import row_bytes

        for n, qtype in plan:
            shape = src.shapes[n]
            n_rows = 1
            for d in shape[:-1]:
                n_rows *= d
            nbytes = n_rows * row_bytes(qtype, shape[-1], name=n)
            writer.add_tensor_info(n, [*shape[:-1], nbytes // n_rows] if len(shape) > 1 else [nbytes], _u8(), nbytes,
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with _progress(progress, len(plan), out.name) as advance:
            for n, qtype in plan:
                w = src.load(n)
                if w.dim() == 3:  # stacked experts: rows of all experts, quantized like one matrix
                    w = w.reshape(-1, w.shape[-1])
                stacked = expert_parts(n, 1) is not None  # (an importance matrix would be per expert)
                data = quantize(w, qtype, imatrix=None if stacked else _imatrix_for(imat, n, qtype), name=n)
                writer.write_tensor_data(data.reshape(-1).numpy())
                advance(n, qtype)
                del w, data
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _imatrix_for(imat: dict[str, torch.Tensor], name: str, qtype) -> torch.Tensor | None:
    from gguf import GGMLQuantizationType as QType

    if not imat or qtype in (QType.F32, QType.F16, QType.BF16, QType.Q8_0):
        return None
    return imat.get(name)


def _u8():
    import numpy as np

    return np.dtype(np.uint8)


def _arch(cfg: ModelConfig) -> str:
    from devstral.formats.gguf_config import gguf_arch_for

    return gguf_arch_for(cfg)


def _resolve_source(source: Any, config: ModelConfig | None, tokenizer_folder: Any) -> TensorSource:
    if isinstance(source, TensorSource):
        return source
    if isinstance(source, dict):
        if config is None or tokenizer_folder is None:
            raise DevstralError("export_gguf: a state dict needs config= and tokenizer_folder=")
        from devstral.formats.gguf_chat import builtin_template, template_version_for
        from devstral.formats.gguf_vocab import vocab_from_folder

        vocab = vocab_from_folder(Path(tokenizer_folder))
        version = template_version_for(vocab.version)
        return source_from_state(source, config, vocab,
                                 chat_template=builtin_template(version) if version else None,
                                 model_name=Path(tokenizer_folder).resolve().name)
    path = Path(source)
    if path.is_dir() and not any(path.glob("*.gguf")) or path.is_dir() and any(path.glob("*.safetensors")):
        return source_from_folder(path)
    if path.is_file() and path.suffix == ".gguf" or path.is_dir():
        return source_from_gguf(path)
    raise DevstralError(f"{path}: not a model folder or .gguf file")


def _write_metadata(w, src: TensorSource, ftype: str, name: str | None, chat_template: str | None) -> None:
    from devstral.formats.gguf_config import write_config

    w.add_type("model")
    w.add_name(name or src.model_name)
    w.add_file_type(_file_type(ftype))
    w.add_quantization_version(QUANTIZATION_VERSION)
    write_config(w, src.config)
    src.vocab.write(w)
    template = chat_template or src.chat_template
    if template:
        w.add_chat_template(template)


class _progress:
    """A rich progress bar over tensors (on stderr), or nothing."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label

    def __enter__(self):
        if not self.enabled:
            return lambda name, qtype: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[tensor]}"),
                            console=Console(stderr=True), transient=False)
        self.bar.__enter__()
        task = self.bar.add_task(f"quantizing {self.label}", total=self.total, tensor="")

        def advance(name: str, qtype) -> None:
            self.bar.update(task, advance=1, tensor=f"{name} -> {qtype.name}")

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)

