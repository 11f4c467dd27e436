"""The Pixtral vision encoder and the Mistral 3 multimodal projector: images -> decoder embeddings.

A separate small network beside the one decoder (model/transformer.py). Module names mirror
transformers' `Mistral3Model.vision_tower` (PixtralVisionModel) and `.multi_modal_projector`, so a
`Mistral3ForConditionalGeneration` checkpoint loads by name (formats/safetensors.py strips the
leading `model.`) and LoRA keys would be PEFT's.

The images of one call are encoded together: every linear layer runs once over all their patches,
and attention is block-diagonal (each image attends only to itself), done as one SDPA call per image
so memory grows with the patches of an image, not with the square of the batch's. Positions are 2D
(row, column) through axial rotary embeddings; the projector merges each 2x2 (spatial_merge_size)
block of patches into one token and maps it to the decoder's width.

Input images come from mistral-common's ImageEncoder: [C, H, W] arrays, already resized so that H and
W are multiples of patch_size x spatial_merge_size and normalized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from devstral.model.vision_config import VisionConfig

_ACT = {"silu": F.silu, "gelu": F.gelu}  # transformers' "gelu" is the exact (erf) GELU


class VisionRMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as transformers' Pixtral does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def axial_rope(cfg: VisionConfig, grids: list[tuple[int, int]], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, head_dim] for every patch of the images (row-major per image), rotate-half layout.

    The head's frequencies theta^(-2i/d) are dealt out alternately to the row and the column: even
    ones rotate by the patch's row, odd ones by its column, and the half-dim angle vector
    [row angles, column angles] is repeated for the two halves that rotate_half pairs."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    rows, cols = [], []
    for h, w in grids:
        r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        rows.append(r.flatten())
        cols.append(c.flatten())
    r = torch.cat(rows).float()[:, None]
    c = torch.cat(cols).float()[:, None]
    angles = torch.cat([r * inv[0::2], c * inv[1::2]], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        dim = cfg.hidden_size
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.n_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.n_heads, self.head_dim)
        c, s = cos[:, None], sin[:, None]
        q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        out = torch.empty_like(q)
        start = 0
        for length in lengths:  # block-diagonal: each image attends within itself
            seg = slice(start, start + length)
            out[seg] = F.scaled_dot_product_attention(q[seg].transpose(0, 1), k[seg].transpose(0, 1),
                                                      v[seg].transpose(0, 1)).transpose(0, 1)
            start += length
        return self.o_proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _ACT[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attention_norm = VisionRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = VisionAttention(cfg)
        self.ffn_norm = VisionRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = VisionMLP(cfg)

    def forward(self, x, cos, sin, lengths):
        x = x + self.attention(self.attention_norm(x), cos, sin, lengths)
        return x + self.feed_forward(self.ffn_norm(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.n_layers))


class PixtralEncoder(nn.Module):
    """transformers' PixtralVisionModel: patch convolution, RMSNorm, the transformer."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_conv = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                    stride=cfg.patch_size, bias=False)
        self.ln_pre = VisionRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.transformer = VisionTransformer(cfg)

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images [C, H, W] -> (last layer's states [sum of patches, hidden], (rows, cols) per image)."""
        dtype = self.patch_conv.weight.dtype
        patches, grids = [], []
        for image in images:
            p = self.patch_conv(image.to(dtype)[None])[0]  # [hidden, rows, cols]
            grids.append((p.shape[1], p.shape[2]))
            patches.append(p.flatten(1).T)
        x = self.ln_pre(torch.cat(patches))
        cos, sin = axial_rope(self.config, grids, x.device, x.dtype)
        lengths = [h * w for h, w in grids]
        for layer in self.transformer.layers:
            x = layer(x, cos, sin, lengths)
        return x, grids


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merge = cfg.spatial_merge_size
        self.merging_layer = nn.Linear(cfg.hidden_size * self.merge ** 2, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Each image's [rows*cols, d] patches -> [(rows/m)*(cols/m), d]: every m x m block's patches
        concatenated channel-major (the order of torch's unfold), then one linear layer."""
        m, d, out, start = self.merge, x.shape[-1], [], 0
        for h, w in grids:
            grid = x[start:start + h * w].view(h // m, m, w // m, m, d)
            out.append(grid.permute(0, 2, 4, 1, 3).reshape((h // m) * (w // m), d * m * m))
            start += h * w
        return self.merging_layer(torch.cat(out))


class MultiModalProjector(nn.Module):
    """transformers' Mistral3MultiModalProjector: RMSNorm, patch merger, linear, activation, linear."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm = VisionRMSNorm(cfg.hidden_size, cfg.projector_norm_eps)
        self.patch_merger = PatchMerger(cfg)
        self.linear_1 = nn.Linear(cfg.hidden_size, cfg.text_dim, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(cfg.text_dim, cfg.text_dim, bias=cfg.projector_bias)
        self.act = _ACT[cfg.projector_act]

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.patch_merger(self.norm(x), grids))))


class VisionModel(nn.Module):
    """Images -> one [tokens, text_dim] tensor per image: the embeddings of its [IMG] tokens, in order."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = PixtralEncoder(cfg)
        self.multi_modal_projector = MultiModalProjector(cfg)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        if not images:
            return []
        m = self.config.spatial_merge_size
        for image in images:
            if image.dim() != 3 or image.shape[1] % (self.config.patch_size * m) or \
                    image.shape[2] % (self.config.patch_size * m):
                raise ValueError(f"image of shape {list(image.shape)} is not [C, H, W] with H and W multiples of "
                                 f"{self.config.patch_size * m} (mistral-common's ImageEncoder makes them so)")
        x, grids = self.vision_tower(images)
        features = self.multi_modal_projector(x, grids)
        return list(features.split([(h // m) * (w // m) for h, w in grids]))

    @property
    def device(self) -> torch.device:
        return self.vision_tower.patch_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.patch_conv.weight.dtype
