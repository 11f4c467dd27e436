"""Ollama's model information: `HEAD /`, `GET /api/tags`, `GET /api/ps`, `POST /api/show`, `GET /api/version`.

`/api/tags` lists the served model and the local model store; `/api/ps` lists the model only while
its weights are in memory (keep_alive can unload them) with the time they expire; `/api/show`
returns the chat template our GGUF export writes for this tokenizer (tools included), which is
how clients such as litellm decide that a model can call tools.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request, Response

from devstral.prompt.fim import supports_fim
from devstral.server.errors import APIError
from devstral.server.images import takes_images
from devstral.server.residency import rfc3339
from devstral.server.schemas import OllamaShowRequest
from devstral.server.state import ServerState, state_of
from devstral.server.validation import check_model
from devstral.server.version import server_version

router = APIRouter()
NEVER = "2318-01-01T00:00:00Z"  # what a keep_alive that never expires reports (Ollama shows a far date too)


def details(state: ServerState) -> dict[str, Any]:
    cfg = state.llm.config
    n = cfg.n_params
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
    dtype = str(state.llm.dtype).removeprefix("torch.").replace("float", "F").replace("bF", "BF")
    return {"parent_model": "", "format": "gguf" if str(state.llm.path or "").endswith(".gguf") else "safetensors",
            "family": cfg.arch, "families": [cfg.arch], "parameter_size": size, "quantization_level": dtype}


def size_bytes(state: ServerState) -> int:
    return sum(p.numel() * p.element_size() for p in state.llm.model.parameters())


def chat_template(llm: Any) -> str:
    """The template a GGUF of this model carries: its own if it is a GGUF, else the one our export writes."""
    tok = llm.tokenizer
    own = getattr(tok, "chat_template", None)
    if isinstance(own, str) and own:
        return own
    from devstral.formats.gguf_chat import builtin_template, template_version_for

    version = template_version_for(getattr(tok, "version", "") or "")
    builtin = builtin_template(version) if version else None
    if builtin:
        return builtin
    folder = getattr(tok, "folder", None)
    if folder is not None:
        from devstral.prompt.hf_tokenizer import read_chat_templates

        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        templates = read_chat_templates(folder, config)
        return templates.get("default") or next(iter(templates.values()), "")
    return ""


def capabilities(llm: Any, template: str) -> list[str]:
    tok = llm.tokenizer
    caps = ["completion"]
    if "tools" in template or tok.special_id("[TOOL_CALLS]") is not None:
        caps.append("tools")
    if supports_fim(tok):
        caps.append("insert")  # Ollama's name for fill-in-the-middle (`suffix`)
    if takes_images(llm):
        caps.append("vision")  # what Ollama clients (Open WebUI, the ollama CLI) check before sending images
    if tok.special_id("[THINK]") is not None:
        caps.append("thinking")
    return caps


@router.head("/")
async def heartbeat():
    """Ollama clients check that the server is up with HEAD /."""
    return Response(status_code=200)


@router.get("/api/tags")
async def tags(request: Request):
    state = state_of(request)
    modified = datetime.fromtimestamp(state.config.created, timezone.utc).isoformat().replace("+00:00", "Z")
    models = [{"name": state.name, "model": state.name, "modified_at": modified, "size": size_bytes(state),
               "digest": "", "details": details(state)}]
    for entry in state.store.list():
        if entry.name.removesuffix(":latest") in state.names:
            continue
        models.append({"name": entry.name, "model": entry.name, "modified_at": rfc3339(entry.created_at),
                       "size": entry.size(), "digest": entry.digest,
                       "details": {"parent_model": "", "format": "gguf" if entry.path.endswith(".gguf")
                                   else "safetensors", "family": "", "families": [], "parameter_size": "",
                                   "quantization_level": ""}})
    return {"models": models}


@router.get("/api/ps")
async def running(request: Request):
    state = state_of(request)
    residency = state.residency
    if not residency.loaded:
        return {"models": []}
    expires = NEVER if residency.expires_at is None else rfc3339(residency.expires_at)
    size = size_bytes(state)
    on_gpu = state.llm.device.type == "cuda"
    entry = {"name": state.name, "model": state.name, "size": size, "digest": "", "details": details(state),
             "expires_at": expires, "size_vram": size if on_gpu else 0, "context_length": state.llm.max_context}
    return {"models": [entry]}


@router.post("/api/show")
async def show(body: OllamaShowRequest, request: Request):
    state = state_of(request)
    requested = body.model or body.name
    if not requested:
        raise APIError(400, "model: field required", param="model")
    if requested.removesuffix(":latest") not in state.names and requested not in state.names:
        entry = state.store.get(requested) if requested else None
        if entry is not None:  # a stored model this server does not serve: what its entry says
            params = "\n".join(f"{k:<16}{v}" for k, v in entry.parameters.items())
            return {"modelfile": f"FROM {entry.path}\n", "parameters": params, "system": entry.system or "",
                    "template": "", "details": {"format": "gguf" if entry.path.endswith(".gguf") else "safetensors"},
                    "model_info": {}, "capabilities": ["completion"], "modified_at": rfc3339(entry.created_at)}
    check_model(requested, state.names)
    cfg, llm = state.llm.config, state.llm
    p = llm.default_sampling
    arch = cfg.arch
    info = {"general.architecture": arch, "general.parameter_count": cfg.n_params,
            f"{arch}.context_length": llm.max_context, f"{arch}.embedding_length": cfg.dim,
            f"{arch}.block_count": cfg.n_layers, f"{arch}.attention.head_count": cfg.n_heads,
            f"{arch}.attention.head_count_kv": cfg.n_kv_heads, f"{arch}.rope.freq_base": cfg.rope_theta,
            f"{arch}.vocab_size": cfg.vocab_size, "tokenizer.version": llm.tokenizer.version}
    parameters = "\n".join(f"{k:<16}{v}" for k, v in [("temperature", p.temperature), ("top_k", p.top_k),
                                                        ("top_p", p.top_p), ("min_p", p.min_p),
                                                        ("repeat_penalty", p.repeat_penalty),
                                                        ("num_ctx", llm.max_context)])
    template = chat_template(llm)
    return {"modelfile": f"FROM {state.config.model_id}\n", "parameters": parameters, "template": template,
            "system": llm.tokenizer.default_system_prompt or "",
            "details": details(state), "model_info": info, "capabilities": capabilities(llm, template),
            "modified_at": datetime.fromtimestamp(state.config.created, timezone.utc).isoformat()}


@router.get("/api/version")
async def version():
    return {"version": server_version()}
