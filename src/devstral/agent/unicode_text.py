"""Text that can always be written as UTF-8.

JSON lets a model (or a file name read with surrogateescape) carry lone surrogates such as "\\ud800";
Python strings hold them, but they cannot be encoded, and one of them in a trajectory line would fail
the write. Every text entering the conversation goes through `clean`.
"""

from __future__ import annotations

import re

_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def has_lone_surrogate(text: str) -> re.Match[str] | None:
    return _LONE_SURROGATE.search(text)


def clean(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD."""
    return _LONE_SURROGATE.sub(REPLACEMENT, text) if _LONE_SURROGATE.search(text) else text
