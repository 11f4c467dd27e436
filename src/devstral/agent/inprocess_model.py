"""`ChatModel` on the in-process engine (`devstral.load`). devstral is imported lazily: the agent
package itself must import without torch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from devstral.agent.exceptions import DeadlineExceeded
from devstral.agent.model import ChatReply, Message


class InProcessChatModel:
    def __init__(self, model: str | None, *, device: str = "auto", temperature: float = 0.15,
                 max_tokens: int | None = None, **load_kwargs: Any):
        import devstral

        self._devstral = devstral
        self.llm = devstral.load(model, device=device, **load_kwargs)
        self.temperature, self.max_tokens = temperature, max_tokens
        self.sees_images = getattr(self.llm, "vision", None) is not None  # the editor shows it viewed images
        # The prompt encoder adds SYSTEM_PROMPT.txt itself when no system message is given.
        folder = Path(model) if model is not None else Path(self.llm.path)  # None: the default model
        self.provides_system_prompt = folder.is_dir() and (folder / "SYSTEM_PROMPT.txt").is_file()

    def check(self) -> None:
        """Loading succeeded in __init__; nothing can be unreachable."""

    def chat(self, messages: list[Message], tools: list[dict[str, Any]], *,
             deadline: float | None = None) -> ChatReply:
        kwargs: dict[str, Any] = {"temperature": self.temperature}
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        extra = {}
        if deadline is not None:
            # Polled once per token: generation stops within a token of the agent's --max-time.
            extra["should_stop"] = lambda: time.monotonic() >= deadline
        result = self.llm.chat(messages, tools=tools, sampling=self._devstral.SamplingParams(**kwargs), **extra)
        if deadline is not None and (result.finish_reason == "cancelled" or time.monotonic() >= deadline):
            raise DeadlineExceeded()
        message = dict(result.message)
        message.setdefault("role", "assistant")
        return ChatReply(message=message, finish_reason=result.finish_reason, usage=dict(result.usage or {}))
