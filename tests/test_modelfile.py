"""`quantize --modelfile` / `finetune --ollama`: the Modelfile parses the way Ollama's parser reads it, and
its TEMPLATE, rendered with the data Ollama hands a template, gives the text our encoder (mistral-common's
request encoding) gives, for plain and tool conversations, in the v7, v11 and v13 formats.

Two small reference implementations live here, written from Ollama's documentation and behaviour (the
tests need no Ollama or Go): the Modelfile grammar (`# comment`, `INSTRUCTION arguments`, values plain,
in double quotes or in triple double quotes, only printable runes kept) and the subset of Go's
text/template the templates use (actions with trim markers, if / else if / else, range with variables,
:= and =, eq / lt / and / not / len / slice and Ollama's `json`)."""

from __future__ import annotations

import json
import re

import pytest

from devstral.cli import main
from devstral.errors import DevstralError
from devstral.formats.modelfile import quote
from devstral.prompt.tokenizer import load_tokenizer
from devstral.testing import make_tiny_checkpoint

# ------------------------------------------------------------------------------------ Modelfile grammar

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires"}


def _printable(ch: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    import unicodedata

    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs, read with the state machine Ollama's parser documents and implements."""
    text = text.removeprefix("\ufeff")
    out: list[tuple[str, str]] = []
    state, buf, name, role = "nil", "", "", ""
    for ch in text:
        newline, space = ch in "\r\n", ch in " \t"
        if state == "nil":
            if ch == "#":
                state = "comment"
            elif not (space or newline):
                state, buf = "name", ch
            continue
        if state == "comment":
            if newline:
                state = "nil"
            continue
        if state == "name":
            if ch.isascii() and ch.isalpha():
                buf += ch
                continue
            if not space or buf.lower() not in COMMANDS:
                raise ValueError(f"invalid command {buf!r}")
            command = buf.lower()
            name = "model" if command == "from" else command  # Ollama calls FROM's argument the model
            state, buf = {"parameter": "parameter", "message": "message"}.get(command, "value"), ""
            continue
        if state in ("parameter", "message"):
            if (ch.isascii() and ch.isalnum()) or (ch == "_" and state == "parameter"):
                buf += ch
                continue
            if not space:
                raise ValueError("unexpected end of a parameter or message role")
            if state == "parameter":
                name = buf
            else:
                role = buf
            state, buf = "value", ""
            continue
        # value
        if space or newline:
            value, ok = _unquote(buf.strip())
            if not ok or space:
                buf += ch
                continue
            out.append((name, f"{role}: {value}" if role else value))
            state, buf, role = "nil", "", ""
            continue
        if _printable(ch):
            buf += ch
    if state == "value":
        value, ok = _unquote(buf.strip())
        if not ok:
            raise ValueError("unterminated value")
        out.append((name, f"{role}: {value}" if role else value))
    elif state not in ("nil", "comment"):
        raise ValueError("unexpected end of file")
    if not any(c == "model" for c, _ in out):
        raise ValueError("no FROM line")
    return out


@pytest.mark.parametrize("value", ["plain", "two words", 'say "hi" now', "line one\nline two", " padded ",
                                   "ends with a quote\"", "#hash", "tab\tinside", "{{ .Content }}"])
def test_quote_round_trips_through_the_grammar(value):
    commands = parse_modelfile(f"FROM x.gguf\nSYSTEM {quote(value, 'system')}\n")
    assert commands[1] == ("system", value)


def test_quote_refuses_what_a_modelfile_cannot_hold():
    with pytest.raises(DevstralError, match="three double quotes"):
        quote('a """ b', "system prompt")


# ------------------------------------------------------------------------- Go text/template, a subset

_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:(\()|(\))|("(?:[^"\\]|\\.)*")|(-?\d+)|(\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)|'
                    r'(\.[A-Za-z0-9_.]*)|([A-Za-z_][A-Za-z0-9_]*))')


def _go_json(v) -> str:
    s = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # Go escapes HTML


