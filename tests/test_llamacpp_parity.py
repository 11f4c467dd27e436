"""The two backends on the same F32 GGUF agree: logits, greedy and seeded tokens, tool calls.

Oracles: the torch engine (itself checked against transformers elsewhere) and llama-cpp-python's own
high-level `Llama` (which checks how this backend drives llama.cpp's low-level API). Both Devstral
architectures: Small 1.x (mistral) and Small 2 (ministral3: YaRN and llama-4 query scaling).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from devstral.engine.sampling import SamplingParams
from test_llamacpp_harness import ASK, CALL, TEXT, TOOLS, f32_gguf, load, trained

llama_cpp = pytest.importorskip("llama_cpp")

ARCHS = ["mistral", "ministral3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_the_torch_engine_and_llama_cpp_python(arch):
    torch_llm, llama_llm = load(f32_gguf(arch), "torch"), load(f32_gguf(arch), "llama.cpp")
    assert type(llama_llm).__name__ == "LlamaCppLLM" and llama_llm.backend == "llama.cpp"
    ids = torch_llm.tokenizer.encode(TEXT * 3, bos=True)[:180]  # > 64: ministral3's YaRN is active
    ours = llama_llm.logits(ids)
    assert ours.shape == (len(ids), torch_llm.config.vocab_size) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), torch_llm.logits(ids).numpy(), atol=2e-5)
    # The same file through llama-cpp-python's own loop (fp32 cache, no flash attention, as ours).
    plain = llama_cpp.Llama(str(f32_gguf(arch)), n_ctx=256, n_threads=2, logits_all=True, verbose=False,
                            flash_attn=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    plain.eval(ids)
    np.testing.assert_allclose(ours.numpy(), np.asarray(plain.scores[:len(ids)]), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_and_seeded_tokens_agree_with_several_sequences_batched(arch):
    """Four prompts at once on each engine (one llama_decode per step for all of them on llama.cpp)."""
    torch_llm = load(f32_gguf(arch), "torch", parallel=4)
    llama_llm = load(f32_gguf(arch), "llama.cpp", parallel=4)
    ids = torch_llm.tokenizer.encode(TEXT * 2, bos=True)
    prompts = [ids[:10], ids[:23], ids[5:40], torch_llm.tokenizer.encode("def add(a, b):", bos=True)]
    # Seeded rows use Devstral's defaults (temperature 0.15, top-k 64, top-p 0.95, min-p 0.01). At high
    # temperatures a flat tail makes ~1e-6 logit differences reorder candidates, and sampling diverge.
    params = [SamplingParams(temperature=0, max_tokens=20), SamplingParams(seed=7, max_tokens=20),
              SamplingParams(temperature=0, max_tokens=20), SamplingParams(seed=11, max_tokens=20)]

    def run(llm) -> list[list[int]]:
        engine = llm.engine
        seqs = [engine.add(p, sp, sp.max_tokens, {llm.tokenizer.eos_id}) for p, sp in zip(prompts, params, strict=True)]
        while engine.has_work():
            engine.step()
        assert max(engine.stats.batch_sizes) == 4
        return [s.token_ids[s.num_prompt_tokens:] for s in seqs]

    got, expected = run(llama_llm), run(torch_llm)
    assert got == expected
    assert got[0] == ids[10:30]  # the trained text, continued


@pytest.mark.parametrize("arch", ARCHS)
def test_tool_calls_agree(arch):
    """The trained model answers with a tool call: both engines stream the same call, parsed by our parser."""
    calls = {}
    for backend in ("torch", "llama.cpp"):
        llm = load(f32_gguf(arch), backend)
        result = llm.chat(ASK, tools=TOOLS, sampling=SamplingParams(temperature=0, max_tokens=40))
        deltas = list(llm.stream_chat(ASK, tools=TOOLS, sampling=SamplingParams(temperature=0, max_tokens=40)))
        assert result.finish_reason == "tool_calls"
        streamed = "".join(d["delta"]["tool_calls"][0]["function"].get("arguments") or ""
                           for d in deltas if d["delta"].get("tool_calls"))
        assert json.loads(streamed) == CALL[1]
        calls[backend] = (result.token_ids, [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                             for c in result.message["tool_calls"]])
    assert calls["llama.cpp"] == calls["torch"]
    assert calls["llama.cpp"][1] == [CALL]


def test_the_torch_checkpoint_and_its_f32_gguf_on_llama_cpp_agree():
    """`devstral quantize --type F32` loses nothing: llama.cpp on the file computes the folder's logits."""
    ref = load(trained(), "torch")
    llama_llm = load(f32_gguf(), "llama.cpp")
    ids = ref.tokenizer.encode_chat(ASK, TOOLS)
    np.testing.assert_allclose(llama_llm.logits(ids).numpy(), ref.logits(ids).numpy(), atol=2e-5)
