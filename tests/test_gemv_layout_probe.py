"""benchmarks/gemv_layout_probe.py's padded weight: the same values in every planar field, each row its pad further
from the next (the row stride the kernels read; Q4_K's mn rows half the pad, as their stride is half sc's), in its
own buffers, so that the probe times the same GEMV on another layout (on the GPU it also checks the outputs bit for
bit)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from devstral.kernels.gguf_pack import pack  # noqa: E402
from devstral.quant import QType  # noqa: E402
from gemv_layout_probe import padded  # noqa: E402
from test_kernels_gguf_wide import random_blocks  # noqa: E402


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q6_K, QType.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("pad", [128, 1280])
def test_padded_weight_keeps_every_value_at_a_longer_row_stride(qtype, pad):
    n, k = 5, 512
    p = pack(random_blocks(qtype, n, k, torch.Generator().manual_seed(2)), qtype, n, k)
    q = padded(p, pad)
    assert set(q.arrays) == set(p.arrays)
    for name, a in p.arrays.items():
        b = q[name]
        assert b.shape == a.shape and torch.equal(b, a), name
        grow = pad // 2 if name == "mn" else pad  # the mn plane's rows stay half as long as sc's
        assert b.stride(0) == a.shape[1] + grow // a.element_size() and b.stride(1) == 1, name
        assert b.data_ptr() != a.data_ptr()  # its own buffer: the probe's layout, not a view of the original