def _truth(v) -> bool:
    return not (v is None or v is False or v == 0 and not isinstance(v, bool) or v in ("", [], {}))


FUNCS = {"eq": lambda a, *bs: any(a == b for b in bs), "lt": lambda a, b: a < b, "not": lambda a: not _truth(a),
         "len": len, "slice": lambda x, i: x[i:], "json": _go_json,
         "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
         "or": lambda *a: next((x for x in a if _truth(x)), a[-1])}


def _lex(src: str) -> list[tuple[str, str]]:
    items, pos, trim_next = [], 0, False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        items.append(("text", text))
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            items.append(("action", body))
        trim_next, pos = bool(m.group(3)), m.end()
    items.append(("text", src[pos:].lstrip(" \t\r\n") if trim_next else src[pos:]))
    return [i for i in items if i != ("text", "")]


def _parse(items, i=0, stop=("end",)):
    nodes = []
    while i < len(items):
        kind, body = items[i]
        word = body.split(" ", 1)[0] if kind == "action" else ""
        if kind == "action" and (word in stop or body.startswith("else")):
            return nodes, i
        if word == "if":
            branches, default = [], None
            cond, i = body[3:], i + 1
            while True:
                block, i = _parse(items, i)
                branches.append((cond, block))
                end = items[i][1]
                i += 1
                if end.startswith("else if "):
                    cond = end[8:]
                elif end == "else":
                    default, i = _parse(items, i)
                    i += 1
                    break
                else:
                    break
            nodes.append(("if", branches, default))
        elif word == "range":
            spec = body[6:]
            names, _, pipe = spec.partition(":=") if ":=" in spec else ("", "", spec)
            block, i = _parse(items, i + 1)
            assert items[i][1] == "end", items[i]
            nodes.append(("range", [n.strip() for n in names.split(",") if n.strip()], pipe, block))
            i += 1
        else:
            nodes.append((kind, body))
            i += 1
    return nodes, i


def _eval(expr: str, dot, scopes):
    tokens = [t for t in _TOKEN.findall(expr)]
    pos = 0

    def operand():
        nonlocal pos
        lp, rp, string, number, var, field, ident = tokens[pos]
        pos += 1
        if lp:
            v = command(")")
            pos += 1
            return v
        if string:
            return json.loads(string)
        if number:
            return int(number)
        if var:
            head, *path = var.split(".")
            v = next(s[head] for s in reversed(scopes) if head in s)
            return _walk(v, path)
        if field:
            return _walk(dot, [p for p in field.split(".") if p])
        if ident in ("true", "false"):
            return ident == "true"
        return FUNCS[ident]

    def command(end=None):
        args = []
        while pos < len(tokens) and tokens[pos][1] != ")":
            args.append(operand())
        if callable(args[0]):
            return args[0](*args[1:])
        assert len(args) == 1, expr
        return args[0]

    return command()


def _walk(v, path):
    for p in path:
        v = v[p]  # a missing field is a template error, as for a Go struct
    return v


