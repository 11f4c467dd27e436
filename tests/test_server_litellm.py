"""litellm's Ollama providers against the live server, headers left to litellm (it sends JSON bodies
without Content-Type: application/json, which aider and mini-swe-agent on Ollama depend on).

litellm is heavy (boto3, aiohttp, tiktoken), so it is not in the test extras: this file is skipped
without it. test_server_guards.py covers the same requests with raw httpx on every route.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price list from the network
litellm = pytest.importorskip("litellm")

from test_server_harness import forced_output, live, reference_llm, tool_call_ids  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # litellm's own pydantic models warn

TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]
ASK = [{"role": "user", "content": "What is in a.py?"}]


def complete(messages, **kw):
    return litellm.completion(model="ollama_chat/tiny", api_base=live().url, messages=messages, tools=TOOLS,
                              temperature=0, max_tokens=30, **kw)


def test_ollama_chat_tool_round_trip():
    tok = reference_llm().tokenizer
    with forced_output(tool_call_ids([("read_file", '{"path": "a.py"}')])):
        r = complete(ASK)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "read_file" and call.function.arguments == '{"path": "a.py"}'
    history = [*ASK, r.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "print('hi')"}]
    with forced_output(tok.encode("It prints hi.")):
        r2 = complete(history)
    assert r2.choices[0].message.content == "It prints hi."
    expected = tok.encode_chat([*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abc123XYZ", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}]},
        {"role": "tool", "tool_call_id": "abc123XYZ", "content": "print('hi')"}], TOOLS)
    assert r2.usage.prompt_tokens == len(expected)  # the history reached the model as the OpenAI one would


def test_ollama_chat_streams_tool_calls_and_ollama_generate_answers():
    with forced_output(tool_call_ids([("read_file", '{"path": "b.py"}')])):
        chunks = list(complete(ASK, stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "read_file"
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"path": "b.py"}'
    tok = reference_llm().tokenizer
    with forced_output(tok.encode("Hello there")):
        r = litellm.completion(model="ollama/tiny", api_base=live().url, messages=ASK, max_tokens=10)
    assert r.choices[0].message.content == "Hello there"
