"""The four tools the model can call, behind one `ToolBox.run(name, args)`.

Arguments are validated against the same schemas the model was given; anything wrong is a
FormatError (counted, told to the model). A refused or failed action is a ToolError: its text is the
observation; so is any OS or encoding error a tool meets. Every observation is masked for secrets
before anyone sees it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from devstral.agent import prompts
from devstral.agent.editor import FileEditor
from devstral.agent.environment import command_environment
from devstral.agent.exceptions import Finished, FormatError, ToolError
from devstral.agent.policy import Mode, Policy
from devstral.agent.sandbox import SandboxSpec
from devstral.agent.secrets import SecretMasker
from devstral.agent.shell import DEFAULT_MAX_OUTPUT_BYTES, KEY_SIGNALS, BashSession, CommandResult
from devstral.agent.truncation import BASH_OUTPUT_LIMIT, truncate_middle
from devstral.agent.unicode_text import clean, has_lone_surrogate
from devstral.agent.workspace import Workspace


@dataclass
class ToolLimits:
    soft_timeout_s: float = 30.0  # no output for this long: return what there is, keep running
    max_command_s: float = 1800.0  # hard cap for any command without its own timeout
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES  # a command printing more is killed


@dataclass(frozen=True)
class SandboxOptions:
    """How commands are confined; `enabled=False` runs them unconfined (--no-sandbox)."""

    enabled: bool = False
    allow_network: bool = False
    read_paths: tuple[Path, ...] = ()


class ToolBox:
    def __init__(self, workspace: Workspace, policy: Policy, masker: SecretMasker,
                 limits: ToolLimits | None = None, env: Mapping[str, str] | None = None,
                 pass_env: Iterable[str] = (), sandbox: SandboxOptions | None = None):
        """`env` is the environment commands may take variables from (default: this process's):
        they get PATH and LANG from it, plus the names in `pass_env`, and nothing else."""
        self.workspace, self.policy, self.masker = workspace, policy, masker
        self.limits = limits or ToolLimits()
        self.schemas = prompts.tool_schemas()
        self._parameters = {t["function"]["name"]: t["function"]["parameters"] for t in self.schemas}
        sandbox = sandbox or SandboxOptions()
        spec = SandboxSpec(workspace.root, writable=policy.mode is not Mode.READ_ONLY,
                           allow_network=sandbox.allow_network, read_paths=sandbox.read_paths) \
            if sandbox.enabled else None
        base_env = command_environment(os.environ if env is None else env, pass_env)
        self.shell = BashSession(workspace.root, base_env, soft_timeout_s=self.limits.soft_timeout_s,
                                 max_output_bytes=self.limits.max_output_bytes, sandbox_spec=spec)
        self.sandboxed = spec is not None
        self.editor = FileEditor(workspace)
        self._last_timeout: float | None = None

    @property
    def names(self) -> list[str]:
        return list(self._parameters)

    def validate(self, name: str, args: Any) -> dict[str, Any]:
        """Check a call against its schema; lenient on types a text-mode model gets wrong."""
        if name not in self._parameters:
            raise FormatError(f"there is no tool named {name!r}; the tools are {', '.join(self.names)}.")
        if not isinstance(args, dict):
            raise FormatError(f"the arguments of {name} must be a JSON object, got {type(args).__name__}.")
        args = _coerce(args, self._parameters[name])
        try:
            jsonschema.validate(args, self._parameters[name])
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path)
            raise FormatError(f"invalid arguments for {name}{f' (field {where})' if where else ''}: {e.message}.") from None
        for key, value in args.items():
            if not isinstance(value, str):
                continue
            if bad := has_lone_surrogate(value):
                raise FormatError(f"the field {key} of {name} holds a lone surrogate ({ascii(bad.group())}) at "
                                  f"character {bad.start()}, which is not valid Unicode.")
            if "\0" in value and key in ("command", "path"):
                raise FormatError(f"the field {key} of {name} holds a NUL character, which no {key} can hold.")
        return args

    def run(self, name: str, args: dict[str, Any], time_left_s: float | None = None) -> str:
        """Execute a validated call and return the observation (masked). `finish` raises Finished."""
        if name == "finish":
            raise Finished(args["message"])
        if name == "think":
            return "Your thought has been noted."
        try:
            self.policy.check(name, args, self.shell.cwd)
            if name == "execute_bash":
                text = self._bash(args, time_left_s)
            else:
                text = self.editor(args)
        except ToolError as e:
            text = f"ERROR: {e}"
        except (OSError, UnicodeError, ValueError) as e:
            # Whatever a path or a text can make the OS or a codec refuse: the model is told, the run goes on.
            text = f"ERROR: {name} failed: {type(e).__name__}: {e}"
        return clean(self.masker.mask(text))

    def _bash(self, args: dict[str, Any], time_left_s: float | None) -> str:
        command, is_input = args["command"], args.get("is_input") == "true"
        shell = self.shell
        if is_input:
            if not shell.pending:
                raise ToolError("no command is running, so there is nothing to send input to. "
                                "Send it as a new command with is_input \"false\".")
            if command not in KEY_SIGNALS:
                raise ToolError(f"the running command reads no input (its stdin is /dev/null); only the keys "
                                f"{', '.join(KEY_SIGNALS)} can be sent to it.")
            return self._observe(shell.send_key(command), self._last_timeout)
        if not command.strip():
            if not shell.pending:
                raise ToolError("empty command, and no command is running. Send a command.")
            return self._observe(shell.read_more(), self._last_timeout)
        prefix = ""
        if shell.pending:
            if shell.running:
                raise ToolError("the previous command is still running. Send an empty command to wait for it, "
                                "or is_input \"true\" with C-c to interrupt it, before running another.")
            prefix = "The previous command ended meanwhile:\n" + self._observe(shell.read_more(), None) + "\n\n"
        given = args.get("timeout")
        # A timeout the model chose is a hard limit: wait through silence until then.
        silence = float("inf") if given and given > 0 else None
        timeout = float(given) if given and given > 0 else self.limits.max_command_s
        if time_left_s is not None:
            timeout = max(1.0, min(timeout, time_left_s))
        self._last_timeout = timeout
        return prefix + self._observe(shell.run(command, timeout_s=timeout, silence_s=silence), timeout)

    def _observe(self, result: CommandResult, timeout: float | None) -> str:
        if result.exit_code is not None:
            # Values a command exported (export API_KEY=...) are secrets from now on too.
            self.masker.add_from_env(self.shell.exported_env())
        output = truncate_middle(self.masker.mask(result.output), BASH_OUTPUT_LIMIT)
        return prompts.render("bash_observation", output=output, cwd=result.cwd, killed=result.killed,
                              timeout=_seconds(timeout), still_running=result.exit_code is None,
                              silence=_seconds(self.limits.soft_timeout_s), exit_code=result.exit_code,
                              output_limited=result.output_limited, output_bytes=result.output_bytes,
                              max_output=self.limits.max_output_bytes, session_lost=result.session_lost)

    def interrupt(self) -> None:
        self.shell.interrupt()

    def close(self) -> None:
        self.shell.close()

    @property
    def cwd(self) -> Path:
        return self.shell.cwd


def _coerce(args: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    out = dict(args)
    for key, value in args.items():
        kind = schema.get("properties", {}).get(key, {}).get("type")
        if kind == "string" and isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif kind in ("number", "integer") and isinstance(value, str):
            try:
                number = float(value)
                out[key] = int(number) if kind == "integer" and number.is_integer() else number
            except ValueError:
                pass
        elif value is None and key not in schema.get("required", []):
            del out[key]  # "insert_line": null means "not given"
    return out


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:g}"
