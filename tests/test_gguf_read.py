"""GGUF reading: metadata -> ModelConfig, tensors against gguf-py's reader, split files, bad input."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstral.errors import DevstralError
from devstral.formats.gguf import GGUFFile, config_from_gguf, export_gguf
from devstral.formats.gguf_read import parse_header
from devstral.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf_read")
    ck = make_tiny_checkpoint(root / "ck", inner_vocab=500, dim=256, hidden_dim=256, n_layers=1, head_dim=64)
    # small K-quant tensors through --tensor-type keep this quick while covering many block types
    overrides = ["attn_q=q4_k", "attn_k=q5_k", "attn_v=q6_k", "ffn_up=q5_0", "ffn_down=q4_0"]
    return ck, export_gguf(ck, root / "m.gguf", "Q8_0", tensor_types=overrides)


def _writer_file(path: Path, arch: str, kv: dict, tensors: dict[str, np.ndarray] | None = None) -> Path:
    w = gguf.GGUFWriter(path, arch)
    for key, value in kv.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, arr in (tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_BASE = {"embedding_length": 64, "block_count": 2, "feed_forward_length": 128, "attention.head_count": 4,
         "attention.head_count_kv": 2, "context_length": 4096, "attention.layer_norm_rms_epsilon": 1e-5,
         "rope.freq_base": 1e6, "vocab_size": 1000}


def _md(arch: str, **extra) -> dict:
    md = {f"{arch}.{k}": v for k, v in _BASE.items()}
    md["general.architecture"] = arch
    md.update({f"{arch}.{k}": v for k, v in extra.items()})
    return md


def test_metadata_to_config_llama() -> None:
    cfg = config_from_gguf(_md("llama", **{"attention.key_length": 32}), source="x.gguf")
    assert (cfg.arch, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim) == \
        ("mistral", 64, 2, 4, 2, 32, 128)
    assert cfg.rope_theta == 1e6 and cfg.max_position_embeddings == 4096 and cfg.yarn is None


def test_metadata_to_config_mistral3_yarn_and_llama4_temperature() -> None:
    md = _md("mistral3", **{"rope.scaling.type": "yarn", "rope.scaling.factor": 16.0,
                            "rope.scaling.original_context_length": 16384, "rope.scaling.yarn_beta_fast": 32.0,
                            "rope.scaling.yarn_beta_slow": 1.0, "rope.scaling.yarn_log_multiplier": 1.0,
                            "attention.temperature_scale": 0.1})
    cfg = config_from_gguf(md, source="x.gguf")
    assert cfg.arch == "ministral3" and cfg.llama4_beta == pytest.approx(0.1)
    # llama.cpp takes the temperature length from the YaRN original context
    assert cfg.llama4_original_max == 16384
    assert cfg.yarn.factor == 16.0 and cfg.yarn.original_max_position_embeddings == 16384
    # a non-zero log multiplier (mscale == mscale_all_dim) cancels YaRN's magnitude scaling
    assert cfg.yarn.resolved_attention_factor() == pytest.approx(1.0)
    md[("mistral3.rope.scaling.yarn_log_multiplier")] = 0.0
    assert config_from_gguf(md, source="x").yarn.resolved_attention_factor() == pytest.approx(
        0.1 * np.log(16.0) + 1.0)


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(DevstralError, match=r"x\.gguf: unknown architecture 'qwen2'"):
        config_from_gguf(_md("qwen2"), source="x.gguf")


def test_missing_key_is_named() -> None:
    md = _md("llama")
    del md["llama.block_count"]
    with pytest.raises(DevstralError, match="llama.block_count"):
        config_from_gguf(md, source="x.gguf")


def test_tensors_match_gguf_py_reader(tiny_gguf) -> None:
    _, path = tiny_gguf
    ours = GGUFFile(path)
    ref = gguf.GGUFReader(path)
    assert ours.tensor_names == [t.name for t in ref.tensors]
    assert ours.metadata["general.architecture"] == "llama"
    assert ours.metadata["tokenizer.ggml.model"] == "gpt2"
    types = set()
    for t in ref.tensors:
        expected = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        got = ours.tensor(t.name)
        types.add(t.tensor_type.name)
        assert tuple(got.shape) == tuple(int(d) for d in reversed(t.shape.tolist()))
        np.testing.assert_array_equal(got.numpy(), expected.reshape(got.shape))
    assert {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q4_0", "Q8_0", "F32"} <= types


def test_split_files_read_as_one(tmp_path) -> None:
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((4, 32)).astype(np.float32) for i in range(3)}
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama", split_max_tensors=1)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) == 3
    for start in (parts[0], parts[2], tmp_path):  # any part, or the folder, opens the whole model
        g = GGUFFile(start)
        assert sorted(g.tensor_names) == sorted(tensors)
        for name, arr in tensors.items():
            np.testing.assert_array_equal(g.tensor(name).numpy(), arr)
    parts[1].unlink()
    with pytest.raises(DevstralError, match="split part m-00002-of-00003.gguf is missing"):
        GGUFFile(parts[0])


# ---------------------------------------------------------------- bad input

def _small_file(tmp_path: Path) -> Path:
    return _writer_file(tmp_path / "s.gguf", "llama", {"general.name": "x"},
                        {"w": np.arange(64, dtype=np.float32).reshape(2, 32)})


def test_wrong_magic(tmp_path) -> None:
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(DevstralError, match=r"bad\.gguf: not a GGUF file \(wrong magic"):
        GGUFFile(p)


def test_unsupported_version(tmp_path) -> None:
    p = _small_file(tmp_path)
    data = bytearray(p.read_bytes())
    data[4:8] = struct.pack("<I", 7)
    p.write_bytes(bytes(data))
    with pytest.raises(DevstralError, match="unsupported GGUF version 7 at offset 4"):
        GGUFFile(p)


def test_truncated_file_names_offset(tmp_path) -> None:
    p = _small_file(tmp_path)
    data = p.read_bytes()
    for cut in (30, 60, len(data) - 100):
        (tmp_path / "t.gguf").write_bytes(data[:cut])
        with pytest.raises(DevstralError, match=r"t\.gguf: (corrupt or truncated GGUF at offset \d+|tensor w)"):
            GGUFFile(tmp_path / "t.gguf")


def test_lying_counts_fail_fast_without_allocating(tmp_path) -> None:
    p = _small_file(tmp_path)
    data = bytearray(p.read_bytes())
    data[16:24] = struct.pack("<Q", 2**62)  # metadata count
    p.write_bytes(bytes(data))
    with pytest.raises(DevstralError, match="metadata entries, more than the file can hold"):
        GGUFFile(p)
    data[16:24] = struct.pack("<Q", 2)
    data[8:16] = struct.pack("<Q", 2**40)  # tensor count
    p.write_bytes(bytes(data))
    with pytest.raises(DevstralError, match="tensors, more than the file can hold"):
        GGUFFile(p)


def test_huge_string_length_is_rejected(tmp_path) -> None:
    p = _small_file(tmp_path)
    data = bytearray(p.read_bytes())
    data[24:32] = struct.pack("<Q", 2**60)  # length of the first key
    p.write_bytes(bytes(data))
    with pytest.raises(DevstralError, match=r"offset 24: length of metadata key #0|offset 32: metadata key #0"):
        GGUFFile(p)


def test_tensor_size_disagreeing_with_type_and_shape(tmp_path) -> None:
    p = _small_file(tmp_path)
    h = parse_header(p)
    info = h.tensors[0]
    data = bytearray(p.read_bytes())
    # the dims of tensor "w" sit right after its name; claim 2x64 floats instead of 2x32
    name_at = bytes(data).index(b"\x01\x00\x00\x00\x00\x00\x00\x00w")
    dims_at = name_at + 9 + 4
    data[dims_at:dims_at + 8] = struct.pack("<Q", 64)
    p.write_bytes(bytes(data))
    with pytest.raises(DevstralError, match=r"tensor w: F32 \[2, 64\] needs 512 bytes"):
        GGUFFile(p)
    assert info.nbytes == 256


def test_unknown_tensor_type(tmp_path) -> None:
    p = _small_file(tmp_path)
    data = bytearray(p.read_bytes())
    name_at = bytes(data).index(b"\x01\x00\x00\x00\x00\x00\x00\x00w")
    type_at = name_at + 9 + 4 + 16
    data[type_at:type_at + 4] = struct.pack("<I", 99)
    p.write_bytes(bytes(data))
    with pytest.raises(DevstralError, match="tensor w has unknown GGML type 99"):
        GGUFFile(p)


def test_load_rejects_unknown_architecture(tmp_path) -> None:
    from devstral.formats.gguf import load_gguf_model

    p = _writer_file(tmp_path / "q.gguf", "qwen2", {}, {"token_embd.weight": np.zeros((8, 32), np.float32)})
    with pytest.raises(DevstralError, match=r"q\.gguf: unknown architecture 'qwen2'"):
        load_gguf_model(p)


# CI runs 150 cases; DEVSTRAL_FUZZ_EXAMPLES=20000 (under `ulimit -v`) is the few-minutes run.
@settings(max_examples=int(os.environ.get("DEVSTRAL_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_headers_give_clean_errors(tmp_path, data) -> None:
    """Random corruption of a real header: parse, or raise DevstralError; nothing else, never hang."""
    base = _fuzz_base(tmp_path)
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, min(len(buf), 400) - 1))
        buf[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[:data.draw(st.integers(0, len(buf)))]
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(bytes(buf))
    try:
        g = GGUFFile(p)
        for name in g.tensor_names:
            g.tensor(name)
    except DevstralError:
        pass


_FUZZ_CACHE: dict[str, bytes] = {}


def _fuzz_base(tmp_path: Path) -> bytes:
    if "base" not in _FUZZ_CACHE:
        w = gguf.GGUFWriter(tmp_path / "base.gguf", "llama")
        w.add_uint32("llama.block_count", 2)
        w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
        w.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
        w.add_tensor("w", np.ones((2, 32), np.float32))
        q = gguf.quants.quantize(np.ones((2, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("q", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        _FUZZ_CACHE["base"] = (tmp_path / "base.gguf").read_bytes()
    return _FUZZ_CACHE["base"]


def test_round_trip_f32_is_exact(tmp_path) -> None:
    """Export to F32 and load back: every weight equals the checkpoint's (q/k permutation undone)."""
    from safetensors.torch import load_file

    from devstral.formats.gguf import load_gguf_model

    ck = make_tiny_checkpoint(tmp_path / "ck", arch="ministral3", inner_vocab=300, wrap_mistral3=True)
    net, cfg, _ = load_gguf_model(export_gguf(ck, tmp_path / "f32.gguf", "F32"))
    assert cfg.arch == "ministral3" and cfg.yarn is not None and cfg.llama4_beta == pytest.approx(0.1)
    assert cfg.llama4_original_max == 64 and cfg.yarn.resolved_attention_factor() == pytest.approx(1.0)
    plain = make_tiny_checkpoint(tmp_path / "plain", inner_vocab=300, seed=1)
    # Mistral's native layout (interleaved q/k rows) exports to the same file as the HF layout
    native = make_tiny_checkpoint(tmp_path / "native", layout="mistral", inner_vocab=300, seed=1)
    a = GGUFFile(export_gguf(plain, tmp_path / "a.gguf", "F32"))
    b = GGUFFile(export_gguf(native, tmp_path / "b.gguf", "F32"))
    for name in a.tensor_names:
        torch.testing.assert_close(a.tensor(name), b.tensor(name), rtol=0, atol=0, msg=name)
    for folder, out in ((ck, tmp_path / "f32.gguf"), (plain, tmp_path / "a.gguf")):
        net, _, _ = load_gguf_model(out)
        ours = net.state_dict()
        for name, t in load_file(folder / "model.safetensors").items():
            name = name.replace("model.language_model.", "model.")
            if "vision_tower" not in name and "multi_modal_projector" not in name:
                torch.testing.assert_close(ours[name], t, rtol=0, atol=0, msg=name)
