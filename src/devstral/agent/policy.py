"""Who may do what: the three modes, the questions asked in confirm mode, and "approve similar".

- confirm (default): bash commands and edits ask first; reads outside the workspace and sensitive
  files ask; the user can approve similar actions for the rest of the session.
- auto: nothing asks; reads outside the workspace, sensitive files and bash commands naming paths
  outside the workspace are refused.
- read-only: the editor only views; bash runs only commands that plainly change nothing.
Edits outside the workspace are refused in every mode.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from devstral.agent import command_check
from devstral.agent.exceptions import ToolError
from devstral.agent.workspace import Workspace, is_sensitive


class Mode(str, enum.Enum):
    CONFIRM = "confirm"
    AUTO = "auto"
    READ_ONLY = "read-only"


class Decision(enum.Enum):
    YES = "yes"
    NO = "no"
    SIMILAR = "similar"  # yes, and approve similar actions for the rest of the session


@dataclass
class ApprovalRequest:
    tool: str
    action: str  # what will happen, shown to the user
    warnings: list[str] = field(default_factory=list)
    similar: str | None = None  # what "approve similar" would cover; None: it is not offered


class Approver(Protocol):
    def __call__(self, request: ApprovalRequest) -> Decision: ...


class Policy:
    def __init__(self, mode: Mode, workspace: Workspace, approver: Approver | None = None):
        if mode is Mode.CONFIRM and approver is None:
            raise ValueError("confirm mode needs an approver")
        self.mode, self.workspace, self.approver = mode, workspace, approver
        self._approved: set[str] = set()

    def check(self, tool: str, args: dict[str, Any], cwd: Path) -> None:
        """Return if the call may run; raise ToolError (the model's observation) if not."""
        if tool == "execute_bash":
            self._check_bash(args, cwd)
        elif tool == "str_replace_editor":
            self._check_editor(args)

    # -- bash ---------------------------------------------------------------------------------
    def _check_bash(self, args: dict[str, Any], cwd: Path) -> None:
        command = args["command"]
        if args.get("is_input") == "true" or not command.strip():
            return  # talks to a command that was already allowed
        if self.mode is Mode.READ_ONLY:
            if command_check.is_read_only(command):
                return
            raise ToolError("Refused: the agent runs in read-only mode, and this command may change "
                            "something. Only plain read commands (ls, cat, grep, find, git status/log/diff ...) "
                            "without output redirection are allowed.")
        sensitive, outside = command_check.named_paths(command, self.workspace, cwd)
        warnings = [f"names a sensitive file: {p}" for p in sensitive]
        warnings += [f"names a path outside the workspace: {p}" for p in outside]
        if self.mode is Mode.AUTO:
            if warnings:
                raise ToolError(f"Refused in auto mode: the command {'; '.join(warnings)}. Work inside "
                                f"{self.workspace.root} and leave credential files alone.")
            return
        keys = None if warnings else command_check.similarity_keys(command)
        if keys and keys <= self._approved:
            return
        similar = f"commands running {', '.join(sorted(keys))}" if keys else None
        self._ask(ApprovalRequest("execute_bash", f"run: {command}", warnings, similar), keys)

    # -- editor -------------------------------------------------------------------------------
    def _check_editor(self, args: dict[str, Any]) -> None:
        raw = args["path"]
        if not raw.startswith("/"):
            return  # the editor answers with the absolute path it expected
        try:
            path = self.workspace.resolve(raw)
        except (OSError, RuntimeError, ValueError) as e:
            raise ToolError(f"{raw} cannot be resolved: {e}") from None
        inside = self.workspace.contains(path)
        sensitive = is_sensitive(Path(raw)) or is_sensitive(path)
        if args["command"] == "view":
            if inside and not sensitive:
                return
            why = "is outside the workspace" if not inside else "may hold credentials"
            if self.mode is not Mode.CONFIRM:
                raise ToolError(f"Refused in {self.mode.value} mode: {path} {why}.")
            key = None if sensitive else f"read-outside:{path.parent}"
            if key in self._approved:
                return
            self._ask(ApprovalRequest("str_replace_editor", f"read {path}", [f"the path {why}"],
                                      f"reads in {path.parent}" if key else None), {key} if key else None)
            return
        if not inside:
            raise ToolError(f"Refused: {path} is outside the workspace {self.workspace.root}; "
                            "files can only be changed inside it.")
        if self.mode is Mode.READ_ONLY:
            raise ToolError(f"Refused: the agent runs in read-only mode; {args['command']} changes files.")
        if sensitive:
            if self.mode is Mode.AUTO:
                raise ToolError(f"Refused in auto mode: {path} may hold credentials.")
            self._ask(ApprovalRequest("str_replace_editor", f"{args['command']} {path}",
                                      ["the file may hold credentials"], None), None)
            return
        if self.mode is Mode.AUTO or "edit" in self._approved:
            return
        self._ask(ApprovalRequest("str_replace_editor", f"{args['command']} {path}", [],
                                  "file edits inside the workspace"), {"edit"})

    def _ask(self, request: ApprovalRequest, keys: set[str] | None) -> None:
        assert self.approver is not None
        decision = self.approver(request)
        if decision is Decision.NO:
            raise ToolError("The user did not allow this action. Try another way, or call finish "
                            "and explain what you need.")
        if decision is Decision.SIMILAR and keys:
            self._approved |= keys
