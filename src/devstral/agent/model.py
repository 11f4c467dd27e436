"""What the agent needs from a model: one chat call with tools, answering an OpenAI-shaped message.

Two implementations: `InProcessChatModel` (devstral.load, this process) and `EndpointChatModel`
(any OpenAI-compatible /v1/chat/completions). Tests drive the agent with scripted ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, Any]


@dataclass
class ChatReply:
    """One assistant turn: `message` is `{"role": "assistant", "content": str|None, "tool_calls": [...]|None}`."""

    message: Message
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class ChatModel(Protocol):
    """A chat model the agent can drive.

    `provides_system_prompt` is True when the model brings its own system prompt (a model folder with
    SYSTEM_PROMPT.txt): the agent then sends no system message and puts its instructions in the first
    user message, so the model sees the prompt it was trained with.
    """

    provides_system_prompt: bool

    def check(self) -> None:
        """Raise DevstralError when the model cannot be reached; called once before the first step."""
        ...

    def chat(self, messages: list[Message], tools: list[dict[str, Any]], *,
             deadline: float | None = None) -> ChatReply:
        """One reply. `deadline` is a time.monotonic() value (the agent's --max-time): past it, the
        call gives up and raises DeadlineExceeded instead of answering late. Implementations without
        the parameter still work; the agent then checks the time between calls only."""
        ...
