"""CPU checks of the GPU weight path: the planar repack is an exact bijection on the file's bytes and
stays within budget, the CPU keeps the exact codecs, a loaded GGUF gives the logits transformers
computes from the same file (gguf-py dequantization), and the kernel choice follows the batch size."""

from __future__ import annotations

import pytest
import torch

from devstral.errors import DevstralError
from devstral.kernels import gguf_config
from devstral.kernels.gguf_pack import FORMATS, pack, packed_nbytes, unpack
from devstral.quant import QType, dequantize, quantize
from devstral.quant.layout import row_bytes
from devstral.quant.linear import GGUFWeight, QuantLinear, cuda_kernels

TYPES = sorted(FORMATS, key=lambda t: t.name)
DEVSTRAL_SHAPES = [(4096, 5120), (1024, 5120), (5120, 4096), (32768, 5120), (5120, 32768), (131072, 5120)]


@pytest.fixture
def use_table(tmp_path, monkeypatch):
    """use_table(table) -> a CUDA device whose tuned table is `table` (the GPU's name and SM count faked,
    int8 activations allowed); the table cache is cleared before and after."""
    def use(table: dict) -> torch.device:
        (tmp_path / "t.json").write_text(__import__("json").dumps(table))
        monkeypatch.setenv("DEVSTRAL_KERNEL_TUNING", str(tmp_path / "t.json"))
        monkeypatch.delenv("DEVSTRAL_GGUF_FLOAT_GEMV", raising=False)
        monkeypatch.setattr(gguf_config, "device_name", lambda d: "any")
        monkeypatch.setattr(gguf_config, "sm_count", lambda d: 132)
        gguf_config.tuned_table.cache_clear()
        return torch.device("cuda")

    yield use
    gguf_config.tuned_table.cache_clear()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n,k", [(7, 512), (1, 256), (33, 1024)])
