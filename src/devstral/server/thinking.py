"""Ollama's `think`: the model's [THINK]...[/THINK] text goes to `thinking`, the rest to the answer.

The markers arrive as text pieces (the engine renders these two control tokens for the chat parser),
so a tail that could still become a marker is held back until the next piece decides it. `think:
false` bans the [THINK] token outright (the model cannot start thinking), which is stronger than
hiding what it thought.
"""

from __future__ import annotations

from typing import Any

from devstral.textstream import held_suffix_len

OPEN, CLOSE = "[THINK]", "[/THINK]"


class ThinkSplitter:
    def __init__(self) -> None:
        self.inside = False
        self.held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(thinking, answer) text that is certain now."""
        buf, self.held = self.held + text, ""
        thinking, answer = [], []
        while buf:
            marker = CLOSE if self.inside else OPEN
            side = thinking if self.inside else answer
            at = buf.find(marker)
            if at >= 0:
                side.append(buf[:at])
                buf = buf[at + len(marker):]
                self.inside = not self.inside
                continue
            keep = held_suffix_len(buf, [marker])
            side.append(buf[:len(buf) - keep])
            self.held = buf[len(buf) - keep:]
            break
        return "".join(thinking), "".join(answer)

    def flush(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        return (held, "") if self.inside else ("", held)


def ban_think_token(llm: Any, params: Any) -> Any:
    """`think: false`: mask [THINK] at every step (alongside any other constraint, a grammar say)."""
    think_id = llm.tokenizer.special_id(OPEN)
    if think_id is None:
        return params
    from devstral.engine.constraints import all_of
    from devstral.engine.token_masks import banned_tokens

    params.constraint = all_of(params.constraint, banned_tokens(llm.config.vocab_size, [think_id]))
    return params
