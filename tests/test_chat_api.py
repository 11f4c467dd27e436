"""llm.chat / llm.stream_chat on a tiny model whose sampler is scripted to emit a tool call."""

from __future__ import annotations

import contextlib
import itertools
import json

import pytest

import devstral
from devstral.prompt.chat import encode_for_training
from devstral.testing import patched_sampler

TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]
ASK = [{"role": "user", "content": "What is in a.py?"}]


@pytest.fixture(scope="module")
def llm(tiny_hf):
    return devstral.load(tiny_hf)


def _assistant_ids(llm, message):
    """What the model is trained to emit for `message` (mistral-common's encoding), EOS included."""
    ids, mask = encode_for_training(llm.tokenizer, [*ASK, message], TOOLS)
    return [t for t, m in zip(ids, mask, strict=True) if m]


@pytest.fixture
def scripted():
    """Make the sampler return the given ids in order, whatever the logits say."""
    with contextlib.ExitStack() as stack:
        def script(ids):
            it = iter(ids)
            stack.enter_context(patched_sampler(lambda logits, params, history: next(it)))
        yield script


CALL = {"id": "abcdefghi", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}


def test_chat_returns_tool_calls(llm, scripted):
    out_ids = _assistant_ids(llm, {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]})
    scripted(out_ids)
    ids = itertools.count()
    result = llm.chat(ASK, tools=TOOLS, make_id=lambda: f"id{next(ids):07d}")
    assert result.finish_reason == "tool_calls"
    assert result.message == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "id0000000", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}]}
    assert result.prompt_token_ids == llm.tokenizer.encode_chat(ASK, TOOLS)
    assert result.token_ids == out_ids
    assert result.usage == {"prompt_tokens": len(result.prompt_token_ids), "completion_tokens": len(out_ids),
                            "total_tokens": len(result.prompt_token_ids) + len(out_ids),
                            "prompt_tokens_details": {"cached_tokens": result.usage["prompt_tokens_details"]
                                                      ["cached_tokens"]}}
    # the answer round-trips: sent back as history, it encodes exactly as the model produced it
    again, mask = encode_for_training(llm.tokenizer, [*ASK, result.message], TOOLS)
    assert [t for t, m in zip(again, mask, strict=True) if m] == out_ids


def test_stream_chat_deltas_rebuild_the_message(llm, scripted):
    calls = [CALL, {"id": "bcdefghij", "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "b/ü.py"}'}}]
    out_ids = _assistant_ids(llm, {"role": "assistant", "content": None, "tool_calls": calls})
    scripted(out_ids)
    stream = llm.stream_chat(ASK, tools=TOOLS)
    chunks = list(stream)
    assert chunks[0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    assert chunks[-1] == {"index": 0, "delta": {}, "finish_reason": "tool_calls"}
    assert all(c["finish_reason"] is None for c in chunks[:-1])
    content, built = "", {}
    for c in chunks[1:-1]:
        delta = c["delta"]
        content += delta.get("content") or ""
        for tc in delta.get("tool_calls", []):
            if "id" in tc:  # the first chunk of a call carries id, type and name
                assert tc["index"] not in built and tc["type"] == "function" and tc["function"]["name"]
                built[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
            built[tc["index"]]["arguments"] += tc["function"]["arguments"]
    assert content == ""
    assert [(b["name"], json.loads(b["arguments"])) for b in built.values()] == [
        ("read_file", {"path": "a.py"}), ("read_file", {"path": "b/ü.py"})]
    assert stream.result.message["content"] is None
    assert [c["id"] for c in stream.result.message["tool_calls"]] == [b["id"] for b in built.values()]
    assert stream.usage["completion_tokens"] == len(out_ids)


def test_plain_answer_finishes_with_stop(llm, scripted):
    out_ids = _assistant_ids(llm, {"role": "assistant", "content": "It prints [INST] and </s> as text."})
    scripted(out_ids)
    result = llm.chat(ASK)
    assert result.finish_reason == "stop"
    assert result.message == {"role": "assistant", "content": "It prints [INST] and </s> as text.",
                              "tool_calls": None}


def test_cut_off_call_is_flagged_and_finishes_with_length(llm, scripted):
    out_ids = _assistant_ids(llm, {"role": "assistant", "tool_calls": [CALL]})
    scripted(out_ids)
    result = llm.chat(ASK, tools=TOOLS, sampling=devstral.SamplingParams(max_tokens=len(out_ids) - 3))
    assert result.finish_reason == "length"
    (call,) = result.message["tool_calls"]
    assert call["malformed"] is True and call["function"]["name"] == "read_file"


def test_should_stop_is_passed_through(llm, scripted):
    scripted(_assistant_ids(llm, {"role": "assistant", "content": "a long answer that will be cut"}))
    result = llm.chat(ASK, should_stop=lambda: True)
    assert result.finish_reason == "cancelled" and result.token_ids == []


def test_system_prompt_override_and_bad_request(llm):
    with_system = llm.tokenizer.encode_chat(ASK, system_prompt="Be terse.")
    text = llm.tokenizer.decode(with_system, special=True)
    assert text.startswith("<s>[SYSTEM_PROMPT]Be terse.[/SYSTEM_PROMPT][INST]")
    with pytest.raises(devstral.DevstralError, match="message 1"):
        llm.stream_chat([*ASK, {"role": "robot", "content": "beep"}])  # raises before any delta


def test_context_overflow_raises_before_the_first_delta(llm):
    stream = llm.stream_chat([{"role": "user", "content": "word " * 5000}])
    with pytest.raises(devstral.DevstralError, match="context"):
        next(iter(stream))


def test_raw_prompt_typed_bos_is_not_doubled(llm):
    bos = llm.tokenizer.bos_id
    assert llm.encode_prompt("<s>hello") == llm.encode_prompt("hello") == [bos, *llm.tokenizer.encode("hello")]
    twice = llm.encode_prompt("<s><s>hello")
    assert twice.count(bos) == 1  # only the first typed BOS is taken as BOS; the rest is text
