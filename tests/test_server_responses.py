"""The Responses API through the real openai client: `responses.create`, `responses.stream`,
function calls and their outputs, `previous_response_id`; the prompt is checked against the chat
encoding (mistral-common) of the equivalent conversation."""

from __future__ import annotations

import openai
import pytest

from devstral.engine.sampling import SamplingParams
from test_server_harness import forced_output, live, reference_llm, tool_call_ids

ASK = "What is in a.py?"
TOOLS = [{"type": "function", "name": "read_file", "description": "Read a file",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]


def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=live().url + "/v1", api_key="unused", max_retries=0)


def test_text_response_equals_the_chat_engine():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}]
    ref = reference_llm().chat(messages, sampling=SamplingParams(temperature=0, max_tokens=10))
    r = client().responses.create(model="tiny", input=ASK, instructions="Be brief.", max_output_tokens=10,
                                  temperature=0)
    assert r.output_text == ref.message["content"]
    assert r.usage.input_tokens == ref.usage["prompt_tokens"]
    assert r.usage.output_tokens == ref.usage["completion_tokens"]
    assert r.status == ("incomplete" if ref.finish_reason == "length" else "completed")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert client().responses.retrieve(r.id).output_text == r.output_text


def test_stream_events_accumulate_to_the_final_response():
    tok = reference_llm().tokenizer
    with forced_output(tok.encode("Hello there, friend.")), \
            client().responses.stream(model="tiny", input=[{"role": "user", "content": ASK}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert final.output_text == "Hello there, friend." and final.status == "completed"
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
                 "response.output_text.done", "response.content_part.done", "response.output_item.done"):
        assert kind in kinds
    # the accumulated snapshot is the one the server stored
    assert client().responses.retrieve(final.id).output_text == final.output_text


def test_max_output_tokens_ends_a_stream_with_response_incomplete():
    events = list(client().responses.create(model="tiny", input=ASK, max_output_tokens=2, stream=True,
                                            temperature=0))
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.usage.output_tokens == 2
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_function_call_round_trip_with_previous_response_id():
    with forced_output(tool_call_ids([("read_file", '{"path": "a.py"}')])):
        first = client().responses.create(model="tiny", input=ASK, tools=TOOLS)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "read_file" and call.arguments == '{"path": "a.py"}' and call.status == "completed"
    second = client().responses.create(model="tiny", previous_response_id=first.id, tools=TOOLS, max_output_tokens=4,
                                       temperature=0,
                                       input=[{"type": "function_call_output", "call_id": call.call_id,
                                               "output": "print('hi')"}])
    conversation = [{"role": "user", "content": ASK},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": call.call_id, "type": "function",
                         "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}]},
                    {"role": "tool", "tool_call_id": call.call_id, "content": "print('hi')"}]
    ids = reference_llm().tokenizer.encode_chat(conversation, CHAT_TOOLS)
    assert second.usage.input_tokens == len(ids)  # exactly the chat encoding of the whole conversation
    ref = reference_llm().generate(ids, SamplingParams(temperature=0, max_tokens=4, stop_token_ids=[]))
    assert second.usage.output_tokens == len(ref.token_ids)


def test_streamed_function_calls():
    with forced_output(tool_call_ids([("read_file", '{"path": "b.py"}')], content="Let me look.")), \
            client().responses.stream(model="tiny", input=ASK, tools=TOOLS) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert [i.type for i in final.output] == ["message", "function_call"]
    assert final.output_text == "Let me look."
    assert final.output[1].name == "read_file" and final.output[1].arguments == '{"path": "b.py"}'
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds


def test_errors_name_the_field():
    with pytest.raises(openai.NotFoundError) as e:
        client().responses.create(model="tiny", input="x", previous_response_id="resp_nope")
    assert e.value.body["code"] == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client().responses.create(model="tiny", input="x", tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools.0.type"
    r = client().responses.create(model="tiny", input="x", max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError):
        client().responses.retrieve(r.id)
    kept = client().responses.create(model="tiny", input="x", max_output_tokens=1)
    client().responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client().responses.create(model="tiny", input="y", previous_response_id=kept.id)
