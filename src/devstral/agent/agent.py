"""The agent loop: ask the model, run its tool calls, feed back the observations, until `finish` or a
limit. Control leaves the loop by exceptions (see exceptions.py); a step never crashes on bad model
output, it tells the model what was wrong and counts it."""

from __future__ import annotations

import inspect
import json
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devstral.agent import prompts
from devstral.agent.exceptions import AgentStop, Finished, FormatError, LimitReached
from devstral.agent.model import ChatModel, Message
from devstral.agent.text_tool_calls import has_text_tool_call, parse_text_tool_calls
from devstral.agent.tools import ToolBox
from devstral.agent.trajectory import TrajectoryWriter
from devstral.agent.truncation import truncate_middle
from devstral.agent.unicode_text import clean
from devstral.errors import ContextOverflowError

AGENTS_MD_LIMIT = 20_000
# Prose longer than this in one reply is degenerate (a model repeating itself): the history keeps its
# head and tail, so later requests, the trajectory and the terminal stay small.
MAX_ASSISTANT_CHARS = 50_000
_ID_ALPHABET = string.ascii_letters + string.digits
EventSink = Callable[[str, dict[str, Any]], None]


@dataclass
class AgentLimits:
    max_steps: int = 100
    max_time_s: float | None = None
    max_format_errors: int = 3  # in a row
    stuck_repeats: int = 4  # the same actions with the same observations, in a row


