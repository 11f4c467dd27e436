"""Choosing the backend, the AMX build guard, `quantize --type F32`, and the CLI on both backends."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file

from devstral.cli import main
from devstral.engine.backend import choose_backend
from devstral.engine.llamacpp_model import amx_problem, linux_cpu_flags
from devstral.errors import DevstralError
from test_llamacpp_harness import TEXT, f32_gguf, trained

llama_cpp = pytest.importorskip("llama_cpp")

# llama.cpp's feature line, as a native build on an AMX CPU prints it and as the README's build does
NATIVE_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 1 | AMX_INT8 = 1 | "
               "LLAMAFILE = 1 | REPACK = 1 |")
PORTABLE_INFO = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | LLAMAFILE = 1 | REPACK = 1 |"


def test_auto_is_llama_cpp_for_a_gguf_without_cuda_and_torch_otherwise():
    assert choose_backend("auto", gguf=True, device="auto", adapter=False, cuda=False) == "llama.cpp"
    assert choose_backend("auto", gguf=True, device="cpu", adapter=False, cuda=True) == "llama.cpp"
    assert choose_backend("auto", gguf=True, device="auto", adapter=False, cuda=True) == "torch"
    assert choose_backend("auto", gguf=True, device="cuda", adapter=False, cuda=True) == "torch"
    assert choose_backend("auto", gguf=False, device="cpu", adapter=False, cuda=False) == "torch"
    assert choose_backend("auto", gguf=True, device="cpu", adapter=True, cuda=False) == "torch"
    assert choose_backend("torch", gguf=True, device="cpu", adapter=False, cuda=False) == "torch"
    assert choose_backend("llama.cpp", gguf=True, device="cpu", adapter=False, cuda=True) == "llama.cpp"
    with pytest.raises(DevstralError, match=r"--backend: unknown value 'vllm' \(choose auto, torch or llama.cpp\)"):
        choose_backend("vllm", gguf=True, device="cpu", adapter=False)


def test_auto_falls_back_to_torch_when_llama_cpp_is_missing_or_unsafe(monkeypatch, capsys):
    import devstral.engine.llamacpp_model as lm

    monkeypatch.setattr(lm, "llama_cpp_unavailable", lambda: "the llama.cpp backend needs llama-cpp-python (x)")
    assert choose_backend("auto", gguf=True, device="cpu", adapter=False, cuda=False) == "torch"
    assert capsys.readouterr().err == ""  # not installed: nothing to say
    monkeypatch.setattr(lm, "llama_cpp_unavailable", lambda: amx_problem(NATIVE_INFO, {"avx2"}))
    assert choose_backend("auto", gguf=True, device="cpu", adapter=False, cuda=False) == "torch"
    assert "rebuild it" in capsys.readouterr().err


def test_a_build_with_amx_kernels_is_refused_only_where_the_kernel_has_not_enabled_amx(tmp_path):
    problem = amx_problem(NATIVE_INFO, {"avx2", "avx512f", "avx512_vnni"})
    assert problem and "SIGILL" in problem and "-DGGML_NATIVE=OFF" in problem and "-DGGML_AMX_INT8=OFF" in problem
    assert amx_problem(NATIVE_INFO, {"avx2", "amx_tile", "amx_int8"}) is None  # the kernel enabled AMX
    assert amx_problem(PORTABLE_INFO, {"avx2"}) is None
    assert amx_problem(NATIVE_INFO, None) is None  # no /proc/cpuinfo (macOS): nothing to check
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\nbugs\t\t: spectre\n")
    assert linux_cpu_flags(cpuinfo) == {"fpu", "sse", "avx2", "avx512f"}
    assert linux_cpu_flags(tmp_path / "missing") is None
    # ... and the build under test is one the guard lets through here
    assert amx_problem(llama_cpp.llama_print_system_info().decode(), linux_cpu_flags()) is None


def test_quantize_type_f32_writes_every_weight_exactly(tmp_path, capsys):
    out = tmp_path / "f32.gguf"
    assert main(["quantize", str(trained()), str(out), "--type", "F32", "--no-progress"]) in (0, None)
    reader = gguf.GGUFReader(out)  # gguf-py, the format's reference reader
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert int(reader.fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.ALL_F32
    weights = load_file(trained() / "model.safetensors")
    by_name = {t.name: np.asarray(t.data) for t in reader.tensors}
    # tensors without llama.cpp's q/k row permutation are the checkpoint's, bit for bit
    np.testing.assert_array_equal(by_name["blk.1.ffn_down.weight"], weights["model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(by_name["token_embd.weight"], weights["model.embed_tokens.weight"])
    q = weights["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert sorted(by_name["blk.0.attn_q.weight"].ravel()) == sorted(q.ravel())  # same values, rows reordered


def run_json(capsys, *args) -> dict:
    assert main(["run", "--json", "--raw", "--temperature", "0", "-n", "12", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_run_prints_the_same_tokens_on_both_backends(capsys):
    prompt = TEXT[:50]
    on_llama = run_json(capsys, prompt, "--model", str(f32_gguf()), "--backend", "llama.cpp", "--kv-cache-dtype", "fp32")
    on_torch = run_json(capsys, prompt, "--model", str(f32_gguf()), "--backend", "torch", "--kv-cache-dtype", "fp32")
    assert on_llama["token_ids"] == on_torch["token_ids"] and len(on_llama["token_ids"]) == 12
    assert on_llama["text"] == on_torch["text"] and on_llama["timings"]["decode_tok_s"] > 0


def test_cli_backend_errors_are_one_line_exit_2(capsys):
    assert main(["run", "x", "--model", str(trained()), "--backend", "llama.cpp"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--backend llama.cpp runs .gguf files" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["run", "x", "--model", str(f32_gguf()), "--backend", "llamacpp"]) == 2
    assert "--backend: unknown value 'llamacpp'" in capsys.readouterr().err
