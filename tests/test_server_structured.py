"""Structured output and tool-call grammars against a live server, through the real clients.

The property under test: with the random-weight `nano` model at temperature 1 (a model that would
write anything), every answer the grammar lets through validates (jsonschema is the oracle), and
every forced tool call parses and matches its tool's schema.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import ollama
import openai
import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field

from devstral.engine.sampling import SamplingParams
from test_server_harness import forced_output, live, nano, reference_llm, tool_call_ids

ASK = [{"role": "user", "content": "Describe a person."}]
TOOLS = [
    {"type": "function", "function": {"name": "run", "description": "Run a shell command", "parameters": {
        "type": "object", "properties": {"cmd": {"type": "string", "maxLength": 12},
                                         "timeout": {"type": "integer", "minimum": 1, "maximum": 60}},
        "required": ["cmd"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "read_file", "description": "Read a file", "parameters": {
        "type": "object", "properties": {"path": {"type": "string", "maxLength": 16}}, "required": ["path"],
        "additionalProperties": False}}},
]
ARG_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: int = Field(ge=0, le=8)


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    pets: list[Pet] = Field(max_length=3)
    nickname: str | None = Field(max_length=8)


PERSON_SCHEMA = to_strict_json_schema(Person)  # what openai's .parse() sends, and our oracle


def client(server=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=(server or nano()).url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_twenty_json_schema_requests_on_nano_at_temperature_1_all_validate():
    """openai .parse() (pydantic) and langchain-style json_schema calls, sync and streamed, concurrent."""
    def parse(seed: int) -> str:
        r = client().chat.completions.parse(model="nano", messages=ASK, response_format=Person, temperature=1,
                                            seed=seed, max_tokens=300)
        assert isinstance(r.choices[0].message.parsed, Person)  # the client's own validation
        return r.choices[0].message.content

    def raw(seed: int) -> str:
        fmt = {"type": "json_schema", "json_schema": {"name": "Person", "schema": PERSON_SCHEMA, "strict": True}}
        if seed % 2:
            chunks = client().chat.completions.create(model="nano", messages=ASK, response_format=fmt, temperature=1,
                                                      seed=seed, max_tokens=300, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        r = client().chat.completions.create(model="nano", messages=ASK, response_format=fmt, temperature=1,
                                             seed=seed, max_tokens=300)
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(parse, range(10))) + list(pool.map(raw, range(10, 20)))
    assert len(texts) == 20
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    assert len(set(texts)) > 10  # temperature 1 really sampled different documents


def test_responses_api_text_format_json_schema_validates():
    for seed in range(3):
        r = client().responses.parse(model="nano", input="Describe a person.", text_format=Person, temperature=1,
                                     max_output_tokens=300, extra_body={"seed": seed})
        assert isinstance(r.output_parsed, Person)
        jsonschema.validate(json.loads(r.output_text), PERSON_SCHEMA)


def test_ollama_format_schema_and_json():
    c = ollama.Client(host=nano().url)
    for seed in range(3):
        r = c.chat(model="nano", messages=ASK, format=PERSON_SCHEMA, options={"temperature": 1, "seed": seed,
                                                                              "num_predict": 300})
        jsonschema.validate(json.loads(r.message.content), PERSON_SCHEMA)
        r = c.generate(model="nano", prompt="A person as JSON:", format=Person.model_json_schema(),
                       options={"temperature": 1, "seed": seed, "num_predict": 300})
        Person.model_validate_json(r.response)


OBJECT = '{"a": [1, 2.5, null], "b": {"c": "d"}}'


def test_json_object_mode_ends_with_the_object():
    """The model "wants" to write an object and then more text: the answer is the object alone."""
    tok = reference_llm().tokenizer
    wanted = tok.encode(OBJECT + " and some more text")
    with forced_output(wanted):
        r = client(live()).chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                                   temperature=0)
    assert r.choices[0].message.content == OBJECT and r.choices[0].finish_reason == "stop"
    c = ollama.Client(host=live().url)
    with forced_output(wanted):
        assert c.chat(model="tiny", messages=ASK, format="json").message.content == OBJECT
    with forced_output(wanted):
        assert c.generate(model="tiny", prompt="JSON:", format="json").response == OBJECT
    for seed in range(2):  # a random model at temperature 1 may run out of tokens inside a string
        r = client().chat.completions.create(model="nano", messages=ASK, response_format={"type": "json_object"},
                                             temperature=1, seed=seed, max_tokens=100)
        text = r.choices[0].message.content
        assert text.startswith("{")
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


def check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), ARG_SCHEMAS[call.function.name])


def test_required_and_named_tool_choice_always_give_valid_calls_on_nano():
    def required(seed: int):
        r = client().chat.completions.create(model="nano", messages=ASK, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, temperature=1, seed=seed, max_tokens=200)
        assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
        return r.choices[0].message.tool_calls

    def named(seed: int):
        r = client().chat.completions.create(model="nano", messages=ASK, tools=TOOLS, temperature=1, seed=seed,
                                             tool_choice={"type": "function", "function": {"name": "read_file"}},
                                             parallel_tool_calls=False, max_tokens=200)
        return r.choices[0].message.tool_calls

    with ThreadPoolExecutor(4) as pool:
        for calls in pool.map(required, range(8)):
            check_calls(calls, {"run", "read_file"})
        for calls in pool.map(named, range(4)):
            check_calls(calls, {"read_file"})
    # streamed: the deltas reassemble into the same kind of call
    chunks = list(client().chat.completions.create(model="nano", messages=ASK, tools=TOOLS, tool_choice="required",
                                                   temperature=1, seed=3, max_tokens=300, stream=True))
    names = [tc.function.name for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []
             if tc.function and tc.function.name]
    assert names and set(names) <= {"run", "read_file"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_strict_tools_steers_an_undeclared_call_to_a_declared_one():
    """--strict-tools (the nano server has it) under tool_choice "auto": the model "wants" to call a tool
    nobody declared; it may still talk, but any call it starts is one of the tools, with valid arguments."""
    tok = nano().llm.tokenizer
    wanted = [tok.special_id("[TOOL_CALLS]"), *tok.encode("rm_everything"), tok.special_id("[ARGS]"),
              *tok.encode('{"force": true}')]
    with forced_output(wanted):
        r = client().chat.completions.create(model="nano", messages=ASK, tools=TOOLS, temperature=0, max_tokens=200)
    message = r.choices[0].message
    if r.choices[0].finish_reason == "tool_calls":
        check_calls(message.tool_calls, {"run", "read_file"})
    assert "rm_everything" not in json.dumps(r.model_dump())


def test_tool_choice_none_and_no_tools_never_give_tool_calls():
    text_call = tool_call_ids([("read_file", '{"path": "a.py"}')])
    for extra in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        with forced_output(text_call):
            r = client(live()).chat.completions.create(model="tiny", messages=ASK, temperature=0, **extra)
        message = r.choices[0].message
        assert message.tool_calls is None and r.choices[0].finish_reason == "stop"
        assert message.content == '[TOOL_CALLS]read_file[ARGS]{"path": "a.py"}'  # the text stays content
    with forced_output(text_call):
        r = ollama.Client(host=live().url).chat(model="tiny", messages=ASK)
    assert not r.message.tool_calls and "read_file" in r.message.content


def test_a_call_cut_off_by_max_tokens_is_accepted_back_as_written():
    tok = nano().llm.tokenizer
    forced = [tok.special_id("[TOOL_CALLS]"), *tok.encode("run"), tok.special_id("[ARGS]"),
              *tok.encode('{"cmd": "ls -la /tmp"}')]
    with forced_output(forced):
        r = client().chat.completions.create(model="nano", messages=ASK, tools=TOOLS, temperature=0,
                                             max_tokens=len(forced) - 3)
    assert r.choices[0].finish_reason == "length"
    (call,) = r.choices[0].message.tool_calls
    cut = call.function.arguments
    with pytest.raises(ValueError):
        json.loads(cut)
    history = [*ASK, r.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "error: the call was cut off"}]
    r2 = client().chat.completions.create(model="nano", messages=history, tools=TOOLS, temperature=0, max_tokens=4)
    ids = tok.encode_chat(history, TOOLS)
    assert r2.usage.prompt_tokens == len(ids)
    assert f"[TOOL_CALLS]run[ARGS]{cut}</s>" in tok.decode(ids, special=True)  # raw, not a quoted JSON string
    ollama_history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "run", "arguments": cut}}]}, {"role": "tool", "content": "cut off"}]
    assert httpx.post(nano().url + "/api/chat", json={"model": "nano", "messages": ollama_history, "tools": TOOLS,
                                                      "stream": False, "options": {"num_predict": 2}}).status_code == 200


def test_assistant_prefill_is_continued_like_mistral_commons_prefix():
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    tok = reference_llm().tokenizer
    prefix = "The answer is"
    reference = tok.mistral.encode_chat_completion(ChatCompletionRequest(messages=[
        UserMessage(content=ASK[0]["content"]), AssistantMessage(content=prefix, prefix=True)])).tokens
    expected = reference_llm().generate(reference, SamplingParams(temperature=0, max_tokens=8))
    messages = [*ASK, {"role": "assistant", "content": prefix}]
    r = client(live()).chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
    assert r.usage.prompt_tokens == len(reference)
    assert r.choices[0].message.content == expected.text
    o = ollama.Client(host=live().url).chat(model="tiny", messages=messages, options={"temperature": 0,
                                                                                       "num_predict": 8})
    assert o.message.content == expected.text


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}},
     "response_format.json_schema.schema", ["'uniqueItems'"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "minLength": 5, "maxLength": 2}}}}, "response_format.json_schema.schema", ["minLength"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}},
     "response_format.json_schema.schema", ["response_format"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", ["required"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"x": {"not": {"type": "string"}}}}}}], "tool_choice": "required"},
     "tools", ["'not'"]),
    ({"response_format": {"type": "json_object"}, "messages": [*ASK, {"role": "assistant", "content": "Sure!"}]},
     "response_format", ["continue"]),
])
def test_schemas_that_cannot_be_enforced_are_400_and_the_server_keeps_serving(body, param, words):
    r = httpx.post(live().url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and all(w in err["message"] for w in words), err
    r = httpx.post(live().url + "/api/chat", json={"model": "tiny", "messages": ASK, "stream": False,
                                                   "format": {"type": "object", "patternProperties": {}, "not": {}}})
    assert r.status_code == 400 and "'not'" in r.json()["error"]
    ok = httpx.post(live().url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200
