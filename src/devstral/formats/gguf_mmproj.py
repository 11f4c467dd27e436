"""llama.cpp's mmproj GGUF for a Pixtral vision encoder (projector type "pixtral"): read and write.

The layout is what llama.cpp's converter writes for Mistral3ForConditionalGeneration: architecture
"clip", the `clip.vision.*` keys, tensor names `v.*` for the encoder and `mm.*` for the projector
(gguf-py's MMPROJ name table), q/k rows in llama.cpp's rotary order (permuted per head, as the text
model's are), and the decoder's [IMG_BREAK] embedding as `v.token_embd.img_break` (llama.cpp builds
the row breaks into the image's embeddings; we take them from the decoder and only write it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from devstral.errors import DevstralError
from devstral.formats.safetensors import permute_for_interleaved, permute_for_rotate_half
from devstral.model.vision import VisionModel
from devstral.model.vision_config import VisionConfig
from devstral.tmpfiles import temp_path

PROJECTOR = "pixtral"
IMG_BREAK = "v.token_embd.img_break"
_LAYER = {"attention.q_proj": "attn_q", "attention.k_proj": "attn_k", "attention.v_proj": "attn_v",
          "attention.o_proj": "attn_out", "attention_norm": "ln1", "ffn_norm": "ln2",
          "feed_forward.gate_proj": "ffn_gate", "feed_forward.up_proj": "ffn_up", "feed_forward.down_proj": "ffn_down"}
_TOP = {"vision_tower.patch_conv": "v.patch_embd", "vision_tower.ln_pre": "v.pre_ln",
        "multi_modal_projector.norm": "mm.input_norm", "multi_modal_projector.patch_merger.merging_layer":
        "mm.patch_merger", "multi_modal_projector.linear_1": "mm.1", "multi_modal_projector.linear_2": "mm.2"}
_ROTARY = ("attn_q", "attn_k")


def to_mmproj_name(name: str) -> str:
    """VisionModel parameter name -> mmproj tensor name ("vision_tower.transformer.layers.3.attention.q_proj.weight"
    -> "v.blk.3.attn_q.weight")."""
    module, _, kind = name.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{kind}"
    prefix = "vision_tower.transformer.layers."
    if module.startswith(prefix):
        layer, _, rest = module[len(prefix):].partition(".")
        if rest in _LAYER:
            return f"v.blk.{layer}.{_LAYER[rest]}.{kind}"
    raise KeyError(name)


def vision_config_from_gguf(metadata: dict[str, Any], *, text_dim: int, image_token_id: int, source: str) -> VisionConfig:
    def get(key: str, default: Any = None) -> Any:
        v = metadata.get(key, default)
        if v is None:
            raise DevstralError(f"{source}: missing key {key!r} (not a vision projector GGUF?)")
        return v

    if metadata.get("general.architecture") != "clip":
        raise DevstralError(f"{source}: not an mmproj GGUF (general.architecture is "
                            f"{metadata.get('general.architecture')!r}, expected 'clip')")
    if not metadata.get("clip.has_vision_encoder", False):
        raise DevstralError(f"{source}: this mmproj has no vision encoder (clip.has_vision_encoder)")
    kind = metadata.get("clip.vision.projector_type", metadata.get("clip.projector_type"))
    if kind != PROJECTOR:
        raise DevstralError(f"{source}: projector type {kind!r} is not supported (expected {PROJECTOR!r}, the "
                            "Pixtral / Mistral 3 one)")
    dim = get("clip.vision.projection_dim")
    if dim != text_dim:
        raise DevstralError(f"{source}: clip.vision.projection_dim {dim} does not match the model's hidden size "
                            f"{text_dim}: this mmproj belongs to another model")
    eps = float(get("clip.vision.attention.layer_norm_epsilon", 1e-5))
    return VisionConfig(
        hidden_size=get("clip.vision.embedding_length"), intermediate_size=get("clip.vision.feed_forward_length"),
        n_layers=get("clip.vision.block_count"), n_heads=get("clip.vision.attention.head_count"),
        patch_size=get("clip.vision.patch_size"), image_size=get("clip.vision.image_size"), text_dim=text_dim,
        rope_theta=float(metadata.get("clip.rope.freq_base", 10000.0)),
        hidden_act="silu" if metadata.get("clip.use_silu") else "gelu",  # transformers' Pixtral default: gelu
        norm_eps=eps, projector_norm_eps=eps, spatial_merge_size=get("clip.vision.spatial_merge_size"),
        image_token_id=image_token_id, source=source)


def _search_folders(model: Path) -> list[Path]:
    """The model's folder, then, when the model lies in a Hugging Face cache snapshot
    (`models--org--repo/snapshots/<commit>/...`), each folder above it up to the snapshot's root:
    a hub repo keeps one projector at its top for quants in subfolders (formats/hub.select_mmproj)."""
    folders = [model.parent]
    parts = model.parent.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            folders += [Path(*parts[:j]) for j in range(len(parts) - 1, i + 1, -1)]
            break
    return folders


def find_mmproj(model: Path, text_dim: int) -> Path | None:
    """The vision projector beside a GGUF model, as llama.cpp and Ollama users keep them: an
    `mmproj*.gguf` in the model's folder whose header says it is a pixtral projector for this model's
    width. `mmproj-<model file>` (what `devstral quantize` writes) first, then F16, BF16, F32 (the
    files Hugging Face GGUF repos ship), then by name; in a hub snapshot, the folders above the model
    after its own. Only headers are read; None when none fits."""
    from devstral.formats.gguf_read import parse_header, resolve_gguf_path

    model = resolve_gguf_path(Path(model))
    preference = [f"mmproj-{model.name}".lower(), "f16", "bf16", "f32"]

    def rank(p: Path) -> tuple[int, str]:
        name = p.name.lower()
        if name == preference[0]:
            return 0, name
        tags = name[len("mmproj"):-len(".gguf")].replace("_", "-").replace(".", "-").split("-")
        return next((i for i, t in enumerate(preference[1:], 1) if t in tags), len(preference)), name

    for folder in _search_folders(model):
        try:
            found = [p for p in folder.iterdir()
                     if p.name.lower().startswith("mmproj") and p.suffix.lower() == ".gguf" and p.is_file()]
        except OSError:
            continue
        for candidate in sorted(found, key=rank):
            try:
                md = parse_header(candidate).metadata
            except DevstralError:
                continue  # not a readable GGUF: not ours to load
            kind = md.get("clip.vision.projector_type", md.get("clip.projector_type"))
            if md.get("general.architecture") == "clip" and kind == PROJECTOR and \
                    md.get("clip.vision.projection_dim") == text_dim:
                return candidate
    return None


def load_mmproj(path: str | Path, *, text_dim: int, image_token_id: int, dtype: torch.dtype,
                device: torch.device) -> VisionModel:
    """The VisionModel stored in an mmproj GGUF; one line naming the file for anything off."""
    from devstral.formats.gguf_read import GGUFFile
    from devstral.formats.vision_checkpoint import fill_vision

    g = GGUFFile(path)
    vc = vision_config_from_gguf(g.metadata, text_dim=text_dim, image_token_id=image_token_id, source=str(g.path))
    with torch.device("meta"):
        names = {to_mmproj_name(n): n for n, _ in VisionModel(vc).named_parameters()}
    extra = [n for n in g.tensor_names if n not in names and n != IMG_BREAK]
    if extra:
        raise DevstralError(f"{g.path}: unexpected tensor {extra[0]!r} for a {PROJECTOR} projector")

    def tensors():
        for gname, ours in names.items():
            if gname not in g.infos:
                continue  # reported as missing, by our name, by fill_vision
            t = g.tensor(gname)
            if gname.split(".")[-2] in _ROTARY and t.dim() == 2:
                t = permute_for_rotate_half(t, vc.n_heads)
            t = t.to(device=device, dtype=dtype)
            from devstral.formats.finite import check_finite

            check_finite(t, gname, g.path)
            yield ours, t

    return fill_vision(vc, tensors(), where=str(g.path))


def write_mmproj(vision: VisionModel, path: str | os.PathLike, *, img_break: torch.Tensor | None = None,
                 ftype: str = "F16", name: str | None = None) -> Path:
    """Write `vision` as llama.cpp's mmproj GGUF (F16 or F32 matrices; norms always F32)."""
    import gguf
    import numpy as np
    from mistral_common.tokens.tokenizers.image import DATASET_MEAN, DATASET_STD

    if ftype.upper() not in ("F16", "F32"):
        raise DevstralError(f"mmproj type {ftype!r}: choose F16 or F32")
    out = Path(path)
    vc = vision.config
    tmp = temp_path(out)
    w = gguf.GGUFWriter(tmp, "clip")
    try:
        w.add_type(gguf.GGUFType.MMPROJ)
        if name:
            w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype.upper() == "F16" else gguf.LlamaFileType.ALL_F32)
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type(PROJECTOR)
        w.add_vision_projection_dim(vc.text_dim)
        w.add_vision_image_size(vc.image_size)
        w.add_vision_patch_size(vc.patch_size)
        w.add_vision_embedding_length(vc.hidden_size)
        w.add_vision_feed_forward_length(vc.intermediate_size)
        w.add_vision_block_count(vc.n_layers)
        w.add_vision_head_count(vc.n_heads)
        w.add_vision_attention_layernorm_eps(vc.norm_eps)
        w.add_vision_spatial_merge_size(vc.spatial_merge_size)
        w.add_vision_image_mean(list(DATASET_MEAN))
        w.add_vision_image_std(list(DATASET_STD))
        if vc.rope_theta != 10000.0:
            w.add_rope_freq_base(vc.rope_theta)
        (w.add_vision_use_gelu if vc.hidden_act == "gelu" else w.add_vision_use_silu)(True)
        half = ftype.upper() == "F16"
        for ours, p in vision.named_parameters():
            gname = to_mmproj_name(ours)
            t = p.detach().float().cpu()
            if gname.split(".")[-2] in _ROTARY and t.dim() == 2:
                t = permute_for_interleaved(t, vc.n_heads)
            keep_f32 = t.dim() == 1 or not half
            w.add_tensor(gname, t.numpy().astype(np.float32 if keep_f32 else np.float16))
        if img_break is not None:
            w.add_tensor(IMG_BREAK, img_break.detach().float().cpu().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def export_mmproj(folder: Path, out: str | os.PathLike, *, ftype: str = "F16", name: str | None = None,
                  embeddings_from: Path | None = None, projector: dict[str, torch.Tensor] | None = None) -> Path | None:
    """The mmproj GGUF of a multimodal safetensors folder (None when it has no vision tower): what
    `devstral quantize` and `finetune --gguf` write beside the model's GGUF, for llama.cpp's --mmproj
    and ours. `embeddings_from`: the (fine-tuned) folder whose [IMG_BREAK] embedding to store, when
    the vision tower comes from its base; `projector`: trained projector weights (names inside
    multi_modal_projector) that replace the folder's."""
    from safetensors import safe_open

    from devstral.config import ModelConfig
    from devstral.formats.safetensors import canonical_name, read_header, weight_files
    from devstral.formats.vision_checkpoint import build_vision, has_vision_tensors, vision_config_of
    from devstral.prompt.tokenizer import load_tokenizer

    folder = Path(folder)
    if not folder.is_dir():
        return None
    cfg = ModelConfig.from_dir(folder)
    vc = vision_config_of(folder, cfg)
    if vc is None or not has_vision_tensors(folder):
        return None
    vision = build_vision(folder, cfg, vc, dtype=torch.float32, device=torch.device("cpu"))
    if projector:
        vision.multi_modal_projector.load_state_dict({k: v.float() for k, v in projector.items()})
    img_break = None
    row = load_tokenizer(folder).special_id("[IMG_BREAK]")
    layout, files = weight_files(Path(embeddings_from) if embeddings_from is not None else folder)
    for path in files:
        for e in read_header(path):
            if row is not None and canonical_name(e.name, layout) == "model.embed_tokens.weight":
                with safe_open(str(path), framework="pt") as f:
                    img_break = f.get_slice(e.name)[row:row + 1][0].float()
    return write_mmproj(vision, out, img_break=img_break, ftype=ftype, name=name)
