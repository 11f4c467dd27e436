"""Ollama's model management over the local model store (devstral/store.py): pull, copy, delete, create.

`/api/pull` is the only route of the server that reaches the network, and only when it is called:
it downloads through formats/hub.py (Hugging Face `org/repo[:QUANT]`). The others only edit the
store's index; the served model stays what `--model` loaded (`devstral serve --model NAME` serves
a stored one).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import Field

from devstral.errors import DevstralError
from devstral.server.errors import APIError
from devstral.server.schemas import _Body
from devstral.server.sse import ndjson
from devstral.server.state import ServerState, state_of

router = APIRouter()
NDJSON = "application/x-ndjson"


class PullRequest(_Body):
    model: str | None = None
    name: str | None = None  # older clients
    insecure: bool = False
    stream: bool = True


class CopyRequest(_Body):
    source: str
    destination: str


class DeleteRequest(_Body):
    model: str | None = None
    name: str | None = None


class CreateRequest(_Body):
    model: str | None = None
    name: str | None = None
    from_: str | None = Field(default=None, alias="from")
    modelfile: str | None = None  # the legacy form: FROM / SYSTEM / PARAMETER lines
    system: str | None = None
    parameters: dict[str, Any] | None = None
    template: str | None = None
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    quantize: str | None = None
    messages: list[dict[str, Any]] | None = None
    license: str | list[str] | None = None
    stream: bool = True


def _name(model: str | None, name: str | None, field: str = "model") -> str:
    value = model or name
    if not value:
        raise APIError(400, f"{field}: field required", param=field)
    return value


def _progress(statuses: list[str], stream: bool):
    if not stream:
        return {"status": statuses[-1]}
    return StreamingResponse(iter([ndjson({"status": s}) for s in statuses]), media_type=NDJSON)


def _user_error(e: DevstralError, param: str, status: int = 400) -> APIError:
    return APIError(404 if "not found" in str(e) else status, str(e), param=param)


@router.post("/api/pull")
async def pull(body: PullRequest, request: Request):
    state = state_of(request)
    spec = _name(body.model, body.name)
    if not body.stream:
        try:
            await run_in_threadpool(state.store.pull, spec)
        except DevstralError as e:
            raise _user_error(e, "model") from None
        return {"status": "success"}

    async def stream() -> AsyncIterator[str]:
        yield ndjson({"status": "pulling manifest"})
        try:
            entry = await run_in_threadpool(state.store.pull, spec)
        except DevstralError as e:
            yield ndjson({"error": str(e)})
            return
        yield ndjson({"status": f"writing manifest for {entry.name}"})
        yield ndjson({"status": "success"})

    return StreamingResponse(stream(), media_type=NDJSON)


def _served_path(state: ServerState, name: str) -> str | None:
    """The served model's files, when `name` is the served model."""
    if name.removesuffix(":latest") in state.names and state.llm.path is not None:
        return str(state.llm.path)
    return None


@router.post("/api/copy")
async def copy(body: CopyRequest, request: Request):
    state = state_of(request)
    try:
        served = _served_path(state, body.source)
        if served is not None and state.store.get(body.source) is None:
            state.store.add(body.destination, served, f"copy:{body.source}")
        else:
            state.store.copy(body.source, body.destination)
    except DevstralError as e:
        raise _user_error(e, "source") from None
    return {}


@router.delete("/api/delete")
async def delete(body: DeleteRequest, request: Request):
    state = state_of(request)
    try:
        state.store.delete(_name(body.model, body.name))
    except DevstralError as e:
        raise _user_error(e, "model") from None
    return {}


_MODELFILE = re.compile(r"^\s*(FROM|SYSTEM|PARAMETER|TEMPLATE|ADAPTER|LICENSE|MESSAGE)\s+(.*)$", re.IGNORECASE)


def parse_modelfile(text: str) -> dict[str, Any]:
    """FROM, SYSTEM (one line or \"\"\"...\"\"\"), PARAMETER key value; the rest is refused by create()."""
    out: dict[str, Any] = {"parameters": {}}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _MODELFILE.match(line)
        if match is None:
            raise APIError(400, f"modelfile line {i}: expected FROM, SYSTEM or PARAMETER, got {line.strip()!r}",
                           param="modelfile")
        keyword, rest = match.group(1).upper(), match.group(2).strip()
        if rest.startswith('"""'):
            body = rest[3:]
            while '"""' not in body and i < len(lines):
                body += "\n" + lines[i]
                i += 1
            rest = body.split('"""', 1)[0]
        if keyword == "FROM":
            out["from"] = rest
        elif keyword == "SYSTEM":
            out["system"] = rest
        elif keyword == "PARAMETER":
            key, _, value = rest.partition(" ")
            value = value.strip().strip('"')
            try:
                parsed: Any = int(value)
            except ValueError:
                try:
                    parsed = float(value)
                except ValueError:
                    parsed = value
            if key == "stop":
                out["parameters"].setdefault("stop", []).append(str(parsed))
            else:
                out["parameters"][key] = parsed
        else:
            out[keyword.lower()] = rest
    return out


@router.post("/api/create")
async def create(body: CreateRequest, request: Request):
    state = state_of(request)
    name = _name(body.model, body.name)
    spec: dict[str, Any] = parse_modelfile(body.modelfile) if body.modelfile else {"parameters": {}}
    source = body.from_ or spec.get("from")
    system = body.system if body.system is not None else spec.get("system")
    parameters = {**spec["parameters"], **(body.parameters or {})}
    refused = {"files": body.files or None, "adapters": body.adapters or spec.get("adapter"),
               "quantize": body.quantize, "messages": body.messages,
               "template": body.template or spec.get("template")}
    for field, value in refused.items():
        if value:
            hint = {"quantize": "run `devstral quantize` and create from the .gguf it writes",
                    "template": "prompts are encoded with mistral-common, or the GGUF's own template",
                    "files": "create from a local folder or .gguf path instead (`from`)",
                    "adapters": "serve with --adapter DIR"}.get(field, "")
            raise APIError(400, f"{field}: not supported by this server" + (f" ({hint})" if hint else ""),
                           param=field)
    if not source:
        raise APIError(400, "from: which model to build on (a stored name, the served model, or a path)",
                       param="from")
    try:
        stored = state.store.get(source)
        path = stored.path if stored else _served_path(state, source) or source
        if stored is not None:
            system = system if system is not None else stored.system
            parameters = {**stored.parameters, **parameters}
        await run_in_threadpool(state.store.add, name, path, f"from:{source}", system=system, parameters=parameters)
    except DevstralError as e:
        raise _user_error(e, "from") from None
    return _progress(["using existing layers", "writing manifest", "success"], body.stream)
