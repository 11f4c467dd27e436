"""The real `openai` client against the live server: completions and chat, sync and async."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from devstral.engine.sampling import SamplingParams
from test_server_harness import CTX, forced_output, live, reference_llm, tool_call_ids


def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=live().url + "/v1", api_key="unused", max_retries=0)


def async_client() -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=live().url + "/v1", api_key="unused", max_retries=0)


def greedy(prompt: str | list[int], n: int, **kw):
    return reference_llm().generate(prompt, SamplingParams(temperature=0, max_tokens=n, **kw))


def test_completion_greedy_equals_llm_generate():
    ref = greedy("The quick brown fox", 24)
    r = client().completions.create(model="tiny", prompt="The quick brown fox", max_tokens=24, temperature=0)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)


def test_completion_stream_joins_to_the_same_text_and_reports_usage():
    ref = greedy("Once upon a time", 20)
    chunks = list(client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [ref.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_completion_token_id_prompt_stop_and_logprobs():
    ids = reference_llm().encode_prompt("hello world")
    ref = greedy(ids, 12, logprobs=2)
    r = client().completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == ref.text
    assert lp.token_logprobs == pytest.approx([s.logprob for s in ref.logprobs], abs=1e-4)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    if len(ref.text) > 3:  # stop at a piece of the greedy text: the answer ends right before it
        stop = ref.text[2:4]
        r = client().completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, stop=[stop])
        assert r.choices[0].text == ref.text[:ref.text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_async_client_streams_completions():
    ref = greedy("abc", 10)

    async def run() -> str:
        async with async_client() as ac:
            stream = await ac.completions.create(model="tiny", prompt="abc", max_tokens=10, temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream])

    assert asyncio.run(run()) == ref.text


def test_seeded_sampling_is_reproducible_and_matches_the_engine():
    kw = dict(temperature=0.9, top_k=40, top_p=0.9, seed=1234)
    ref = reference_llm().generate("seeded", SamplingParams(max_tokens=16, min_p=0.0, repeat_penalty=1.0, **kw))
    r = client().completions.create(model="tiny", prompt="seeded", max_tokens=16, temperature=0.9, top_p=0.9,
                                    seed=1234, extra_body={"top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0})
    assert r.choices[0].text == ref.text


def test_context_length_is_what_the_server_enforces():
    r = client().completions.create(model="tiny", prompt="x", max_tokens=CTX - 2, temperature=0)
    assert r.usage.total_tokens <= CTX


# ---------------------------------------------------------------- chat
TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file from the workspace",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "run", "description": "Run a shell command",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}}]
ASK = [{"role": "user", "content": "What is in a.py?"}]


def reassemble(chunks) -> dict:
    """Fold streamed chat chunks the way OpenAI's docs tell clients to."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] += (tc.function.name or "") if tc.function else ""
            call["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = choice.finish_reason or finish
    return {"content": content, "calls": [calls[i] for i in sorted(calls)], "finish": finish}


def test_chat_greedy_equals_llm_chat():
    ref = reference_llm().chat(ASK, sampling=SamplingParams(temperature=0, max_tokens=20))
    r = client().chat.completions.create(model="tiny", messages=ASK, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == ref.message["content"]
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.usage["prompt_tokens"]
    assert r.usage.completion_tokens == ref.usage["completion_tokens"]
    streamed = reassemble(client().chat.completions.create(model="tiny", messages=ASK, max_tokens=20, temperature=0,
                                                           stream=True))
    assert streamed["content"] == ref.message["content"] and streamed["finish"] == ref.finish_reason


def test_chat_logprobs_match_the_engine():
    ids = reference_llm().tokenizer.encode_chat(ASK)
    ref = greedy(ids, 6, logprobs=3)
    r = client().chat.completions.create(model="tiny", messages=ASK, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx([s.logprob for s in ref.logprobs], abs=1e-4)
    assert all(len(e.top_logprobs) == 3 for e in content)


def test_tool_call_deltas_reassemble_into_the_non_streaming_result():
    args = [('{"path": "a.py"}'), ('{"cmd": "ls -la"}')]
    forced = tool_call_ids([("read_file", args[0]), ("run", args[1])], content="Let me look.")
    with forced_output(forced):
        whole = client().chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0)
        chunks = list(client().chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))
    msg = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Let me look."
    assert [(c.function.name, c.function.arguments) for c in msg.tool_calls] == [("read_file", args[0]),
                                                                                   ("run", args[1])]
    assert all(c.type == "function" and len(c.id) == 9 for c in msg.tool_calls)
    streamed = reassemble(chunks)
    assert streamed["content"] == msg.content and streamed["finish"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed["calls"]] == [("read_file", args[0]), ("run", args[1])]
    assert chunks[-1].usage.completion_tokens == len(forced) + 1  # + EOS
    assert whole.usage.completion_tokens == len(forced) + 1
    first_deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or []) if tc.id]
    assert [tc.type for tc in first_deltas] == ["function", "function"]  # a call opens with id, type and name


