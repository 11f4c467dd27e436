"""`devstral template`: the exact prompt text and ids for an OpenAI-style request (like llama.cpp's /apply-template)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from devstral.cli.app import app
from devstral.errors import DevstralError


def read_request(path: str) -> dict:
    """An OpenAI chat request ({"messages": [...], "tools": [...]}, or just the list of messages)."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as e:
        raise DevstralError(f"{path}: cannot read the request: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DevstralError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DevstralError(f"{path}, line {e.lineno}: not valid JSON: {e.msg}") from None
    except RecursionError:
        raise DevstralError(f"{path}: not valid JSON (nested too deeply)") from None
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise DevstralError(f"{path}: expected an object with a 'messages' list")
    return data


@app.command()
def template(
    request: str = typer.Option(..., "--request", "-r", help="JSON file with messages (and tools); '-' reads stdin."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model folder, .gguf file or org/repo."),
    mmproj: Path = typer.Option(None, "--mmproj", help="The vision projector GGUF of a GGUF model (else the one "
                                "beside it): image parts show as the image tokens the model sees."),
    system: str | None = typer.Option(None, "--system", help="Use this system prompt instead of the model's."),
    no_system: bool = typer.Option(False, "--no-system", help="Send no default system prompt."),
    as_json: bool = typer.Option(False, "--json", help="Print {prompt, token_ids, ...} as JSON."),
) -> None:
    """Print the exact prompt (text and token ids) the model sees for a chat request; an image part is its
    [IMG]/[IMG_BREAK]/[IMG_END] tokens, as the model's vision encoder lays it out."""
    from devstral.loader import load_prompt_encoder
    from devstral.prompt.system_prompt import resolve

    data = read_request(request)
    tok = load_prompt_encoder(model, mmproj=mmproj)  # folders and .gguf files alike, without the weights
    tok.default_system_prompt = resolve(tok.default_system_prompt, system, no_system)
    ids = tok.encode_chat(data["messages"], data.get("tools"))
    prompt = tok.decode(ids, special=True)
    if as_json:
        print(json.dumps({"prompt": prompt, "token_ids": ids, "num_tokens": len(ids),
                          "tokenizer_version": tok.version}, ensure_ascii=False))
        return
    print(prompt)
    print(f"\n--- {len(ids)} tokens (tokenizer {tok.version}) ---")
    print(" ".join(map(str, ids)))
