"""History tool calls whose arguments are not JSON, encoded as the text the model wrote.

A call cut off by max_tokens (or a malformed one) comes back to clients with its raw text as
`arguments`, and agents send it back in the next request. mistral-common would encode such a string
as a JSON string literal (quoted and escaped), which is not what the model produced; refusing it
would leave the agent stuck. Here the call is encoded exactly as written: `[TOOL_CALLS]name[ARGS]`
followed by the raw text (v11+), or the raw text spliced into the JSON list where the arguments
object would be (pre-v11).

`install(instruct)` patches one copy of an instruct tokenizer (prompt/chat.py makes a fresh shallow
copy per request): calls with JSON arguments still go through mistral-common unchanged.
"""

from __future__ import annotations

import json
from typing import Any


def is_json(arguments: Any) -> bool:
    if not isinstance(arguments, str):
        return True
    try:
        json.loads(arguments or "{}")
        return True
    except ValueError:
        return False


def install(instruct: Any) -> None:
    original = getattr(instruct, "_encode_tool_calls_in_assistant_message", None)
    if original is None:  # v1 tokenizers have no tool calls at all
        return

    def encode(message: Any) -> list[int]:
        calls = message.tool_calls or []
        if all(is_json(call.function.arguments) for call in calls):
            return original(message)
        if hasattr(instruct, "ARGS"):  # v11+: one [TOOL_CALLS]name[...][ARGS]arguments run per call
            return [t for call in calls for t in _one_call(instruct, original, message, call)]
        return _json_list(instruct, message)

    instruct._encode_tool_calls_in_assistant_message = encode


def _one_call(instruct: Any, original: Any, message: Any, call: Any) -> list[int]:
    if is_json(call.function.arguments):
        return original(message.model_copy(update={"tool_calls": [call]}))
    placeholder = call.model_copy(update={"function": call.function.model_copy(update={"arguments": "{}"})})
    tokens = original(message.model_copy(update={"tool_calls": [placeholder]}))
    empty = instruct.tokenizer.encode("{}", bos=False, eos=False)
    if tokens[-len(empty):] != empty:
        raise RuntimeError("mistral-common's tool-call encoding changed: arguments are no longer last")
    return tokens[:-len(empty)] + instruct.tokenizer.encode(call.function.arguments, bos=False, eos=False)


def _json_list(instruct: Any, message: Any) -> list[int]:
    """pre-v11: `[TOOL_CALLS]` + the JSON list mistral-common writes, raw arguments spliced in."""
    marks: dict[str, str] = {}
    prepared = []
    for k, call in enumerate(message.tool_calls):
        entry = instruct._prepare_function_call(call)
        if not is_json(call.function.arguments):
            mark = f"\x00raw-arguments-{k}\x00"
            marks[json.dumps(mark)] = call.function.arguments
            entry["arguments"] = mark
        prepared.append(entry)
    text = json.dumps(prepared, ensure_ascii=False)
    for mark, raw in marks.items():
        text = text.replace(mark, raw)
    return [instruct.TOOL_CALLS, *instruct.tokenizer.encode(text, bos=False, eos=False)]
