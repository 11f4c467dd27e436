"""History tool calls whose arguments are not JSON: encoded as the text the model wrote, while every
call with JSON arguments keeps mistral-common's own encoding (the reference)."""

from __future__ import annotations

import json

import pytest

from devstral.prompt.chat import encode_chat
from devstral.prompt.tokenizer import MistralCommonTokenizer
from devstral.testing import mistral_common_data, write_tekken

TOOLS = [{"type": "function", "function": {"name": "run", "parameters": {
    "type": "object", "properties": {"cmd": {"type": "string"}}}}}]
ASK = {"role": "user", "content": "list files"}
CUT = '{"cmd": "ls -la /tm'  # what a call cut off by max_tokens carries back


def conversation(*arguments: str) -> list[dict]:
    calls = [{"id": f"call{k:05d}", "type": "function", "function": {"name": "run", "arguments": a}}
             for k, a in enumerate(arguments)]
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "done"} for c in calls]
    return [ASK, {"role": "assistant", "content": None, "tool_calls": calls}, *results]


@pytest.fixture(scope="module", params=["tekken_v13", "tekken_v11", "tekken_v7", "spm_v3"])
def tok(request, tmp_path_factory):
    kind, version = request.param.split("_")
    if kind == "spm":
        return MistralCommonTokenizer(mistral_common_data() / "mistral_instruct_tokenizer_240323.model.v3")
    path = tmp_path_factory.mktemp(request.param) / "tekken.json"
    write_tekken(path, version=version)
    return MistralCommonTokenizer(path)


def mistral_common_ids(tok, messages) -> list[int]:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    from devstral.prompt.chat import prepare_request

    request = prepare_request(messages, TOOLS, tok.version)
    return tok.mistral.encode_chat_completion(ChatCompletionRequest.model_validate(request.model_dump())).tokens


def test_json_arguments_keep_mistral_commons_encoding(tok):
    messages = conversation('{"cmd": "ls"}', "{}")
    assert encode_chat(tok, messages, TOOLS, system_prompt=None) == mistral_common_ids(tok, messages)


def test_non_json_arguments_are_encoded_as_written(tok):
    ids = encode_chat(tok, conversation(CUT, '{"cmd": "pwd"}'), TOOLS, system_prompt=None)
    text = tok.decode(ids, special=True).replace("\u2581", " ")
    assert CUT in text and json.dumps(CUT) not in text  # the raw text, not a quoted JSON string
    assert '{"cmd": "pwd"}' in text  # the valid call next to it is untouched
