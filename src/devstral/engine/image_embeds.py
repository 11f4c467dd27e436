"""Image embeddings for the engine's steps: which rows of a step's flat batch are [IMG] tokens, and
the vision encoder's output for them.

An image is encoded when a prefill chunk first reaches its tokens (a prefix-cache hit that covers it
encodes nothing), every image a step needs in one batched call, and the result is kept, by content
digest, in a small LRU: the next turn of a conversation, a preempted sequence's recompute, or n
choices of one request never encode the same screenshot twice.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from devstral.model.vision import VisionModel
from devstral.prompt.images import PromptImage, take_from_cache


class ImageEmbedder:
    def __init__(self, vision: VisionModel, *, capacity: int = 32):
        self.vision, self.capacity = vision, capacity
        self.cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.encoded_images = 0  # images that went through the encoder (tests and /metrics)

    @torch.inference_mode()
    def embeddings(self, images: list[PromptImage]) -> list[torch.Tensor]:
        """[num_embeddings, text_dim] per image, encoding only those not cached (together)."""
        missing = list({im.digest: im for im in images if im.digest not in self.cache}.values())
        if missing:
            dev = self.vision.device
            pixels = [torch.from_numpy(im.pixels).to(dev, non_blocking=True) for im in missing]
            for im, emb in zip(missing, self.vision(pixels), strict=True):
                if emb.shape[0] != im.num_embeddings:
                    raise ValueError(f"the vision encoder made {emb.shape[0]} embeddings for an image with "
                                     f"{im.num_embeddings} [IMG] tokens")
                self.cache[im.digest] = emb
            self.encoded_images += len(missing)
        return take_from_cache(self.cache, images, self.capacity)

    def injection(self, spans: list[tuple[int, int, int, list[PromptImage]]],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """spans: (row of the chunk's first token in the flat batch, the chunk's first position, its
        length, the sequence's images). Returns (flat rows, embeddings) for every [IMG] token inside."""
        wanted: list[tuple[np.ndarray, PromptImage, np.ndarray]] = []  # (flat rows, image, which embeddings)
        for row0, start, n, images in spans:
            end = start + n
            for im in images:
                if im.start >= end or im.end <= start:
                    continue
                pos = im.start + im.image_token_offsets  # absolute positions of its [IMG] tokens
                keep = np.flatnonzero((pos >= start) & (pos < end))
                if len(keep):
                    wanted.append((row0 + pos[keep] - start, im, keep))
        if not wanted:
            return None
        embeds = self.embeddings([im for _, im, _ in wanted])
        rows = np.concatenate([r for r, _, _ in wanted])
        values = torch.cat([emb[torch.from_numpy(keep).to(emb.device)]
                            for (_, _, keep), emb in zip(wanted, embeds, strict=True)])
        return torch.from_numpy(rows).to(device, non_blocking=True), values
