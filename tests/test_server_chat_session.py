"""tool_choice forcing per tokenizer format, through the same job the chat route runs (no HTTP)."""

from __future__ import annotations

import pytest

import devstral
from devstral.engine.outputs import PENDING
from devstral.engine.sampling import SamplingParams
from devstral.server.chat_session import ChatOutput, chat_job
from devstral.testing import make_tiny_checkpoint
from test_server_harness import forced_output

TOOLS = [{"type": "function", "function": {"name": "run", "parameters": {
    "type": "object", "properties": {"cmd": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "read", "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "where am I?"}]


def run_job(llm, forced: list[int], **options) -> ChatOutput:
    out = ChatOutput()
    with forced_output(forced):
        for item in chat_job(llm, ASK, TOOLS, SamplingParams(temperature=0, max_tokens=40), **options)(
                None, lambda: False):
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
    # v11 writes the call id itself after the forced name[CALL_ID]; v13 starts right at the arguments
    forced = [*tok.encode("abc123XYZ"), tok.special_id("[ARGS]"), *args] if version == "v11" else args
    out = run_job(llm, forced, tool_choice={"type": "function", "function": {"name": "run"}})
    (call,) = out.tool_calls
    assert call["function"] == {"name": "run", "arguments": '{"cmd": "pwd"}'}
    if version == "v11":
        assert call["id"] == "abc123XYZ"
    assert out.finish_reason == "tool_calls" and out.content == ""
    assert out.completion_tokens == len(forced) + 1  # the forced prefix is prompt, not completion


def test_required_tool_choice_lets_the_model_pick_the_tool(tmp_path):
    llm = devstral.load(str(make_tiny_checkpoint(tmp_path / "m")), max_context=256)
    tok = llm.tokenizer
    out = run_job(llm, [*tok.encode("read"), tok.special_id("[ARGS]"), *tok.encode("{}")], tool_choice="required")
    assert [c["function"]["name"] for c in out.tool_calls] == ["read"]
