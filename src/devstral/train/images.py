"""Images in fine-tuning: the vision encoder's [IMG] embeddings put into the decoder's input, as serving does.

The Pixtral tower is frozen and runs without autograd; the projector runs with autograd only when it
trains (`--train-projector`), so its gradient comes from the decoder's loss through the injected
embeddings. The rows and values go to `Transformer.hidden_states(inject=...)`, the hook the engine uses:
a training forward at step 0 is the inference forward on the same ids and pixels.
"""

from __future__ import annotations

import numpy as np
import torch

from devstral.model.vision import VisionModel
from devstral.train.batching import Batch


class TrainingImages:
    def __init__(self, vision: VisionModel, *, train_projector: bool = False):
        self.vision, self.train_projector = vision, train_projector
        vision.requires_grad_(False)
        if train_projector:  # fp32 weights for AdamW (autocast runs its matmuls in bf16 on CUDA)
            vision.multi_modal_projector.float().requires_grad_(True)

    def parameters(self) -> list[torch.nn.Parameter]:
        """What trains here: the projector's weights with --train-projector, else nothing."""
        return list(self.vision.multi_modal_projector.parameters()) if self.train_projector else []

    def projector_state(self) -> dict[str, torch.Tensor]:
        """The projector's weights (names inside multi_modal_projector), on the CPU in fp32."""
        return {k: v.detach().float().cpu().clone() for k, v in self.vision.multi_modal_projector.state_dict().items()}

    def load_projector(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.vision.multi_modal_projector.named_parameters():
                p.copy_(state[name])

    def inject(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat B*T rows of every [IMG] token of the batch, their embeddings), or None without images."""
        if not batch.images:
            return None
        device, dtype = self.vision.device, self.vision.dtype
        unique: dict[bytes, int] = {}
        pixels = []
        for _, im in batch.images:  # an image repeated in the batch is encoded once
            if im.digest not in unique:
                unique[im.digest] = len(pixels)
                pixels.append(torch.from_numpy(im.pixels).to(device, dtype, non_blocking=True))
        m = self.vision.config.spatial_merge_size
        with torch.no_grad():
            states, grids = self.vision.vision_tower(pixels)
        with torch.enable_grad() if self.train_projector and torch.is_grad_enabled() else torch.no_grad():
            features = self.vision.multi_modal_projector(states, grids)
        per_image = features.split([(h // m) * (w // m) for h, w in grids])
        rows = np.concatenate([first + im.image_token_offsets for first, im in batch.images])
        values = torch.cat([per_image[unique[im.digest]] for _, im in batch.images])
        return torch.from_numpy(rows).to(batch.tokens.device, non_blocking=True), values
