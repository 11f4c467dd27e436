"""Chat requests: SYSTEM_PROMPT.txt and overrides, one BOS, errors that name the message or the tool."""

from __future__ import annotations

import datetime as dt

import pytest

from devstral.errors import DevstralError
from devstral.prompt import system_prompt as sp
from devstral.prompt.chat import mistral_call_id
from devstral.prompt.tokenizer import MistralCommonTokenizer, load_tokenizer
from devstral.testing import write_tekken

U = {"role": "user", "content": "hi"}
BASH = {"type": "function", "function": {"name": "bash", "parameters": {
    "type": "object", "properties": {"command": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok_chat")
    write_tekken(folder / "tekken.json", version="v13", inner_vocab=1200)
    return MistralCommonTokenizer(folder / "tekken.json")


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "Devstral-Test-2512"
    folder.mkdir()
    write_tekken(folder / "tekken.json", version="v13", inner_vocab=1200)
    return folder


def _text(tok, ids):
    return tok.decode(ids, special=True)


def test_system_prompt_file_is_the_default_with_placeholders(model_folder, monkeypatch):
    (model_folder / "SYSTEM_PROMPT.txt").write_text("You are {name}. Today is {today}; yesterday was {yesterday}.")
    monkeypatch.setattr(sp, "current_date", lambda: dt.date(2025, 3, 1))
    tok = load_tokenizer(model_folder)
    assert _text(tok, tok.encode_chat([U])) == (
        "<s>[SYSTEM_PROMPT]You are Devstral-Test-2512. Today is 2025-03-01; yesterday was 2025-02-28."
        "[/SYSTEM_PROMPT][INST]hi[/INST]")


def test_request_system_message_wins_and_overrides_work(model_folder):
    (model_folder / "SYSTEM_PROMPT.txt").write_text("Default prompt.")
    tok = load_tokenizer(model_folder)
    mine = [{"role": "system", "content": "Mine."}, U]
    assert _text(tok, tok.encode_chat(mine)) == "<s>[SYSTEM_PROMPT]Mine.[/SYSTEM_PROMPT][INST]hi[/INST]"
    assert _text(tok, tok.encode_chat([U], system_prompt="Override.")).startswith("<s>[SYSTEM_PROMPT]Override.[")
    assert _text(tok, tok.encode_chat([U], system_prompt=None)) == "<s>[INST]hi[/INST]"
    # what the CLI does with --system / --no-system
    assert sp.resolve(tok.default_system_prompt, None, False) == "Default prompt."
    assert sp.resolve(tok.default_system_prompt, "X", False) == "X"
    assert sp.resolve(tok.default_system_prompt, "X", True) is None
    tok.default_system_prompt = sp.resolve(tok.default_system_prompt, None, True)
    assert _text(tok, tok.encode_chat([U])) == "<s>[INST]hi[/INST]"


def test_placeholders_only_where_they_are():
    day = dt.date(2024, 1, 1)
    assert sp.fill_placeholders('JSON {"a": 1} stays', today=day) == 'JSON {"a": 1} stays'
    assert sp.fill_placeholders("{{literal}} on {today}", today=day) == "{literal} on 2024-01-01"  # str.format
    assert sp.fill_placeholders('{"k": 1} on {today} by {name}', name="M", today=day) == '{"k": 1} on 2024-01-01 by M'
    assert sp.fill_placeholders("{yesterday}", today=day) == "2023-12-31"


def test_exactly_one_bos(tok):
    for messages in ([U], [{"role": "user", "content": "<s>hi"}], [{"role": "system", "content": "<s>"}, U]):
        ids = tok.encode_chat(messages)
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


@pytest.mark.parametrize("messages,match", [
    ([U, {"role": "robot", "content": "x"}], r"message 1: unknown role 'robot'"),
    (["hello"], r"message 0: must be an object"),
    ([U, {"role": "tool", "tool_call_id": "abcdefghi", "content": "x"}], r"message 1: tool result .* no earlier"),
    ([U, {"role": "tool", "content": "x"}], r"message 1: a tool message needs a tool_call_id"),
    ([U, {"role": "assistant", "content": ""}, U], r"message 1: an assistant message needs content or tool_calls"),
    ([{"role": "user"}], r"message 0: a user message needs content"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"message 0: content part 0"),
    ([U, {"role": "assistant", "tool_calls": [{"function": {"name": "bash", "arguments": 7}}]}],
     r"message 1: tool_calls\[0\] \(bash\): arguments must be a JSON string or an object"),
    ([], "non-empty"),
])
def test_bad_messages_name_the_index(tok, messages, match):
    with pytest.raises(DevstralError, match=match):
        tok.encode_chat(messages)


def test_mistral_common_validation_is_reported(tok):
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "bash", "arguments": "{}"}}
    with pytest.raises(DevstralError, match="invalid chat request: .*function calls and responses"):
        tok.encode_chat([U, {"role": "assistant", "tool_calls": [call]}, U], [BASH])  # call left unanswered
    with pytest.raises(DevstralError, match="invalid chat request: Expected last role"):
        tok.encode_chat([U, {"role": "assistant", "tool_calls": [call]}], [BASH])  # a call is never continued


@pytest.mark.parametrize("tools,match", [
    ([{"type": "function", "function": {"name": "bad", "parameters": {"type": "objekt"}}}],
     r"tools\[0\] \(bad\): parameters are not a valid JSON Schema"),
    ([BASH, {"type": "function", "function": {"name": "deep", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": "zero"}}}}}],
     r"tools\[1\] \(deep\): parameters are not a valid JSON Schema at properties/n/minimum"),
    ([{"type": "function", "function": {"name": "has space"}}], r"tools\[0\] \(has space\): function name"),
    ([{"type": "retrieval"}], r"tools\[0\]: expected"),
])
def test_bad_tools_name_the_tool(tok, tools, match):
    with pytest.raises(DevstralError, match=match):
        tok.encode_chat([U], tools)


def test_openai_style_call_ids_are_mapped_consistently(tmp_path):
    write_tekken(tmp_path / "tekken.json", version="v11", inner_vocab=1200)
    tok = MistralCommonTokenizer(tmp_path / "tekken.json")

    def convo(call_id):
        return [U, {"role": "assistant", "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "bash", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "ok"}]

    openai_id = "call_9f8e7d6c5b4a3f2e1d0c"
    mapped = mistral_call_id(openai_id)
    assert len(mapped) == 9 and mapped.isalnum() and mapped == "a3f2e1d0c"  # its last 9 alphanumerics
    assert tok.encode_chat(convo(openai_id), [BASH]) == tok.encode_chat(convo(mapped), [BASH])
    short = mistral_call_id("c1")
    assert len(short) == 9 and short.isalnum() and short == mistral_call_id("c1")
    assert mistral_call_id("abcdefghi") == "abcdefghi"
