"""An assistant message with both content and tool_calls, checked against mistral-common itself: v2/v3
tokenizers (Mistral 7B v0.3, Codestral, Nemo's tekken v3) refuse it, so we send what they accept (the calls,
which are what the following tool results answer); v7+ encode both, exactly as mistral-common does."""

from __future__ import annotations

import shutil

import pytest

from devstral.prompt.chat import encode_chat, encode_for_training
from devstral.prompt.tokenizer import MistralCommonTokenizer
from devstral.testing import mistral_common_data, write_tekken

CALL = {"id": "abcDEF123", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}
TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]
BOTH = {"role": "assistant", "content": "Let me read it.", "tool_calls": [CALL]}
CALLS_ONLY = {"role": "assistant", "content": None, "tool_calls": [CALL]}
SERVING = [{"role": "user", "content": "read a.py"}, BOTH,
           {"role": "tool", "tool_call_id": CALL["id"], "name": "read_file", "content": "print(1)"}]
TRAINING = [*SERVING, {"role": "assistant", "content": "It prints 1."}]

KINDS = {("spm", "v2"): "mistral_instruct_tokenizer_240216.model.v2",
         ("spm", "v3"): "mistral_instruct_tokenizer_240323.model.v3",
         ("spm", "v7"): "mistral_instruct_tokenizer_241114.model.v7",
         ("tekken", "v3"): None, ("tekken", "v7"): None, ("tekken", "v13"): None}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("both")
    out = {}
    for (kind, version), name in KINDS.items():
        if kind == "spm":
            path = folder / f"tokenizer.model.{version}"
            shutil.copy(mistral_common_data() / name, path)
        else:
            path = folder / f"tekken_{version}.json"
            write_tekken(path, version=version, inner_vocab=1200)
        out[(kind, version)] = MistralCommonTokenizer(path)
    return out


def _reference(tok, messages, *, training: bool):
    """mistral-common's own encoding (a tokenizer loaded apart from ours), or the exception it raises."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mode = ValidationMode.finetuning if training else ValidationMode.serving
    ref = MistralTokenizer.from_file(str(tok.path), mode=mode)
    request = ChatCompletionRequest.from_openai(messages, tools=TOOLS, model="reference")
    return ref.encode_chat_completion(request).tokens


@pytest.mark.parametrize("kind", list(KINDS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_encodes_what_mistral_common_accepts(tokenizers, kind):
    tok = tokenizers[kind]
    old = kind[1] in ("v2", "v3")
    for training, messages in ((False, SERVING), (True, TRAINING)):
        if old:
            with pytest.raises(Exception, match="content or tool_calls, but not both"):
                _reference(tok, messages, training=training)  # what mistral-common refuses, we never send
            allowed = [CALLS_ONLY if m is BOTH else m for m in messages]
            expected = _reference(tok, allowed, training=training)
        else:
            expected = _reference(tok, messages, training=training)
        if training:
            ids, mask = encode_for_training(tok, messages, TOOLS, system_prompt=None)
            assert any(mask)
        else:
            ids = encode_chat(tok, messages, TOOLS, system_prompt=None)
        assert ids == expected
    if not old:  # the content is really there in v7+
        text = tok.decode(encode_chat(tok, SERVING, TOOLS, system_prompt=None))
        assert "Let me read it." in text
