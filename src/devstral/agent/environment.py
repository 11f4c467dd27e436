"""The environment of the agent's commands: an allowlist, never the agent's own environment.

A command sees PATH and LANG from the agent, HOME pointing at a fresh folder of the session (inside
the sandbox when there is one), settings that keep programs from paging or prompting, and whatever
the user passes by name with `--env NAME` (or sets with `--env NAME=VALUE`). API keys, tokens and
database URLs in the agent's environment are thus absent, not merely masked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from devstral.errors import DevstralError

INHERITED = ("PATH", "LANG")
# Programs that would wait for a pager, a terminal or a prompt answer instead run straight through.
NON_INTERACTIVE = {"PAGER": "cat", "GIT_PAGER": "cat", "MANPAGER": "cat", "TERM": "dumb", "TQDM_DISABLE": "1",
                   "PIP_NO_INPUT": "1", "GIT_TERMINAL_PROMPT": "0", "DEBIAN_FRONTEND": "noninteractive"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def command_environment(source: Mapping[str, str], passed: Iterable[str] = ()) -> dict[str, str]:
    """The base environment of every command. HOME is left to the supervisor unless passed."""
    env = {k: source[k] for k in INHERITED if k in source}
    env.setdefault("PATH", os.defpath)
    env.update(NON_INTERACTIVE)
    for item in passed:
        name, has_value, value = item.partition("=")
        if not _NAME.fullmatch(name):
            raise DevstralError(f"--env {item!r}: give a variable name (NAME) or NAME=VALUE")
        if not has_value:
            if name not in source:
                raise DevstralError(f"--env {name}: the variable is not set in this environment")
            value = source[name]
        env[name] = value
    return env
