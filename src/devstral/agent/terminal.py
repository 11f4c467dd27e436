"""The agent at a terminal: printing what happens, and asking the user in confirm mode."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

from devstral.agent.policy import ApprovalRequest, Decision

_PREVIEW_LINES = 20
# Printed text is cut before rich sees it: a 50 MB reply would take minutes to lay out.
_PREVIEW_CHARS = 4_000
_APPROVAL_CHARS = 20_000


class TerminalUI:
    def __init__(self, console: Console | None = None, verbose: bool = True):
        self.console = console or Console(stderr=True, highlight=False)
        self.verbose = verbose

    def event(self, kind: str, data: dict[str, Any]) -> None:
        c = self.console
        if kind == "assistant" and data.get("content"):
            c.print(f"[bold cyan]model[/] {escape(clip(str(data['content']).strip()))}")
        elif kind == "action":
            c.print(f"[bold yellow]{data['tool']}[/] {escape(clip(_describe(data['tool'], data['args'])))}")
        elif kind == "observation" and self.verbose:
            c.print(f"[dim]{escape(clip(data['text'], _PREVIEW_LINES))}[/]")
        elif kind == "images" and self.verbose:
            c.print(f"[dim]shown to the model: {escape(', '.join(data['paths']))}[/]")
        elif kind == "format_error":
            c.print(f"[red]format error[/] {escape(clip(data['error']))}")
        elif kind == "stop":
            style = "green" if data["finished"] else "red"
            c.print(f"[bold {style}]{'finished' if data['finished'] else 'stopped'}[/] {escape(clip(data['reason']))}")

    def approve(self, request: ApprovalRequest) -> Decision:
        c = self.console
        c.print(f"[bold magenta]allow?[/] {escape(clip(request.action, max_chars=_APPROVAL_CHARS))}")
        if len(request.action) > _APPROVAL_CHARS:
            c.print(f"  [red]warning:[/] the action is {len(request.action)} characters long; only its start is shown")
        for w in request.warnings:
            c.print(f"  [red]warning:[/] {escape(w)}")
        options = "[y]es / [n]o" + (f" / [a]lways for {request.similar} this session" if request.similar else "")
        while True:
            c.print(f"  {escape(options)} ", end="")
            try:
                answer = input().strip().lower()
            except EOFError:
                return Decision.NO
            if answer in ("y", "yes"):
                return Decision.YES
            if answer in ("n", "no", ""):
                return Decision.NO
            if answer in ("a", "always") and request.similar:
                return Decision.SIMILAR

    def read_task(self) -> str | None:
        """The next task typed by the user; None at EOF, Ctrl-C or 'exit'."""
        while True:
            try:
                self.console.print("[bold]task>[/] ", end="")
                text = input().strip()
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return None
            if text in ("exit", "quit", "/exit", "/quit"):
                return None
            if text:
                return text


def clip(text: str, max_lines: int | None = None, max_chars: int = _PREVIEW_CHARS) -> str:
    """At most `max_lines` lines and `max_chars` characters of `text`, saying how much was left out."""
    shown = text[:max_chars]
    note = f"... ({len(text) - max_chars} more characters)" if len(text) > max_chars else ""
    if max_lines is not None:
        lines = shown.splitlines()
        if len(lines) > max_lines:
            total = text.count("\n") + 1
            shown = "\n".join(lines[:max_lines])
            note = f"... ({total - max_lines} more lines)"
    return f"{shown}\n{note}" if note else shown


def _describe(tool: str, args: dict[str, Any]) -> str:
    if tool == "execute_bash":
        return args["command"] if args.get("is_input") != "true" else f"(key) {args['command']}"
    if tool == "str_replace_editor":
        return f"{args['command']} {args['path']}"
    if tool == "think":
        return args["thought"]
    return json.dumps(args)[:_PREVIEW_CHARS]


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()
