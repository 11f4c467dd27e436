"""Chat templates shipped with a model (GGUF `tokenizer.chat_template`, HF tokenizer_config.json), rendered
the way transformers and llama.cpp's --jinja do: a sandboxed jinja2 environment with trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII
and does not HTML-escape.

Templates write control tokens as text ("[INST]", "<s>"), so the rendered prompt must be tokenized
with control-token parsing on. Text that came from the user must not be: `render_pieces` marks the
control-token strings found in messages and tools, and returns the prompt as pieces that say which
parsing each one gets. `encode` puts it together with one BOS at most.

OpenAI clients send tool-call arguments as JSON strings, while templates are written for objects
(they re-serialize them with `tojson`). With `parse_tool_arguments=True` string arguments are parsed
first, as llama.cpp and vLLM do; transformers leaves them as given, which stays the default.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from collections.abc import Callable
from typing import Any

from devstral.errors import DevstralError

# Private-use code points around user-typed control strings while the template runs.
_OPEN, _CLOSE = "\ue000", "\ue001"

EncodeFn = Callable[[str, bool], list[int]]
"""encode(text, parse_special) -> ids, without adding BOS/EOS."""


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return dt.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def parse_tool_arguments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with each tool call's string `arguments` parsed into an object (copies; input untouched).

    Empty text becomes {}; text that is not valid JSON stays text, as llama.cpp keeps it.
    """
    out = []
    for m in messages:
        if isinstance(m, dict) and m.get("tool_calls"):
            m = dict(m)
            calls = []
            for call in m["tool_calls"]:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    call = dict(call)
                    fn = call["function"] = dict(call["function"])
                    args = fn.get("arguments")
                    if isinstance(args, str):
                        with contextlib.suppress(json.JSONDecodeError):
                            fn["arguments"] = json.loads(args) if args.strip() else {}
                calls.append(call)
            m["tool_calls"] = calls
        out.append(m)
    return out


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may emit."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 control_tokens: tuple[str, ...] | list[str] = (), parse_tool_arguments: bool = False):
        import jinja2

        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise DevstralError(f"chat template, line {e.lineno}: {e.message}") from None
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self.parse_tool_arguments = parse_tool_arguments
        tokens = sorted({t for t in (*control_tokens, bos_token, eos_token) if t}, key=len, reverse=True)
        self._controls = re.compile("|".join(map(re.escape, tokens))) if tokens else None

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
               add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text, exactly as transformers' apply_chat_template(tokenize=False) gives it."""
        return self._render(self._prepare(messages), tools, add_generation_prompt, extra)

    def render_pieces(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
                      add_generation_prompt: bool = True, **extra: Any) -> list[tuple[str, bool]]:
        """The prompt as [(text, parse_special)]: control strings typed by a user come out as plain text."""
        if self._controls is None:
            return [(self.render(messages, tools, add_generation_prompt=add_generation_prompt, **extra), True)]
        text = self._render(self._mark(self._prepare(messages)), self._mark(tools), add_generation_prompt,
                            self._mark(extra))
        pieces: list[tuple[str, bool]] = []
        for k, part in enumerate(re.split(f"{_OPEN}(.*?){_CLOSE}", text, flags=re.DOTALL)):
            part = part.replace(_OPEN, "").replace(_CLOSE, "")  # a marker a template split in two
            if part:
                pieces.append((part, k % 2 == 0))
        return pieces

    def encode(self, encode: EncodeFn, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               *, bos_id: int | None = None, add_generation_prompt: bool = True,
               media: dict[str, list[int]] | None = None, **extra: Any) -> list[int]:
        """Ids for the rendered prompt; `bos_id` is put first unless the template already wrote a BOS.

        The template's control tokens are encoded one by one (parse_special=True) and the text
        between them as whole runs (parse_special=False), user-typed control strings included, so
        BPE sees the same text runs as it would without the markers.

        `media` maps marker strings (put into the messages as text) to the ids they stand for (an
        image's tokens): the text on either side of a marker is encoded as its own run, as
        mistral-common encodes the text chunks around an image. Every marker must come out of the
        template exactly once.
        """
        runs: list[tuple[str, bool]] = []  # (text, is_control_token)
        for text, special in self.render_pieces(messages, tools, add_generation_prompt=add_generation_prompt,
                                                **extra):
            parts = [text] if not special or self._controls is None else self._split_controls(text)
            for k, part in enumerate(parts):
                control = special and k % 2 == 1
                if not control and runs and not runs[-1][1]:
                    runs[-1] = (runs[-1][0] + part, False)
                elif part:
                    runs.append((part, control))
        ids: list[int] = []
        split = re.compile("(" + "|".join(map(re.escape, media)) + ")") if media else None
        found: list[str] = []
        for text, control in runs:
            pieces = [text] if control or split is None else split.split(text)
            for k, piece in enumerate(pieces):
                if k % 2:
                    found.append(piece)
                    ids.extend(media[piece])
                elif piece:
                    ids.extend(encode(piece, control))
        if media and sorted(found) != sorted(media):
            raise DevstralError("the chat template does not write each image part where the message has it "
                                f"({len(found)} of {len(media)} images placed); it cannot be used with images")
        if bos_id is not None and (not ids or ids[0] != bos_id):
            ids.insert(0, bos_id)
        return ids

    def _split_controls(self, text: str) -> list[str]:
        """[text, control, text, control, ..., text]."""
        return re.split(f"({self._controls.pattern})", text)

    # ------------------------------------------------------------------ internals
    def _prepare(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return parse_tool_arguments(messages) if self.parse_tool_arguments else messages

    def _render(self, messages, tools, add_generation_prompt, extra) -> str:
        import jinja2

        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra}
        try:
            return self._template.render(messages=messages, tools=tools or None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise DevstralError(f"chat template: {e}") from None

    def _mark(self, value: Any) -> Any:
        if isinstance(value, str):
            value = value.replace(_OPEN, "").replace(_CLOSE, "")
            return self._controls.sub(lambda m: f"{_OPEN}{m.group(0)}{_CLOSE}", value)
        if isinstance(value, dict):
            return {k: self._mark(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._mark(v) for v in value]
        return value


def render_chat_template(source: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                         *, add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = "",
                         **extra: Any) -> str:
    """One-shot `ChatTemplate(source).render(...)`."""
    return ChatTemplate(source, bos_token=bos_token, eos_token=eos_token).render(
        messages, tools, add_generation_prompt=add_generation_prompt, **extra)