def test_repack_round_trips_every_byte(qtype, n, k):
    # any byte pattern is a valid block of these types, so random bytes exercise every field and bit
    per_row = row_bytes(qtype, k)
    raw = torch.randint(0, 256, (n, per_row), dtype=torch.uint8, generator=torch.Generator().manual_seed(n * k))
    p = pack(raw, qtype, n, k, chunk_rows=3)  # bands of 3 rows, the last one partial
    assert torch.equal(unpack(p), raw)
    assert torch.equal(unpack(p, slice(2, min(n, 5))), raw[2:5])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_row_concatenation_and_row_slices_give_back_every_byte(qtype):
    """q/k/v or gate/up fused into one planar weight (concat_rows): each member's row slice of it is
    exactly its own weight, also over a copy of the buffer (rebind, as after a device move), and a
    slice's bytes are its own rows only."""
    from devstral.kernels.gguf_pack import concat_rows

    k = 512
    g = torch.Generator().manual_seed(7)
    raws = [torch.randint(0, 256, (n, row_bytes(qtype, k)), dtype=torch.uint8, generator=g) for n in (5, 3, 9)]
    parts = [pack(r, qtype, r.shape[0], k) for r in raws]
    fused = concat_rows(parts)
    assert fused.n == 17 and torch.equal(unpack(fused), torch.cat(raws))
    row = 0
    for raw, p in zip(raws, parts, strict=True):
        s = fused.row_slice(row, row + p.n)
        assert torch.equal(unpack(s), raw)
        assert torch.equal(unpack(s.rebind(fused.buf.clone())), raw)
        assert s.nbytes() == sum(a.numel() * a.element_size() for a in p.arrays.values())
        row += p.n
    with pytest.raises(ValueError):
        concat_rows([parts[0], pack(raws[1][:, :row_bytes(qtype, 256)].contiguous(), qtype, 3, 256)])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_repacked_weights_are_the_files_bytes_plus_alignment(qtype):
    """Every type's planar fields hold exactly the file's bytes a row (Q4_K 144 a 256-weight block, Q5_K 176, Q6_K 210,
    Q8_0 34 a 32-weight block); the buffer adds only each field's padding to ALIGN bytes."""
    from devstral.kernels.gguf_pack import ALIGN

    fmt = FORMATS[qtype]
    for n, k in DEVSTRAL_SHAPES + [(7, 512), (1, 256), (33, 1024), (301, 768)]:
        sizes = [n * (k // per) * torch.empty((), dtype=dt).element_size() for _, dt, per in fmt.fields]
        assert sum(sizes) == n * row_bytes(qtype, k), (qtype.name, n, k)
        assert packed_nbytes(qtype, n, k) == sum(-(-size // ALIGN) * ALIGN for size in sizes), (qtype.name, n, k)


@pytest.mark.parametrize(("qtype", "block_bytes"), [(QType.Q4_K, 144), (QType.Q5_K, 176)], ids=["Q4_K", "Q5_K"])
def test_q4k_q5k_scales_and_mins_take_the_files_12_bytes_a_super_block(qtype, block_bytes):
    """The 6-bit sub-block scales and mins of Q4_K/Q5_K are packed as in gguf_pack's docstring: sc one byte a sub-block
    (low nibble: the scale's low 4 bits, high nibble: the min's), mn one byte per two sub-blocks (sub-block j: nibble
    j & 1 of byte j // 2, bits 0-1 the scale's top 2 bits, bits 2-3 the min's): 12 bytes a super-block, the file's.
    Built from chosen values (every 6-bit scale and min at even and at odd j, in blocks encoded here by the GGUF rule),
    packed, checked field by field, and unpacked to the same blocks byte for byte."""
    from devstral.kernels.gguf_pack import planar_scale_min_ref
    from devstral.quant.dequant import k4_scale_min

    g = torch.Generator().manual_seed(11)
    nb = 32  # 256 sub-blocks: 128 even and 128 odd, each value twice at either parity
    j = torch.arange(8).repeat(nb, 1)
    slot = torch.arange(nb).reshape(nb, 1) * 4 + j // 2  # 0..127 within each parity
    scale = (slot % 64).to(torch.uint8)
    mins = ((slot * 37 + 5 * (j % 2) + 11) % 64).to(torch.uint8)  # another order, pairs differ between parities
    for v in range(64):
        for parity in (0, 1):
            assert ((scale == v) & (j % 2 == parity)).any() and ((mins == v) & (j % 2 == parity)).any()
    # the 12 bytes by llama.cpp's get_scale_min_k4, inverted: sub-blocks 0-3 in bytes 0-3 (scales) and 4-7 (mins),
    # sub-blocks 4-7 as low nibbles in bytes 8-11 and top 2 bits in bits 6-7 of bytes 0-7
    packed = torch.cat((scale[:, :4] | ((scale[:, 4:] >> 4) << 6), mins[:, :4] | ((mins[:, 4:] >> 4) << 6),
                        (scale[:, 4:] & 0x0F) | ((mins[:, 4:] & 0x0F) << 4)), dim=1)
    sc_file, mn_file = k4_scale_min(packed)
    assert torch.equal(sc_file, scale) and torch.equal(mn_file, mins)  # the file decoder reads them back
    blocks = torch.randint(0, 256, (nb, block_bytes), dtype=torch.uint8, generator=g)
    blocks[:, 0:4] = torch.tensor([0.01, 0.002], dtype=torch.float16).view(torch.uint8)
    blocks[:, 4:16] = packed
    n, k = 4, nb * 256 // 4  # 4 rows of 8 super-blocks
    raw = blocks.reshape(n, -1)
    p = pack(raw, qtype, n, k)
    assert p["sc"].shape == (n, k // 32) and p["mn"].shape == (n, k // 64)
    assert sum(a.numel() * a.element_size() for a in p.arrays.values()) == n * k // 256 * block_bytes
    s6, m6 = scale.reshape(n, -1), mins.reshape(n, -1)
    assert torch.equal(p["sc"], (s6 & 0x0F) | ((m6 & 0x0F) << 4))
    top = (s6 >> 4) | ((m6 >> 4) << 2)  # a nibble per sub-block
    assert torch.equal(p["mn"], top[:, 0::2] | (top[:, 1::2] << 4))
    assert torch.equal(torch.stack(planar_scale_min_ref(p["sc"], p["mn"])), torch.stack((s6, m6)))
    assert torch.equal(unpack(p), raw)


def test_repack_errors_name_the_tensor():
    with pytest.raises(DevstralError, match="blk.0.ffn_up.weight"):
        pack(torch.zeros(100, dtype=torch.uint8), QType.Q4_K, 2, 256, name="blk.0.ffn_up.weight")
    with pytest.raises(DevstralError, match="IQ4_XS"):
        pack(torch.zeros(136, dtype=torch.uint8), QType.IQ4_XS, 1, 256, name="t")


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q6_K, QType.IQ4_XS], ids=lambda t: t.name)
def test_cpu_keeps_the_file_blocks_and_the_exact_codecs(qtype):
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
    raw = quantize(w, qtype) if qtype != QType.IQ4_XS else _iq4_xs_blocks(40, 256)
    layer = QuantLinear(raw, qtype, 40, 256)
    assert not cuda_kernels(torch.device("cpu"))
    assert layer.weight_q.mode == "blocks" and torch.equal(layer.raw.reshape(-1), raw.reshape(-1))
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(2))
    ref = dequantize(raw, qtype, (40, 256))
    torch.testing.assert_close(layer(x), x @ ref.t(), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[3, 0], [39, 3]])
    assert torch.equal(GGUFWeight(raw, qtype, 40, 256).lookup(ids, torch.float32), ref[ids.reshape(-1)])


def _iq4_xs_blocks(n: int, k: int) -> torch.Tensor:
    # IQ4_XS has no quantizer here; random bytes with a finite fp16 scale are valid blocks
    raw = torch.randint(0, 256, (n * k // 256, 136), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    raw[:, 0:2] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    return raw.reshape(n, -1)


def test_loaded_gguf_gives_the_logits_transformers_computes(tmp_path):
    """Tied output head (it shares the embedding's store); the untied case is in test_gguf_interop."""
    transformers = pytest.importorskip("transformers")
    import devstral
    from devstral.formats.gguf import export_gguf
    from devstral.formats.gguf_model import QuantEmbedding
    from devstral.testing import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "ck", inner_vocab=500, dim=256, hidden_dim=512, n_layers=2, n_heads=4,
                              n_kv_heads=2, head_dim=64, tie_embeddings=True)
    export_gguf(ck, tmp_path / "m.gguf", "Q4_K_M")
    llm = devstral.load(tmp_path / "m.gguf", device="cpu", dtype="fp32", backend="torch")
    assert isinstance(llm.model.model.embed_tokens, QuantEmbedding)
    assert llm.model.lm_head.weight_q is llm.model.model.embed_tokens.weight_q  # one copy of the weight
    ids = [1, 5, 9, 300, 17, 42, 7, 7, 120]
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(llm.logits(ids), expected, rtol=1e-5, atol=1e-5)


def test_kernel_choice_follows_the_batch_size():
    kinds = [gguf_config.gguf_plan("Q4_K", m, 4096, 5120)[0] for m in (1, 2, 4, 8, 9, 16, 512, 513, 8192)]
    assert kinds == ["wide"] + ["idot"] * 3 + ["gemm"] * 3 + ["dequant"] * 2
    assert gguf_config.gguf_plan("Q5_K", 2, 4096, 5120)[0] == "gemv"  # no integer-dot kernel for Q5_K
    assert gguf_config.gguf_plan("Q6_K", 1, 4096, 5120)[0] == "idot"
    _, cfg = gguf_config.gguf_plan("Q4_K", 3, 4096, 5120)
    assert cfg["bm"] == 4
    # small N: K is split so that the few row tiles still fill the GPU
    _, small = gguf_config.gguf_plan("Q4_K", 1, 1024, 5120)
    _, big = gguf_config.gguf_plan("Q4_K", 1, 32768, 5120)
    assert small["split_k"] > big["split_k"] >= 1
    assert gguf_config.nf4_plan(1, 4096, 4096)[0] == "gemv" and gguf_config.nf4_plan(64, 4096, 4096)[0] == "dequant"
    assert gguf_config.fp8_plan(2, 4096, 4096)[0] == "gemv" and gguf_config.fp8_plan(64, 4096, 4096)[0] == "scaled_mm"


def test_measured_kinds_pick_the_path_by_the_next_measured_batch_size(use_table, monkeypatch):
    table = {"kinds": {"Q4_K": {"1": "gemv", "2": "idot", "4": "gemv", "8": "dequant_cublas", "64": "gemm"}}}
    dev = use_table(table)
    kinds = [gguf_config.gguf_plan("Q4_K", m, 4096, 5120, dev)[0] for m in (1, 2, 3, 5, 9, 64, 65)]
    assert kinds == ["gemv", "idot", "gemv", "dequant", "gemm", "gemm", "dequant"]
    monkeypatch.setenv("DEVSTRAL_GGUF_FLOAT_GEMV", "1")
    assert gguf_config.gguf_plan("Q4_K", 2, 4096, 5120, dev)[0] == "gemv"


def test_q5k_takes_the_streaming_int8_kinds_but_not_the_integer_dot_gemv(use_table, monkeypatch):
    """Q5_K has the streaming GEMV's int8-activation row dots (wide_i8 / wide_xq; the MoE expert kernels
    share them) but no gguf_idot.py kernel: a measured idot falls back to the float GEMV."""
    from devstral.kernels import moe_gemv

    table = {"kinds": {"Q5_K": {"1": "wide_xq", "2": "wide_i8", "4": "idot"}}}
    dev = use_table(table)
    kinds = [gguf_config.gguf_plan("Q5_K", m, 4096, 4096, dev)[0] for m in (1, 2, 4)]
    assert kinds == ["wide_xq", "wide_i8", "gemv"]
    assert moe_gemv.int8_allowed("Q5_K")
    monkeypatch.setenv("DEVSTRAL_GGUF_FLOAT_GEMV", "1")
    assert [gguf_config.gguf_plan("Q5_K", m, 4096, 4096, dev)[0] for m in (1, 2)] == ["wide", "wide"]
    assert not moe_gemv.int8_allowed("Q5_K")


def test_the_decode_sweep_table_picks_path_and_config_per_shape(use_table, monkeypatch):
    """benchmarks/gguf_gemv_sweep.py's "gguf_decode" entries: exact shape, the next measured M up (1, 2, 4,
    8), the config's row tile fitted to m; other shapes and M > 8 keep the other rules."""
    table = {"kinds": {"Q4_K": {"1": "gemv", "2": "gemv", "8": "gemv", "64": "gemm"}},
             "gguf_decode": {
                 "Q4_K|1|4096|5120": {"kind": "wide", "bn": 128, "ns": 8, "bm": 1, "split_k": 2, "num_warps": 4},
                 "Q4_K|4|4096|5120": {"kind": "idot", "bn": 32, "ns": 4, "bm": 4, "split_k": 4, "num_warps": 4},
                 "Q4_K|8|4096|5120": {"kind": "wide", "bn": 64, "ns": 8, "bm": 4, "split_k": 1, "num_warps": 8},
                 "Q4_K|1|1024|4096": {"kind": "wide_xq", "bn": 64, "ns": 16, "bm": 1, "split_k": 3, "num_warps": 4,
                                      "num_stages": 3}}}
    dev = use_table(table)
    plan = {m: gguf_config.gguf_plan("Q4_K", m, 4096, 5120, dev) for m in (1, 2, 3, 4, 5, 8, 9)}
    assert plan[1] == ("wide", {"bn": 128, "ns": 8, "bm": 1, "split_k": 2, "num_warps": 4})
    assert plan[2][0] == "gemv"  # no entry at 2: the measured kinds decide
    assert plan[3] == ("idot", {"bn": 32, "ns": 4, "bm": 4, "split_k": 4, "num_warps": 4})
    assert plan[5][0] == "wide" and plan[5][1]["bm"] == 4 and plan[8][1]["num_warps"] == 8
    assert plan[9][0] == "gemm"
    assert gguf_config.gguf_plan("Q4_K", 1, 1024, 5120, dev)[0] == "gemv"  # another shape
    assert gguf_config.gguf_plan("Q4_K", 1, 1024, 4096, dev) == (
        "wide_xq", {"bn": 64, "ns": 16, "bm": 1, "split_k": 3, "num_warps": 4, "num_stages": 3})
    monkeypatch.setenv("DEVSTRAL_GGUF_FLOAT_GEMV", "1")  # int8 activations refused: the float path
    kind, cfg = gguf_config.gguf_plan("Q4_K", 4, 4096, 5120, dev)
    assert kind == "wide" and cfg["bm"] == 4
    assert gguf_config.gguf_plan("Q4_K", 1, 1024, 4096, dev)[0] == "wide"


def test_a_tma_entry_is_taken_for_its_shape_only(use_table, monkeypatch):
    """A "wide_tma" decode entry (kernels/gguf_gemv_tma.py) is the plan at one row of its exact shape; as a
    measured kind for shapes without an entry it means its loop's streaming kind, wide_xq (TMA tiles are
    measured per shape); the float switch turns it into the float GEMV."""
    entry = {"kind": "wide_tma", "bn": 64, "ns": 16, "bm": 1, "split_k": 2, "num_warps": 4, "num_stages": 3}
    dev = use_table({"kinds": {"Q4_K": {"1": "wide_tma"}}, "gguf_decode": {"Q4_K|1|4096|5120": entry}})
    assert gguf_config.gguf_plan("Q4_K", 1, 4096, 5120, dev) == (
        "wide_tma", {key: v for key, v in entry.items() if key != "kind"})
    assert gguf_config.gguf_plan("Q4_K", 1, 1024, 5120, dev)[0] == "wide_xq"
    monkeypatch.setenv("DEVSTRAL_GGUF_FLOAT_GEMV", "1")
    assert gguf_config.gguf_plan("Q4_K", 1, 4096, 5120, dev)[0] == "wide"


def test_a_tuned_table_overrides_the_rules(tmp_path, monkeypatch):
    table = {"thresholds": {"Q4_K": {"gemv_max_m": 2, "gemm_max_m": 64}},
             "gguf_gemv": {"Q4_K|1|4096|5120": {"bn": 16, "ns": 4, "bm": 1, "split_k": 2, "num_warps": 8}}}
    (tmp_path / "t.json").write_text(__import__("json").dumps(table))
    monkeypatch.setenv("DEVSTRAL_KERNEL_TUNING", str(tmp_path / "t.json"))
    gguf_config.tuned_table.cache_clear()
    try:
        assert gguf_config.tuned_table("any")["thresholds"]["Q4_K"]["gemv_max_m"] == 2
    finally:
        gguf_config.tuned_table.cache_clear()


def test_a_gpu_without_its_own_table_takes_one_of_the_same_architecture_and_sm_count(tmp_path, monkeypatch):
    """An H100 SXM (sm_90, 132 SMs) runs the H200's table; a GPU of another capability or SM count runs the rules; a
    DEVSTRAL_KERNEL_TUNING file is used as given, never replaced by a sibling."""
    import json

    (tmp_path / "gpu_a.json").write_text(json.dumps({"device": "GPU A", "capability": [9, 0], "sms": 132,
                                                     "thresholds": {"Q4_K": {"gemv_max_m": 3}}}))
    (tmp_path / "gpu_b.json").write_text(json.dumps({"device": "GPU B", "thresholds": {}}))  # no capability: never
    monkeypatch.setattr(gguf_config, "TUNED_DIR", tmp_path)
    monkeypatch.delenv("DEVSTRAL_KERNEL_TUNING", raising=False)
    gguf_config.sibling_table.cache_clear()
    gguf_config.tuned_table.cache_clear()
    try:
        assert gguf_config.sibling_table((9, 0), 132)["device"] == "GPU A"
        assert gguf_config.sibling_table((9, 0), 114) == {}  # an H100 PCIe: other SM count
        assert gguf_config.sibling_table((8, 9), 128) == {}  # an Ada card
        monkeypatch.setattr(gguf_config, "device_name", lambda d: "GPU C")
        monkeypatch.setattr(gguf_config, "device_capability", lambda d: (9, 0))
        monkeypatch.setattr(gguf_config, "sm_count", lambda d: 132)
        assert gguf_config.table_for(torch.device("cuda", 0))["device"] == "GPU A"
        assert gguf_config.table_for(torch.device("cpu")) == {}
        (tmp_path / "mine.json").write_text(json.dumps({"device": "mine"}))
        monkeypatch.setenv("DEVSTRAL_KERNEL_TUNING", str(tmp_path / "mine.json"))
        gguf_config.sibling_table.cache_clear()
        gguf_config.tuned_table.cache_clear()
        assert gguf_config.table_for(torch.device("cuda", 0))["device"] == "mine"
        assert gguf_config.sibling_table((9, 0), 132) == {}
    finally:
        gguf_config.sibling_table.cache_clear()
        gguf_config.tuned_table.cache_clear()


def test_a_pipeline_too_deep_for_the_gpus_shared_memory_runs_shallower_and_is_remembered():
    """kernels/stage_fit.py: a launch refused for shared memory is retried one stage shallower (Triton refuses before
    enqueueing anything); the depth that fitted is used straight away next time; other refusals are raised."""
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    from devstral.kernels import stage_fit

    tried = []

    def run(stages, limit=2, what="shared memory"):
        tried.append(stages)
        if stages > limit:
            raise OutOfResources(stages * 80_000, limit * 80_000, what)

    assert stage_fit.launch(("test", 1), 4, run) == 2
    assert tried == [4, 3, 2]
    tried.clear()
    assert stage_fit.launch(("test", 1), 4, run) == 2
    assert tried == [2]
    with pytest.raises(OutOfResources):  # registers: not a depth question
        stage_fit.launch(("test", 2), 3, lambda s: run(s, what="registers"))
    with pytest.raises(OutOfResources):  # even one stage does not fit
        stage_fit.launch(("test", 3), 3, lambda s: run(s, limit=0))
