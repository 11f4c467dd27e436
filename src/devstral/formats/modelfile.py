"""An Ollama Modelfile for a GGUF we wrote: FROM the file, TEMPLATE, PARAMETER (sampling), SYSTEM.

`ollama create NAME -f X.Modelfile` then serves the model with Devstral's prompt format and settings:
- TEMPLATE is our own Go template for the model's Mistral format (templates/ollama_vN.gotmpl, v7, v11
  and v13), with tools, tool calls and tool results, rendering what mistral-common encodes. Mistral's
  older formats (v1-v3) have no template here: Ollama would then use the GGUF's own, so a note says so.
- PARAMETER lines carry the model's sampling defaults (Devstral's, or generation_config.json's) and
  the context size.
- SYSTEM is the model's SYSTEM_PROMPT.txt, its {name}/{today}/{yesterday} filled at export time
  (Ollama's templates cannot compute dates).
- v13 models get `PARSER ministral`, Ollama's parser for `[TOOL_CALLS]name[ARGS]{...}`; v7's JSON list
  is found by Ollama's template-driven parser. `REQUIRES 0.14.0`: tool-call ids (v0.12.10), that
  parser (v0.13.1) and REQUIRES itself.

Values are quoted the way Ollama's parser reads them (parser/parser.go): three double quotes around
anything with a newline or a quote; a value that cannot be written so (it holds three double quotes
itself) is an error, not a Modelfile that Ollama would read differently.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from devstral.errors import DevstralError
from devstral.tmpfiles import temp_path

TEMPLATE_VERSIONS = ("v7", "v11", "v13")
OLLAMA_REQUIRES = "0.14.0"
# Our SamplingParams names -> Ollama's PARAMETER names.
_PARAMETERS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
               "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n"}


def template_version(tokenizer_version: str) -> str | None:
    """Which of our Ollama templates encodes a mistral-common tokenizer version (v14+ are v13's format)."""
    if tokenizer_version in TEMPLATE_VERSIONS:
        return tokenizer_version
    digits = tokenizer_version[1:] if tokenizer_version.startswith("v") else ""
    return "v13" if digits.isdigit() and int(digits) > 13 else None


def ollama_template(version: str) -> str:
    """The Go template for a format; no trailing newline (it would be text after the last turn)."""
    path = resources.files("devstral.templates") / f"ollama_{version}.gotmpl"
    return path.read_text(encoding="utf-8").rstrip("\n")


def quote(value: str, what: str) -> str:
    """A Modelfile argument that Ollama's parser reads back as exactly `value`."""
    if '"""' in value:
        raise DevstralError(f"Modelfile: the {what} contains three double quotes, which a Modelfile cannot hold")
    if "\n" in value or '"' in value or value != value.strip() or not value or value.startswith("#"):
        return f'"""{value}"""'
    return value


def _number(v: Any) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))


def modelfile_text(gguf: Path, *, modelfile_dir: Path, tokenizer_version: str, sampling: dict[str, Any],
                   system: str | None, num_ctx: int | None) -> str:
    """The Modelfile's text (see the module docstring); FROM is relative when the GGUF sits beside it."""
    gguf = Path(gguf).resolve()
    where = f"./{gguf.name}" if gguf.parent == Path(modelfile_dir).resolve() else str(gguf)
    lines = ["# Written by devstral. Create the model with: ollama create NAME -f THIS_FILE", f"FROM {where}"]
    version = template_version(tokenizer_version)
    if version is not None:
        lines.append(f"REQUIRES {OLLAMA_REQUIRES}")
        lines.append(f"TEMPLATE {quote(ollama_template(version), 'template')}")
        if version == "v13":
            lines.append("PARSER ministral")
    else:
        print(f"note: no Ollama template for tokenizer {tokenizer_version}; Ollama will use the GGUF's own",
              file=sys.stderr)
    for ours, theirs in _PARAMETERS.items():
        if sampling.get(ours) is not None:
            lines.append(f"PARAMETER {theirs} {_number(sampling[ours])}")
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    for stop in sampling.get("stop") or []:
        lines.append(f"PARAMETER stop {quote(stop, 'stop string')}")
    if system:
        lines.append(f"SYSTEM {quote(system, 'system prompt')}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf: str | os.PathLike, path: str | os.PathLike, **kw: Any) -> Path:
    """Write the Modelfile for `gguf` at `path` atomically (see `modelfile_text` for the keywords)."""
    path = Path(path)
    text = modelfile_text(Path(gguf), modelfile_dir=path.parent, **kw)
    tmp = temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
