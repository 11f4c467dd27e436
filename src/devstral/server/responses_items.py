"""Responses API shapes <-> the chat shapes the engine takes: input items to messages, flat function
tools to chat tools, and the chat engine's output to output items."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from devstral.server.errors import APIError

TEXT_PARTS = {"input_text", "output_text", "text"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text(content: Any, where: str) -> str:
    content = _content(content, where)
    assert isinstance(content, str)  # without an image checker, only text comes back
    return content


def _content(content: Any, where: str, image: Callable[[Any, str], str] | None = None) -> str | list[dict[str, Any]]:
    """A message's content for the chat encoder: its text, or (with `image`, for user messages) chat
    content parts where it holds input_image parts, each URL passed through `image(url, where)`
    (server/images.image_url_checker). Adjacent text parts join, as they do without images."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where}: expected a string or a list of content parts", param=where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS or kind == "refusal":
            text = str(part.get("refusal" if kind == "refusal" else "text") or "")
            if parts and parts[-1]["type"] == "text":
                parts[-1] = {"type": "text", "text": parts[-1]["text"] + text}
            else:
                parts.append({"type": "text", "text": text})
        elif kind == "input_image" and image is not None:
            at = f"{where}.{j}"
            if not isinstance(part.get("image_url"), str) or not part["image_url"]:
                raise APIError(400, f"{at}.image_url: required (a data: URL; file_id is not supported)", param=at)
            parts.append({"type": "image_url", "image_url": {"url": image(part["image_url"], at)}})
        else:
            what = "text and input_image" if image is not None else "text"
            raise APIError(400, f"{where}.{j}: {kind!r} parts are not supported here ({what} are)", param=where)
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def input_messages(raw: str | list[Any], image: Callable[[Any, str], str] | None = None) -> list[dict[str, Any]]:
    """Input items -> chat messages. Consecutive function calls join one assistant message (after the
    assistant's text when that came just before); function_call_output items become tool messages.
    A user message's input_image parts become image_url parts through `image` (see _content)."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected an object", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role: expected user, system, developer or assistant, got {role!r}",
                               param="input")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _content(item.get("content"), f"{where}.content",
                                                 image if role == "user" else None)})
        elif kind == "function_call":
            for key in ("call_id", "name"):
                if not isinstance(item.get(key), str) or not item[key]:
                    raise APIError(400, f"{where}.{key}: required", param="input")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                last["content"] = last.get("content") or None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not item["call_id"]:
                raise APIError(400, f"{where}.call_id: required", param="input")
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        elif kind == "reasoning":
            continue  # our own reasoning items carry nothing the model needs again
        else:
            raise APIError(400, f"{where}.type: {kind!r} items are not supported (message, function_call and "
                                "function_call_output are)", param="input")
    return messages


def chat_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise APIError(400, f"tools.{i}.type: {kind!r} tools are not supported by this server (function tools "
                                "are; a local model has no hosted web search, file search or computer)",
                           param=f"tools.{i}.type")
        if not isinstance(tool.get("name"), str):
            raise APIError(400, f"tools.{i}.name: required", param=f"tools.{i}.name")
        fn = {"name": tool["name"], "description": tool.get("description") or "",
              "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, f"tool_choice: expected 'auto', 'none', 'required' or {{\"type\": \"function\", \"name\": "
                        f"...}}, got {choice!r}", param="tool_choice")


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(item_id: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items as the chat messages a later turn is encoded from."""
    text = "".join(p["text"] for it in output if it["type"] == "message" for p in it["content"])
    calls = [{"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
             for it in output if it["type"] == "function_call"]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return [message]