def _render(nodes, dot, scopes, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            body = node[1]
            m = re.match(r"^(\$\w+)\s*(:=|=)\s*(.*)$", body, re.S)
            if m:
                value = _eval(m.group(3), dot, scopes)
                if m.group(2) == ":=":
                    scopes[-1][m.group(1)] = value
                else:
                    next(s for s in reversed(scopes) if m.group(1) in s)[m.group(1)] = value
                continue
            value = _eval(body, dot, scopes)
            assert isinstance(value, str | int) and not isinstance(value, bool), (body, value)
            out.append(str(value))
        elif node[0] == "if":
            for cond, block in node[1]:
                if _truth(_eval(cond, dot, scopes)):
                    _render(block, dot, scopes + [{}], out)
                    break
            else:
                if node[2] is not None:
                    _render(node[2], dot, scopes + [{}], out)
        elif node[0] == "range":
            _, names, pipe, block = node
            for k, item in enumerate(_eval(pipe, dot, scopes)):
                scope = dict(zip(names, [k, item], strict=False)) if len(names) == 2 else \
                    ({names[0]: item} if names else {})
                _render(block, item, scopes + [scope], out)


def render_go_template(src: str, data: dict) -> str:
    nodes, _ = _parse(_lex(src))
    out: list[str] = []
    _render(nodes, data, [{"$": data}], out)
    return "".join(out)


def test_the_template_subset_behaves_like_go():
    src = ('{{- $n := 0 }}{{ range $i, $x := .L }}{{ if eq $x "b" }}{{ $n = $i }}{{ end }}{{ end -}}\n'
           '  n={{ $n }} {{ if and .T (not .F) }}yes{{ else if .F }}no{{ else }}x{{ end }} {{ json .M }}'
           ' {{ len (slice .L 1) }}{{/* comment */}}')
    assert render_go_template(src, {"L": ["a", "b", "c"], "T": True, "F": False, "M": {"k": "<v>"}}) == \
        'n=1 yes {"k":"\\u003cv\\u003e"} 2'


# ---------------------------------------------------------------- Ollama's template data, from a request

def ollama_values(messages, tools, system: str | None) -> dict:
    """What Ollama's chat handler gives a template: the Modelfile's SYSTEM prepended when the request
    has no system message, consecutive same-role messages merged (not tool results), tool-call
    arguments as objects, ids and tool_call_id carried."""
    msgs = list(messages)
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}, *msgs]
    out: list[dict] = []
    for m in msgs:
        calls = [{"ID": c.get("id", ""), "Function": {"Index": k, "Name": c["function"]["name"],
                                                      "Arguments": json.loads(c["function"]["arguments"])}}
                 for k, c in enumerate(m.get("tool_calls") or [])]
        item = {"Role": m["role"], "Content": m.get("content") or "", "ToolCalls": calls,
                "ToolCallID": m.get("tool_call_id", ""), "ToolName": m.get("name", "")}
        if out and out[-1]["Role"] == item["Role"] and item["Role"] != "tool":
            out[-1]["Content"] += "\n\n" + item["Content"]
        else:
            out.append(item)
    system_text = "\n\n".join(m["Content"] for m in out if m["Role"] == "system")
    return {"System": system_text, "Messages": out, "Tools": tools or [], "Response": "", "Think": False}


def canonical_json(text: str) -> str:
    """JSON values after the markers that carry them, re-serialized one way (Go's encoder is compact,
    mistral-common's puts a space after ':' and ','; the values must be equal, not the spacing)."""
    decoder = json.JSONDecoder()
    out, pos = [], 0
    for m in re.finditer(r"\[(AVAILABLE_TOOLS|ARGS|TOOL_CALLS)\](?=[\[{])", text):
        if m.start() < pos:
            continue
        value, end = decoder.raw_decode(text, m.end())
        out += [text[pos:m.end()], json.dumps(value, sort_keys=True)]
        pos = end
    return "".join(out) + text[pos:]


# ------------------------------------------------------------------------------------------ the tests

SYSTEM_PROMPT = 'You are Devstral, a "careful" coding agent for {name}.\n\n- Use tools <when> needed & say so.'
TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file.", "parameters": {
    "type": "object", "properties": {"path": {"type": "string", "description": "relative path"}},
    "required": ["path"]}}},
    {"type": "function", "function": {"name": "bash", "description": "Run a command.", "parameters": {
        "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}]


def call(i, name, args):
    return {"id": f"call{i:05d}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CONVERSATIONS = {
    "user": ([{"role": "user", "content": "Write hello world in C."}], None),
    "multi_turn": ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Explain <this> & that:\n  x = 1"}], None),
    "own_system": ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "3*3?"}], None),
    "tools": ([{"role": "user", "content": "read a.py"},
               {"role": "assistant", "content": None, "tool_calls": [call(1, "read_file", {"path": "a.py"})]},
               {"role": "tool", "tool_call_id": "call00001", "name": "read_file", "content": "print('a')"},
               {"role": "assistant", "content": "It prints a."},
               {"role": "user", "content": "now run it and list the folder"},
               {"role": "assistant", "content": None, "tool_calls": [
                   call(2, "bash", {"command": "python a.py"}), call(3, "bash", {"command": "ls -la"})]},
               {"role": "tool", "tool_call_id": "call00002", "name": "bash", "content": "a"},
               {"role": "tool", "tool_call_id": "call00003", "name": "bash", "content": "a.py\nb.py"}], TOOLS),
}


