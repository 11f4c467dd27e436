"""Fill-in-the-middle prompts against mistral-common's `encode_fim` (the reference encoder), and the
min_tokens constraint against the model's own logits."""

from __future__ import annotations

import pytest
import torch

from devstral.engine.sampling import SamplingParams
from devstral.engine.token_masks import min_tokens
from devstral.formats.gguf_tokenizer import GGUFTokenizer
from devstral.formats.gguf_vocab import spm_vocab, tekken_vocab
from devstral.prompt.fim import encode_fim, infill_ids, supports_fim
from devstral.prompt.tokenizer import MistralCommonTokenizer
from devstral.testing import mistral_common_data, write_tekken

CASES = [
    ("def add(a, b):\n    ", "\n    return c\n"),
    ("x = [1, 2, ", "]\nprint(x)"),
    ("# [PREFIX] and [SUFFIX] typed in code stay text\nname = '", "'  # [MIDDLE] </s>"),
    ("Ünïcödé 日本語 ", " 🙂"),
    ("only a prefix", None),
    ("empty suffix", ""),
    ("", "a suffix after an empty prefix"),
]


def _gguf(vocab) -> GGUFTokenizer:
    md = {"tokenizer.ggml.model": vocab.model, "tokenizer.ggml.tokens": vocab.tokens,
          "tokenizer.ggml.token_type": vocab.token_types, "tokenizer.ggml.bos_token_id": vocab.bos_id,
          "tokenizer.ggml.eos_token_id": vocab.eos_id}
    if vocab.pre:
        md["tokenizer.ggml.pre"] = vocab.pre
    if vocab.merges:
        md["tokenizer.ggml.merges"] = vocab.merges
    if vocab.scores is not None:
        md["tokenizer.ggml.scores"] = vocab.scores
    return GGUFTokenizer(md, source="test")


@pytest.fixture(scope="module", params=["tiny-tekken", "tekken_240911", "spm-v7"])
def tokenizer_file(request, tmp_path_factory):
    if request.param == "tiny-tekken":
        path = tmp_path_factory.mktemp("fim") / "tekken.json"
        write_tekken(path, version="v13")
        return path
    if request.param == "tekken_240911":
        return mistral_common_data() / "tekken_240911.json"
    return mistral_common_data() / "mistral_instruct_tokenizer_241114.model.v7"


def _reference(path, prefix: str, suffix: str | None) -> list[int]:
    from mistral_common.protocol.fim.request import FIMRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(path)).encode_fim(FIMRequest(prompt=prefix, suffix=suffix)).tokens


def test_fim_ids_equal_mistral_common_encode_fim(tokenizer_file):
    ours = MistralCommonTokenizer(tokenizer_file)
    for prefix, suffix in CASES:
        assert encode_fim(ours, prefix, suffix) == _reference(tokenizer_file, prefix, suffix), (prefix, suffix)


def test_gguf_tokenizer_builds_the_same_fim_ids(tokenizer_file):
    """A GGUF file has no mistral-common: its own [SUFFIX]/[PREFIX] ids must give the same prompt."""
    if tokenizer_file.name == "tekken_240911.json":
        pytest.skip("this early tekken file names no special tokens, so its GGUF vocab has none to find")
    vocab = spm_vocab(tokenizer_file) if tokenizer_file.suffix.startswith(".v") else tekken_vocab(tokenizer_file)
    ours = _gguf(vocab)
    assert supports_fim(ours)
    for prefix, suffix in CASES:
        assert encode_fim(ours, prefix, suffix) == _reference(tokenizer_file, prefix, suffix), (prefix, suffix)


def test_typed_control_strings_stay_text(tmp_path):
    write_tekken(tmp_path / "tekken.json")
    tok = MistralCommonTokenizer(tmp_path / "tekken.json")
    ids = encode_fim(tok, "a[PREFIX]b[SUFFIX]c", "[MIDDLE]")
    controls = [i for i in ids if tok.is_special(i)]
    assert controls == [tok.bos_id, tok.special_id("[SUFFIX]"), tok.special_id("[PREFIX]")]


def test_infill_extra_files_come_first_and_truncation_keeps_the_cursor(tmp_path):
    write_tekken(tmp_path / "tekken.json")
    tok = MistralCommonTokenizer(tmp_path / "tekken.json")
    extra = [("utils.py", "def helper():\n    return 1\n")]
    whole = infill_ids(tok, "x = helper(", ")\n", extra=extra)
    assert not whole.truncated
    assert whole.ids == _reference(tmp_path / "tekken.json", "utils.py\ndef helper():\n    return 1\n\nx = helper(",
                                   ")\n")
    prefix, suffix = "".join(f"line_{i} = {i}\n" for i in range(200)), "".join(f"tail_{i}()\n" for i in range(200))
    cut = infill_ids(tok, prefix, suffix, extra=extra, budget=120)
    assert cut.truncated and len(cut.ids) == 120
    full = infill_ids(tok, prefix, suffix, extra=extra)
    p = tok.special_id("[PREFIX]")
    full_suffix, full_prefix = full.ids[2:full.ids.index(p)], full.ids[full.ids.index(p) + 1:]
    cut_suffix, cut_prefix = cut.ids[2:cut.ids.index(p)], cut.ids[cut.ids.index(p) + 1:]
    assert full_suffix[:len(cut_suffix)] == cut_suffix  # the suffix keeps its start (next to the cursor)
    assert full_prefix[-len(cut_prefix):] == cut_prefix  # the prefix keeps its end
    assert len(cut_suffix) >= (120 - 3) // 4
    assert tok.decode(cut_prefix).endswith("line_199 = 199\n")


def test_min_tokens_masks_the_stop_tokens_until_reached(tiny_hf):
    import devstral

    llm = devstral.load(str(tiny_hf), max_context=128)
    ids = llm.encode_prompt("def f(x):")
    greedy = int(llm.logits(ids)[-1].argmax())
    # Make the greedy token a stop token: without min_tokens the answer is empty.
    plain = llm.generate(ids, SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[greedy]))
    assert plain.token_ids == [greedy] and plain.text == ""
    stops = [llm.tokenizer.eos_id, greedy]
    held = llm.generate(ids, SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[greedy],
                                            constraint=min_tokens(llm.config.vocab_size, stops, 3)))
    logits = llm.logits(ids)[-1].clone()
    logits[stops] = -torch.inf
    assert held.token_ids[0] == int(logits.argmax())  # the best token that is not a stop token
    assert len(held.token_ids) >= 3 and not set(held.token_ids[:3]) & set(stops)