def test_tool_choice_named_forces_that_call_and_parallel_false_keeps_one():
    # The model "wants" to call run twice and then read_file; the grammar decides what it may write.
    forced = tool_call_ids([("run", '{"cmd": "pwd"}'), ("run", '{"cmd": "ls"}'), ("read_file", '{"path": "a"}')])
    named = {"type": "function", "function": {"name": "run"}}
    with forced_output(forced):
        r = client().chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0,
                                             tool_choice=named, parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in calls] == [("run", '{"cmd": "pwd"}')]
    with forced_output(forced):  # without the limit, calls repeat, but only of the named tool
        r = client().chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0, tool_choice=named)
    calls = r.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in calls[:2]] == [("run", '{"cmd": "pwd"}'),
                                                                           ("run", '{"cmd": "ls"}')]
    assert {c.function.name for c in calls} == {"run"}


def test_tool_choice_none_hides_the_tools_from_the_prompt():
    ref = reference_llm().chat(ASK, sampling=SamplingParams(temperature=0, max_tokens=8))
    r = client().chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8,
                                         temperature=0)
    assert r.choices[0].message.content == ref.message["content"]
    assert r.usage.prompt_tokens == ref.usage["prompt_tokens"]


def test_tool_round_trip_history_is_accepted():
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcdefghi", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "print('hi')"}]
    ref = reference_llm().chat(history, tools=TOOLS, sampling=SamplingParams(temperature=0, max_tokens=8))
    r = client().chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == ref.message["content"]


def test_async_client_chat_with_tools_streams():
    forced = tool_call_ids([("read_file", '{"path": "b.py"}')])

    async def run():
        async with async_client() as ac:
            stream = await ac.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=True)
            return reassemble([c async for c in stream])

    with forced_output(forced):
        out = asyncio.run(run())
    assert out["calls"][0]["name"] == "read_file" and out["calls"][0]["arguments"] == '{"path": "b.py"}'
    assert out["finish"] == "tool_calls"


def test_response_format_json_object_and_max_completion_tokens_are_accepted():
    r = client().chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=3, temperature=0,
                                         response_format={"type": "json_object"}, seed=7)
    assert r.usage.completion_tokens <= 3


def test_a_repeated_conversation_reports_cached_tokens_and_the_same_answer():
    """An agent's next turn repeats its history: the prefix cache serves it, and says so in usage."""
    c = client()
    history = [{"role": "user", "content": "Summarise this file: " + "def f(x):\n    return x * 2\n" * 12}]
    first = c.chat.completions.create(model="tiny", messages=history, max_tokens=6, temperature=0)
    second = c.chat.completions.create(model="tiny", messages=history, max_tokens=6, temperature=0)
    n = first.usage.prompt_tokens
    assert second.usage.prompt_tokens == n
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    assert second.choices[0].message.content == first.choices[0].message.content
    text = httpx.get(live().url + "/metrics").text
    rate = next(float(line.split()[1]) for line in text.splitlines() if line.startswith("devstral_prefix_cache_hit_rate"))
    assert 0 < rate <= 1
