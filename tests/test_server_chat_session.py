"""tool_choice as a grammar per tokenizer format, through the same job the chat route runs (no HTTP)."""

from __future__ import annotations

import pytest

import devstral
from devstral.engine.outputs import PENDING
from devstral.engine.sampling import SamplingParams
from devstral.server.chat_session import ChatOutput, chat_job
from devstral.server.structured import output_constraint
from devstral.testing import make_tiny_checkpoint
from test_server_harness import forced_output

TOOLS = [{"type": "function", "function": {"name": "run", "parameters": {
    "type": "object", "properties": {"cmd": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "read", "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "where am I?"}]


def run_job(llm, forced: list[int], tool_choice, parallel_tool_calls=None) -> ChatOutput:
    params = SamplingParams(temperature=0, max_tokens=40)
    params.constraint = output_constraint(llm.tokenizer, tools=TOOLS, tool_choice=tool_choice,
                                          parallel_tool_calls=parallel_tool_calls, answer=None, strict_tools=False)
    out = ChatOutput()
    with forced_output(forced):
        for item in chat_job(llm, ASK, TOOLS, params, parallel_tool_calls=parallel_tool_calls)(None, lambda: False):
            if item is PENDING:  # the job waits for the engine: step it, as the server's worker does
                llm.engine.step()
                continue
            out.add(item)
    return out


@pytest.mark.parametrize("version", ["v11", "v13"])
def test_named_tool_choice_forces_the_call_in_the_tokenizers_format(tmp_path, version):
    llm = devstral.load(str(make_tiny_checkpoint(tmp_path / version, tokenizer_version=version)), max_context=256)
    tok = llm.tokenizer
    args = tok.encode('{"cmd": "pwd"}')
    call_id = [tok.special_id("[CALL_ID]"), *tok.encode("abc123XYZ")] if version == "v11" else []
    forced = [tok.special_id("[TOOL_CALLS]"), *tok.encode("run"), *call_id, tok.special_id("[ARGS]"), *args]
    out = run_job(llm, forced, tool_choice={"type": "function", "function": {"name": "run"}},
                  parallel_tool_calls=False)
    (call,) = out.tool_calls
    assert call["function"] == {"name": "run", "arguments": '{"cmd": "pwd"}'}
    if version == "v11":
        assert call["id"] == "abc123XYZ"
    assert out.finish_reason == "tool_calls" and out.content == ""


def test_required_tool_choice_lets_the_model_pick_among_the_declared_tools(tmp_path):
    llm = devstral.load(str(make_tiny_checkpoint(tmp_path / "m")), max_context=256)
    tok = llm.tokenizer
    call = [tok.special_id("[TOOL_CALLS]"), *tok.encode("read"), tok.special_id("[ARGS]"), *tok.encode("{}")]
    out = run_job(llm, call, tool_choice="required")
    assert [c["function"]["name"] for c in out.tool_calls] == ["read"]
    # a name that is not declared cannot be written: the grammar steers to a declared one
    undeclared = [tok.special_id("[TOOL_CALLS]"), *tok.encode("rm_rf"), tok.special_id("[ARGS]"), *tok.encode("{}")]
    out = run_job(llm, undeclared, tool_choice="required")
    assert out.tool_calls and {c["function"]["name"] for c in out.tool_calls} <= {"run", "read"}
