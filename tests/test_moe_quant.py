"""llama.cpp's quantization mix for mixture-of-experts models, with llama.cpp's own quantizer as the oracle.

llama-quant.cpp treats MoE models apart: with exactly 8 experts (Mixtral 8x7B / 8x22B) it spends the bits
the experts save on attention (attn_v and attn_k to Q8_0, attn_output to Q5_K in the Q4_K mixes), the
router stays F32, and ffn_down_exps takes the ffn_down rule by its layer. We export an F16 GGUF, let
llama_model_quantize pick types for it, and require our recipe to pick the same type for every tensor.
"""

from __future__ import annotations

import ctypes

import pytest
from gguf import GGUFReader

from devstral.formats.gguf import GGUFFile, export_gguf
from devstral.quant import QType
from devstral.quant.recipes import choose_type
from devstral.testing import make_tiny_checkpoint

llama_cpp = pytest.importorskip("llama_cpp")

LLAMA_FTYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
                "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}


@pytest.mark.parametrize("n_experts,ftypes", [(8, ("Q4_K_M", "Q6_K")), (4, ("Q4_K_M",))])
def test_recipe_matches_llama_cpp_quantize(tmp_path, n_experts, ftypes):
    # hidden_dim 32: ffn_down_exps rows hold no whole 256-blocks, so the fallback types are checked too
    ck = make_tiny_checkpoint(tmp_path / "ck", inner_vocab=300, dim=256, hidden_dim=32, n_layers=2, n_heads=4,
                              n_kv_heads=2, head_dim=64, n_experts=n_experts, n_experts_per_tok=2)
    src = export_gguf(ck, tmp_path / "f16.gguf", "F16")
    for ftype in ftypes:
        lc_name = LLAMA_FTYPES[ftype]
        dst = tmp_path / f"llama-{ftype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = getattr(llama_cpp, lc_name), 1
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
        ours = GGUFFile(export_gguf(ck, tmp_path / f"ours-{ftype}.gguf", ftype))
        theirs = {t.name: QType(int(t.tensor_type)) for t in GGUFReader(str(dst)).tensors}
        assert set(theirs) == set(ours.tensor_names)
        for name, qtype in theirs.items():
            assert ours.info(name).qtype is qtype, (ftype, name)
            assert choose_type(name, ours.info(name).shape, ftype, 2, [], n_experts=n_experts) is qtype
        assert theirs["blk.0.ffn_gate_inp.weight"] is QType.F32
        if ftype == "Q4_K_M":  # the 8-expert rules fire only with 8 experts
            eight = n_experts == 8
            assert (theirs["blk.0.attn_v.weight"] is QType.Q8_0) == eight
            assert (theirs["blk.0.attn_k.weight"] is QType.Q8_0) == eight
            assert (theirs["blk.0.attn_output.weight"] is QType.Q5_K) == eight