class Agent:
    def __init__(self, model: ChatModel, toolbox: ToolBox, *, limits: AgentLimits | None = None,
                 trajectory: TrajectoryWriter | None = None, on_event: EventSink | None = None):
        self.model, self.toolbox = model, toolbox
        self.limits = limits or AgentLimits()
        self.trajectory = trajectory
        self.on_event = on_event or (lambda kind, data: None)
        self.messages: list[Message] = []
        self._steps = 0
        self._started = time.monotonic()
        self._format_errors = 0
        self._recent: list[str] = []
        self._model_takes_deadline = _takes_deadline(model)

    # -- tasks --------------------------------------------------------------------------------
    def run(self, task: str) -> AgentStop:
        """Work on `task` until the model finishes or a limit is hit. History carries over between tasks."""
        self._add_task(task)
        self._steps, self._started, self._format_errors, self._recent = 0, time.monotonic(), 0, []
        try:
            while True:
                self.step()
        except AgentStop as stop:
            self.on_event("stop", {"reason": str(stop), "exit_code": stop.exit_code,
                                   "finished": isinstance(stop, Finished)})
            return stop
        finally:
            self._save()

    def interrupted(self) -> None:
        """The user pressed Ctrl-C during a step: stop the command, answer the open calls."""
        self.toolbox.interrupt()
        self._answer_open_calls(prompts.render("interrupted", detail=""))
        self._save()

    def _add_task(self, task: str) -> None:
        task = clean(task)
        self._answer_open_calls("Task closed.")
        if self.messages:
            self.messages.append({"role": "user", "content": prompts.render(
                "next_task", task=task, workspace=self.toolbox.workspace.root)})
            return
        instructions = prompts.render("system")
        if not self.model.provides_system_prompt:
            self.messages.append({"role": "system", "content": instructions})
        agents_md = self.toolbox.workspace.agents_md()
        self.messages.append({"role": "user", "content": prompts.render(
            "task", task=task, workspace=self.toolbox.workspace.root,
            # A model with its own system prompt gets the agent's instructions here instead.
            instructions=instructions if self.model.provides_system_prompt else "",
            agents_md=_read_capped(agents_md) if agents_md else "", agents_md_path=agents_md)})

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> None:
        self._check_limits()
        try:
            if self._model_takes_deadline:
                reply = self.model.chat(self.messages, self.toolbox.schemas, deadline=self._deadline())
            else:
                reply = self.model.chat(self.messages, self.toolbox.schemas)
        except ContextOverflowError as e:
            raise LimitReached(f"context window full: {e}") from e
        self._check_time()  # a reply that took the rest of the time is not acted on
        self._steps += 1
        message = reply.message
        try:
            if not isinstance(message, dict):
                raise FormatError(f"the reply was not a chat message (an object with content and "
                                  f"tool_calls) but {type(message).__name__}: {clean(repr(message))[:200]}")
            content, calls = self._parse(message)
        except FormatError as e:
            prose = _content_text(message.get("content")) if isinstance(message, dict) else None
            prose = _short(prose) if prose else None
            self.on_event("assistant", {"step": self._steps, "content": prose, "usage": reply.usage})
            self._format_error(prose, str(e), reply.finish_reason)
            self._save()
            return
        self.on_event("assistant", {"step": self._steps, "content": content, "usage": reply.usage})
        assistant: Message = {"role": "assistant", "content": content or None,
                              "tool_calls": [c.as_openai() for c in calls]}
        self.messages.append(assistant)
        observations, bad = [], 0
        # read each step: an endpoint model learns it from the server in check(), after construction
        self.toolbox.editor.sees_images = bool(getattr(self.model, "sees_images", False))
        try:
            for call in calls:
                observation = self._execute(call)
                bad += call.error is not None
                observations.append(observation)
                self.messages.append({"role": "tool", "tool_call_id": call.id, "content": observation})
            self._show_images()
        finally:
            self._save()
        if bad:
            assistant["weight"] = 0
            self._count_format_error()
        else:
            self._format_errors = 0
        self._check_stuck(calls, observations)

    def _show_images(self) -> None:
        """Images the editor viewed this step, in one user message after the tool results: tool messages
        carry text only (OpenAI's and Mistral's formats), so the picture comes as the user's."""
        images = self.toolbox.editor.take_images()
        if not images:
            return
        content: list[dict[str, Any]] = []
        for path, part in images:
            content += [{"type": "text", "text": f"{path}:"}, part]
        self.messages.append({"role": "user", "content": content})
        self.on_event("images", {"paths": [str(path) for path, _ in images]})

    def _parse(self, message: Message) -> tuple[str, list[_Call]]:
        raw_content = message.get("content")
        content = _content_text(raw_content)
        if content is None:
            raise FormatError(f"its content must be text or a list of text parts, got {type(raw_content).__name__}.")
        raw_calls = message.get("tool_calls") or []
        if not isinstance(raw_calls, list):
            raise FormatError(f"tool_calls must be a list of calls, got {type(raw_calls).__name__}.")
        if raw_calls:
            return _short(content), [_Call.from_openai(c) for c in raw_calls]
        if has_text_tool_call(content):
            content, parsed = parse_text_tool_calls(content, self.toolbox.schemas)
            return _short(content), [_Call(_new_id(), name, json.dumps(args), args) for name, args in parsed]
        raise FormatError("it contained no tool call. Every reply must call a tool.")

    def _execute(self, call: _Call) -> str:
        try:
            if call.error:
                raise FormatError(call.error)
            args = self.toolbox.validate(call.name, call.args)
        except FormatError as e:
            call.error = str(e)
            self.on_event("format_error", {"error": call.error})
            return f"ERROR: the call could not be run: {call.error}"
        self.on_event("action", {"tool": call.name, "args": args})
        observation = self.toolbox.run(call.name, args, self._time_left())  # finish raises Finished
        self.on_event("observation", {"tool": call.name, "text": observation})
        return observation

    def _format_error(self, prose: str | None, problem: str, finish_reason: str | None) -> None:
        if finish_reason == "length":
            problem += " The reply was cut off at the token limit; keep replies shorter."
        problem = clean(problem)
        self.on_event("format_error", {"error": problem})
        if prose:
            self.messages.append({"role": "assistant", "content": _short(prose), "weight": 0})
        self._count_format_error()
        self.messages.append({"role": "user", "content": prompts.render(
            "format_error", problem=problem, tool_names=self.toolbox.names, count=self._format_errors,
            limit=self.limits.max_format_errors)})

    # -- limits -------------------------------------------------------------------------------
    def _count_format_error(self) -> None:
        self._format_errors += 1
        if self._format_errors >= self.limits.max_format_errors:
            raise LimitReached(f"{self._format_errors} malformed replies in a row")

    def _check_limits(self) -> None:
        if self._steps >= self.limits.max_steps:
            raise LimitReached(f"step limit reached ({self.limits.max_steps} steps)")
        self._check_time()

    def _check_time(self) -> None:
        left = self._time_left()
        if left is not None and left <= 0:
            raise LimitReached(f"time limit reached ({self.limits.max_time_s:g} s)")

    def _time_left(self) -> float | None:
        if self.limits.max_time_s is None:
            return None
        return self.limits.max_time_s - (time.monotonic() - self._started)

    def _deadline(self) -> float | None:
        """The time.monotonic() by which the model must have answered."""
        return None if self.limits.max_time_s is None else self._started + self.limits.max_time_s

    def _check_stuck(self, calls: list[_Call], observations: list[str]) -> None:
        signature = json.dumps([[c.name, c.args] for c in calls] + observations, sort_keys=True, default=str)
        self._recent = (self._recent + [signature])[-self.limits.stuck_repeats:]
        if len(self._recent) == self.limits.stuck_repeats and len(set(self._recent)) == 1:
            raise LimitReached(f"stuck: the same action and observation {self.limits.stuck_repeats} times in a row")

    # -- history ------------------------------------------------------------------------------
    def _answer_open_calls(self, text: str) -> None:
        """Every tool call gets a tool message before the conversation goes on (servers insist)."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "assistant":
                answered = {m.get("tool_call_id") for m in self.messages[i + 1:] if m["role"] == "tool"}
                for call in self.messages[i].get("tool_calls") or []:
                    if call["id"] not in answered:
                        self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": text})
                return

    def _save(self) -> None:
        if self.trajectory is not None:
            self.trajectory.write(self.messages)


@dataclass
class _Call:
    id: str
    name: str
    arguments: str  # as the model sent it
    args: Any
    error: str | None = None

    @classmethod
    def from_openai(cls, raw: Any) -> _Call:
        function = raw.get("function") if isinstance(raw, dict) else None
        if not isinstance(function, dict):
            return cls(_new_id(), "?", "{}", {}, error=f"a tool call must look like "
                       f'{{"type": "function", "function": {{"name": ..., "arguments": ...}}}}, got {raw!r:.200}')
        call_id = raw.get("id")
        call_id = call_id if isinstance(call_id, str) and len(call_id) == 9 and call_id.isalnum() else _new_id()
        name, arguments = clean(str(function.get("name") or "?"))[:200], function.get("arguments")
        if isinstance(arguments, dict):
            # ensure_ascii: the history's copy stays writable even if a value holds a lone surrogate.
            return cls(call_id, name, json.dumps(arguments), arguments)
        try:
            args = json.loads(arguments or "{}")
        except (TypeError, ValueError, RecursionError) as e:
            # The history keeps valid JSON (tokenizers re-parse it); the error says what was sent.
            return cls(call_id, name, "{}", {}, error=f"the arguments of {name} are not valid JSON ({e}): "
                       f"{clean(str(arguments)[:200])!r}")
        return cls(call_id, name, clean(arguments), args)

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _takes_deadline(model: ChatModel) -> bool:
    """Whether `model.chat` accepts `deadline` (ours do; a ChatModel written before it existed may not,
    and then --max-time is checked between model calls only)."""
    try:
        params = inspect.signature(model.chat).parameters
    except (TypeError, ValueError):
        return False
    return "deadline" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _content_text(content: Any) -> str | None:
    """A message's content as one text (parts joined), with lone surrogates replaced; None if it is
    neither text, nor a list of parts, nor absent."""
    if content is None:
        return ""
    if isinstance(content, str):
        return clean(content)
    if isinstance(content, list):
        return clean("".join(str(part.get("text", "")) for part in content if isinstance(part, dict)))
    return None


def _short(content: str) -> str:
    return truncate_middle(content, MAX_ASSISTANT_CHARS)


def _new_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def _read_capped(path: Any) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    return text if len(text) <= AGENTS_MD_LIMIT else text[:AGENTS_MD_LIMIT] + "\n[... AGENTS.md cut here ...]"
