"""Generation: greedy parity with transformers, seeds, stops, KV-cache dtypes, streaming text."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devstral
from devstral.cli import main
from devstral.engine.detokenize import StreamDecoder
from devstral.prompt.tokenizer import load_tokenizer
from devstral.textstream import held_suffix_len, split_on_stop

transformers = pytest.importorskip("transformers")


def test_greedy_cli_raw_equals_transformers_generate(tiny_hf, capsys):
    prompt = "def fibonacci(n):"
    assert main(["run", prompt, "--model", str(tiny_hf), "--raw", "--temperature", "0", "--max-tokens", "24",
                 "--json", "--dtype", "fp32"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf, torch_dtype=torch.float32).eval()
    ids = torch.tensor([out["prompt_token_ids"]])
    gen = ref.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=11)
    expected = gen[0, ids.shape[1]:].tolist()
    assert out["token_ids"] == expected
    assert out["prompt_token_ids"][0] == 1 and out["prompt_token_ids"].count(1) == 1
    assert out["usage"] == {"prompt_tokens": len(out["prompt_token_ids"]), "completion_tokens": 24}
    assert out["finish_reason"] == "length" and out["timings"]["decode_tok_s"] > 0


def test_raw_prompt_with_typed_bos_gets_one_bos(tiny_hf):
    llm = devstral.load(tiny_hf)
    assert llm.encode_prompt("<s>hello") == llm.encode_prompt("hello")
    assert llm.encode_prompt("hello")[0] == llm.tokenizer.bos_id


def test_seeded_sampling_is_reproducible(tiny_hf):
    llm = devstral.load(tiny_hf)
    p = devstral.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234, max_tokens=30)
    a, b = llm.generate("Once upon", p), llm.generate("Once upon", p)
    c = llm.generate("Once upon", p.updated(seed=99))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_max_tokens_and_stop_strings(tiny_hf):
    llm = devstral.load(tiny_hf)
    greedy = devstral.SamplingParams(temperature=0, max_tokens=40)
    full = llm.generate("The answer is", greedy)
    assert len(full.token_ids) == 40 and full.finish_reason == "length"
    text = full.text
    stop = text[10:14]
    cut = llm.generate("The answer is", greedy.updated(stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.find(stop)]
    # streaming pieces never contain the stop string either
    pieces = [s.text for s in llm.stream("The answer is", greedy.updated(stop=[stop]))]
    assert "".join(pieces) == cut.text


def test_stop_token_ids(tiny_hf):
    llm = devstral.load(tiny_hf)
    greedy = devstral.SamplingParams(temperature=0, max_tokens=20)
    full = llm.generate("abc", greedy)
    target = full.token_ids[5]
    cut = llm.generate("abc", greedy.updated(stop_token_ids=[target]))
    assert cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[: full.token_ids.index(target) + 1]


def test_context_overflow_is_a_clear_error(tiny_hf):
    llm = devstral.load(tiny_hf, max_context=16)
    with pytest.raises(devstral.DevstralError, match=r"prompt has \d+ tokens.*context size of 16"):
        llm.generate("word " * 40)


def test_unknown_kv_cache_dtype(tiny_hf):
    with pytest.raises(devstral.DevstralError, match="kv-cache-dtype"):
        devstral.load(tiny_hf, kv_cache_dtype="q3")


@pytest.fixture(scope="module")
def tekken(tiny_hf):
    return load_tokenizer(tiny_hf)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("aé€😀 \n日本語ab\u0301") + ["ä", "𝔘"]), min_size=1, max_size=40))
def test_stream_decoder_concatenation_equals_full_decode(tekken, text):
    ids = tekken.encode(text)
    dec = StreamDecoder(tekken)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tekken.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_stream_decoder_holds_back_split_utf8_bytes(tekken):
    # "😀" is four bytes; a byte-level tekken vocab of 3096 ranks has no merge for it.
    ids = tekken.encode("😀")
    assert len(ids) > 1
    dec = StreamDecoder(tekken)
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.push(ids[-1]) == "😀"


def test_stop_helpers():
    assert split_on_stop("hello world", ["wor", "lo"]) == ("hel", True)
    assert split_on_stop("hello", ["xyz"]) == ("hello", False)
    assert held_suffix_len("abc</", ["</s>"]) == 2
    assert held_suffix_len("abc", ["</s>"]) == 0
