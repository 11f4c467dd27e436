"""VisionConfig: the Pixtral vision encoder and Mistral 3 projector of a multimodal checkpoint.

Read from an HF `Mistral3ForConditionalGeneration` config.json (`vision_config` plus the top-level
projector keys) or from a llama.cpp mmproj GGUF's `clip.*` metadata (formats/gguf_mmproj.py). The
model (model/vision.py) and the image preprocessing (mistral-common's ImageEncoder, whose patch and
merge sizes must agree with these) read only this dataclass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from devstral.errors import DevstralError

ACTIVATIONS = ("silu", "gelu")
MAX_VISION_LAYERS = 512


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    patch_size: int
    text_dim: int  # the decoder's hidden size: what the projector outputs
    image_size: int = 1024  # the longest side the encoder was trained for, in pixels
    num_channels: int = 3
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    norm_eps: float = 1e-5  # Pixtral's RMSNorms (a constant in transformers' modeling_pixtral)
    spatial_merge_size: int = 2
    projector_norm_eps: float = 1e-5
    projector_act: str = "gelu"
    projector_bias: bool = False
    image_token_id: int = 10
    source: str = "config"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "n_layers", "n_heads", "patch_size", "text_dim",
                     "image_size", "num_channels", "spatial_merge_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise DevstralError(f"{self.source}: vision {name} must be a positive integer, got {v!r}")
        if self.n_layers > MAX_VISION_LAYERS:
            raise DevstralError(f"{self.source}: vision n_layers {self.n_layers} is absurd (more than "
                                f"{MAX_VISION_LAYERS})")
        if self.hidden_size % self.n_heads or (self.hidden_size // self.n_heads) % 4:
            raise DevstralError(f"{self.source}: vision hidden_size {self.hidden_size} must split into "
                                f"{self.n_heads} heads whose size is a multiple of 4 (2D rotary embeddings)")
        for name in ("hidden_act", "projector_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise DevstralError(f"{self.source}: vision {name} {getattr(self, name)!r} is not supported "
                                    f"(expected one of {', '.join(ACTIVATIONS)})")
        for name in ("rope_theta", "norm_eps", "projector_norm_eps"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise DevstralError(f"{self.source}: vision {name} must be a positive number, got {v!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def tokens_per_side_pixels(self) -> int:
        """Pixels per image token along each side (patch x merge)."""
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, text_dim: int, text_norm_eps: float,
                source: str = "config.json") -> VisionConfig | None:
        """The vision part of a mistral3 config.json, or None for a text-only config."""
        from devstral.config import _Getter

        if d.get("model_type") != "mistral3" or d.get("vision_config") is None:
            return None
        g = _Getter(d, source)
        v = _Getter(d["vision_config"], f"{source}: vision_config")
        if v.opt("model_type", "pixtral") != "pixtral":
            raise DevstralError(f"{source}: vision_config.model_type {v.opt('model_type')!r} is not supported "
                                "(expected pixtral)")
        layer = g.opt("vision_feature_layer", -1)
        if layer != -1:
            raise DevstralError(f"{source}: vision_feature_layer {layer!r} is not supported (expected -1)")
        rope = _Getter(v.opt("rope_parameters") or {}, f"{source}: vision_config.rope_parameters")
        theta = rope.number("rope_theta", None) or v.number("rope_theta", 10000.0)
        image_size = v.opt("image_size", 1024)
        patch = v.opt("patch_size", 16)
        if isinstance(image_size, list):
            image_size = max(image_size)
        if isinstance(patch, list) and len(set(patch)) == 1:
            patch = patch[0]
        text = d.get("text_config") if isinstance(d.get("text_config"), dict) else {}
        try:
            return cls(
                hidden_size=v.integer("hidden_size", 1024), intermediate_size=v.integer("intermediate_size", 4096),
                n_layers=v.integer("num_hidden_layers", 24), n_heads=v.integer("num_attention_heads", 16),
                patch_size=patch, image_size=image_size, num_channels=v.integer("num_channels", 3),
                rope_theta=theta, hidden_act=v.text("hidden_act", "gelu"), text_dim=text_dim,
                spatial_merge_size=g.integer("spatial_merge_size", 2),
                projector_norm_eps=float(text.get("rms_norm_eps", text_norm_eps)),
                projector_act=g.text("projector_hidden_act", "gelu"),
                projector_bias=g.flag("multimodal_projector_bias", False),
                image_token_id=g.integer("image_token_index", None) or g.integer("image_token_id", 10),
                source=source)
        except TypeError as e:  # a list where a number belongs
            raise DevstralError(f"{source}: vision_config: {e}") from None

    def to_hf(self, text_config: dict[str, Any]) -> dict[str, Any]:
        """A mistral3 config.json wrapping `text_config` (which transformers loads as
        Mistral3ForConditionalGeneration)."""
        return {
            "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
            "text_config": text_config,
            "vision_config": {"model_type": "pixtral", "hidden_size": self.hidden_size,
                              "intermediate_size": self.intermediate_size, "num_hidden_layers": self.n_layers,
                              "num_attention_heads": self.n_heads, "head_dim": self.head_dim,
                              "patch_size": self.patch_size, "image_size": self.image_size,
                              "num_channels": self.num_channels, "hidden_act": self.hidden_act,
                              "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta}},
            "spatial_merge_size": self.spatial_merge_size, "projector_hidden_act": self.projector_act,
            "multimodal_projector_bias": self.projector_bias, "image_token_index": self.image_token_id,
            "vision_feature_layer": -1,
            "tie_word_embeddings": bool(text_config.get("tie_word_embeddings", False)),
        }

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return d
