"""SentencePiece tokenizers (Mistral 7B v0.3, Codestral 22B: `tokenizer.model.v3`) in chat: the text the
chat path decodes (control tokens kept) is mistral-common's own text, never raw pieces ("▁", "<0x0A>"),
and tool calls encoded by mistral-common parse back."""

from __future__ import annotations

import json
import shutil

import pytest

from devstral.engine.detokenize import StreamDecoder
from devstral.prompt.chat import encode_for_training
from devstral.prompt.tokenizer import MistralCommonTokenizer
from devstral.prompt.tool_calls import ToolCallStream, parse_tool_calls
from devstral.testing import mistral_common_data

SPM = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
       "v3": "mistral_instruct_tokenizer_240323.model.v3", "v7": "mistral_instruct_tokenizer_241114.model.v7"}
CONTENTS = [
    "Hello world",
    "def f(x):\n    return x  # two\n\n\tand a tab",
    "  leading spaces, trailing space ",
    "Accents: café, naïve, Ærø; CJK: 你好; emoji: 😀🚀 (byte-fallback pieces)",
    "Control-looking text: [INST] <s> </s> ▁ <0x0A>",
]
CALLS = [
    {"id": "a1b2c3d4e", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "src/é.py"}'}},
    {"id": "Z9y8X7w6v", "type": "function",
     "function": {"name": "bash", "arguments": '{"cmd": "ls -la\\n  | grep x", "timeout": 30}'}},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    out = {}
    for version, name in SPM.items():
        shutil.copy(mistral_common_data() / name, folder / f"tokenizer.model.{version}")
        out[version] = MistralCommonTokenizer(folder / f"tokenizer.model.{version}")
    return out


def _assistant_ids(tok, message) -> list[int]:
    """The ids mistral-common encodes for an assistant turn (what the model is trained to emit), EOS cut."""
    ids, mask = encode_for_training(tok, [{"role": "user", "content": "go"}, {"role": "assistant", **message}])
    learned = [t for t, m in zip(ids, mask, strict=True) if m]
    assert learned[-1] == tok.eos_id
    return learned[:-1]


def _streamed(tok, ids) -> str:
    decoder = StreamDecoder(tok, special=True, context=[tok.bos_id])
    return "".join(decoder.push(t) for t in ids) + decoder.flush()


@pytest.mark.parametrize("version", list(SPM))
@pytest.mark.parametrize("content", CONTENTS)
def test_chat_text_is_mistral_commons_text(tokenizers, version, content):
    tok = tokenizers[version]
    ids = _assistant_ids(tok, {"content": content})
    reference = tok.mistral.instruct_tokenizer.tokenizer.decode(ids)  # mistral-common, control tokens dropped
    assert tok.decode(ids, special=True) == reference
    assert _streamed(tok, ids) == reference
    if "▁" not in content and "<0x" not in content:
        assert "▁" not in reference and "<0x" not in reference
        assert reference.strip() == content.strip()  # mistral-common trims the turn's outer whitespace


@pytest.mark.parametrize("version", ["v2", "v3", "v7"])
@pytest.mark.parametrize("n_calls", [1, 2])
def test_tool_calls_mistral_common_encodes_parse_back(tokenizers, version, n_calls):
    tok = tokenizers[version]
    calls = CALLS[:n_calls]
    ids = _assistant_ids(tok, {"content": None, "tool_calls": calls})
    assert tok.special_id("[TOOL_CALLS]") in ids
    for text in (tok.decode(ids, special=True), _streamed(tok, ids)):
        assert "▁" not in text and "<0x" not in text, text
        content, got = parse_tool_calls(text, version)
        assert content == ""
        assert [c["function"]["name"] for c in got] == [c["function"]["name"] for c in calls]
        assert [json.loads(c["function"]["arguments"]) for c in got] == \
            [json.loads(c["function"]["arguments"]) for c in calls]
        if version != "v2":  # v2 does not encode call ids
            assert [c["id"] for c in got] == [c["id"] for c in calls]
        assert not any(c.get("malformed") for c in got)
    # token by token through the incremental parser, as a server streams it
    stream = ToolCallStream(version)
    decoder = StreamDecoder(tok, special=True, context=[tok.bos_id])
    for t in ids:
        stream.feed(decoder.push(t))
    stream.feed(decoder.flush())
    stream.finish()
    assert [c["function"]["name"] for c in stream.result()[1]] == [c["function"]["name"] for c in calls]


def test_run_on_a_sentencepiece_model_prints_no_pieces(tmp_path, capsys):
    """End to end: `devstral run` (chat path, control tokens kept for the tool-call parser) on a v3 model."""
    from devstral.cli import main
    from devstral.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "m", tokenizer="spm", tokenizer_version="v3")
    assert main(["run", "Say hello", "--model", str(ckpt), "-n", "40", "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = MistralCommonTokenizer(ckpt / "tokenizer.model.v3")
    ids = [t for t in out["token_ids"] if t != tok.eos_id]
    assert "▁" not in out["text"] and "<0x" not in out["text"]
    if not any(tok.is_special(t) for t in ids):  # then the answer is exactly mistral-common's decoding
        assert out["text"] == tok.mistral.instruct_tokenizer.tokenizer.decode(ids)