@pytest.fixture(scope="module", params=["v7", "v11", "v13"])
def exported(request, tmp_path_factory):
    """A tiny model in one Mistral format, quantized with --modelfile."""
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp(f"mf_{request.param}") / "Tiny-Devstral",
                                  tokenizer_version=request.param)
    (folder / "SYSTEM_PROMPT.txt").write_text(SYSTEM_PROMPT, encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.2, "top_p": 0.9}))
    out = folder.parent / "tiny-Q8_0.gguf"
    assert main(["quantize", str(folder), str(out), "--type", "Q8_0", "--no-progress", "--modelfile"]) == 0
    return request.param, folder, out, out.with_suffix(".Modelfile")


def test_modelfile_parses_as_ollama_reads_it(exported):
    version, folder, gguf, modelfile = exported
    commands = parse_modelfile(modelfile.read_text(encoding="utf-8"))
    first = dict(reversed(commands))  # one value per command (PARAMETER names are the commands' names)
    assert (modelfile.parent / first["model"]).resolve() == gguf.resolve()
    assert first["system"] == SYSTEM_PROMPT.format(name=folder.name)
    params = {c: v for c, v in commands if c not in ("model", "system", "template", "requires", "parser")}
    assert float(params["temperature"]) == 0.2 and float(params["top_p"]) == 0.9  # generation_config.json
    assert float(params["min_p"]) == 0.01 and int(params["top_k"]) == 64  # Devstral's defaults for the rest
    assert int(params["num_ctx"]) == json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    assert first["requires"] == "0.14.0"
    assert ("parser", "ministral") in commands if version == "v13" else "parser" not in first


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_template_renders_what_our_encoder_encodes(exported, name):
    version, folder, _, modelfile = exported
    commands = dict(parse_modelfile(modelfile.read_text(encoding="utf-8")))
    messages, tools = CONVERSATIONS[name]
    tok = load_tokenizer(folder)
    ours = tok.decode(tok.encode_chat(messages, tools), special=True)
    assert ours.startswith("<s>")
    ours = ours[len("<s>"):]  # Ollama's tokenizer adds the BOS (add_bos_token in the GGUF)
    rendered = render_go_template(commands["template"], ollama_values(messages, tools, commands["system"]))
    if tools is None:
        assert rendered == ours
    else:
        assert canonical_json(rendered) == canonical_json(ours)
        assert rendered.count("[TOOL_CALLS]") == ours.count("[TOOL_CALLS]") > 0


def test_finetune_ollama_writes_a_modelfile(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "base")
    (folder / "SYSTEM_PROMPT.txt").write_text("Be brief.", encoding="utf-8")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--max-steps", "1",
                 "--no-progress", "--ollama"]) == 0
    commands = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    assert ("model", "./model-Q8_0.gguf") in commands and (out / "model-Q8_0.gguf").is_file()
    assert ("system", "Be brief.") in commands and any(c == "template" for c, _ in commands)


def test_a_system_prompt_a_modelfile_cannot_hold_is_an_error(tmp_path, capsys):
    folder = make_tiny_checkpoint(tmp_path / "m")
    (folder / "SYSTEM_PROMPT.txt").write_text('Use """docstrings""".', encoding="utf-8")
    assert main(["quantize", str(folder), str(tmp_path / "m.gguf"), "--type", "Q8_0", "--no-progress",
                 "--modelfile"]) == 2
    assert "three double quotes" in capsys.readouterr().err
    assert not (tmp_path / "m.Modelfile").exists()
