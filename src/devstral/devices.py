"""Which device and dtype a model runs on: `--device` and `--dtype` resolved, with one-line errors.

Its own module so that the loaders of every format (loader.py, formats/gguf_model.py) can use it
without importing each other.
"""

from __future__ import annotations

import torch

from devstral.config import ModelConfig
from devstral.errors import DevstralError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DevstralError(f"--device: unknown value {device!r} (choose auto, cpu or cuda)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DevstralError("--device cuda: no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        # fp32 keeps small models exact on CPU; big ones would need 4 bytes per weight of RAM.
        return torch.float32 if cfg.n_params < 2_000_000_000 else torch.bfloat16
    if dtype not in DTYPES:
        raise DevstralError(f"--dtype: unknown value {dtype!r} (choose auto, fp32, bf16 or fp16)")
    return DTYPES[dtype]
