"""The local model store: named models (Ollama's `pull`, `copy`, `create`, `delete`, `tags`) kept as
one JSON index under the user's data folder.

An entry names where the weights are (a folder or a .gguf file: the Hugging Face cache for a pulled
model, the user's own path for a created one) plus what a Modelfile adds: a system prompt and
sampling parameters. Copying or deleting an entry never touches the weights. `--model NAME` and
`devstral.load("NAME")` resolve store names. Only `pull` reaches the network, through formats/hub.py.

Location: $DEVSTRAL_HOME/models.json, else $XDG_DATA_HOME/devstral/models.json, else
~/.local/share/devstral/models.json. Writes go to a temp file renamed over the index, under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devstral.errors import DevstralError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}(:[A-Za-z0-9._-]{1,100})?$")
PARAMETERS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float,
              "repeat_last_n": int, "seed": int, "num_predict": int, "num_ctx": int, "stop": list}


def store_dir() -> Path:
    if os.environ.get("DEVSTRAL_HOME"):
        return Path(os.environ["DEVSTRAL_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "devstral"


def canonical(name: str) -> str:
    """Ollama's rule: a name without a tag means ':latest'."""
    name = name.strip()
    if not NAME.match(name):
        raise DevstralError(f"invalid model name {name!r} (letters, digits, '._-/' and one ':tag')")
    return name if ":" in name else name + ":latest"


@dataclass
class StoreEntry:
    name: str
    path: str  # a model folder or a .gguf file
    source: str  # "hub:org/repo[:QUANT]", "path", or "copy:NAME"
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    @property
    def digest(self) -> str:
        blob = json.dumps([self.path, self.system, self.parameters], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def size(self) -> int:
        p = Path(self.path)
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.glob("*") if f.is_file()) if p.is_dir() else 0


def check_parameters(parameters: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (parameters or {}).items():
        kind = PARAMETERS.get(key)
        if kind is None:
            raise DevstralError(f"parameters.{key}: unknown parameter (known: {', '.join(sorted(PARAMETERS))})")
        if kind is list:
            value = [value] if isinstance(value, str) else list(value)
        elif kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
            raise DevstralError(f"parameters.{key}: expected an integer, got {value!r}")
        elif kind is float and not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DevstralError(f"parameters.{key}: expected a number, got {value!r}")
        out[key] = value
    return out


class ModelStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else store_dir()
        self.index = self.root / "models.json"

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.index.is_file():
            return {}
        try:
            data = json.loads(self.index.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DevstralError(f"{self.index}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return data.get("models", {}) if isinstance(data, dict) else {}

    def list(self) -> list[StoreEntry]:
        return [StoreEntry(**e) for e in sorted(self._read().values(), key=lambda e: e["name"])]

    def get(self, name: str) -> StoreEntry | None:
        """The entry called `name`, or None (also for a string that cannot be a name, such as a path)."""
        try:
            key = canonical(name)
        except DevstralError:
            return None
        entry = self._read().get(key)
        return StoreEntry(**entry) if entry else None

    @contextlib.contextmanager
    def _locked_models(self) -> Iterator[dict[str, dict[str, Any]]]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            models = self._read()
            yield models
            tmp = self.index.with_suffix(".tmp")
            tmp.write_text(json.dumps({"models": models}, indent=2, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, self.index)

    def add(self, name: str, path: str | Path, source: str, *, system: str | None = None,
            parameters: dict[str, Any] | None = None) -> StoreEntry:
        p = Path(path).expanduser()
        if not p.exists():
            raise DevstralError(f"{p}: no such model folder or file")
        entry = StoreEntry(canonical(name), str(p.resolve()), source, system, check_parameters(parameters),
                           time.time())
        with self._locked_models() as models:
            models[entry.name] = asdict(entry)
        return entry

    def copy(self, source: str, destination: str) -> StoreEntry:
        with self._locked_models() as models:
            entry = models.get(canonical(source))
            if entry is None:
                raise DevstralError(f"model {source!r} not found in the store")
            new = {**entry, "name": canonical(destination), "source": f"copy:{entry['name']}",
                   "created_at": time.time()}
            models[new["name"]] = new
        return StoreEntry(**new)

    def delete(self, name: str) -> None:
        with self._locked_models() as models:
            if models.pop(canonical(name), None) is None:
                raise DevstralError(f"model {name!r} not found in the store")

    def pull(self, spec: str) -> StoreEntry:
        """Download through formats/hub.py (the only network access) and name the result `spec`."""
        from devstral.formats.hub import download

        return self.add(spec, download(spec), f"hub:{spec}")
