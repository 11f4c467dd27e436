"""Hybrid local/cloud serving: which requests go to a remote OpenAI-compatible endpoint, and what is
hidden from it.

`serve --remote URL --route POLICY [--remote-key-env VAR]`. POLICY is a comma-separated list of:

- `alias=NAME` or `alias=NAME:UPSTREAM`: a request for model NAME goes to the remote, which is asked
  for UPSTREAM (default: NAME). Several aliases may be given.
- `prompt>N`: a request whose prompt is longer than N tokens (by this model's tokenizer) goes to the
  remote too, as the first alias's upstream model.

Everything else is answered locally. Without --remote nothing is ever forwarded and the server
opens no outbound connection. What is forwarded has secrets masked (the values of environment
variables named like keys, tokens or passwords, and well-known credential formats); the client's
own Authorization header is never forwarded: the remote gets `Bearer $VAR` when --remote-key-env is
given, and nothing otherwise.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from devstral.errors import DevstralError

# Credential shapes worth hiding even when they are not in this machine's environment.
CREDENTIAL_PATTERNS = [
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    r"\bsk-[A-Za-z0-9_-]{20,}",  # OpenAI, Anthropic, Mistral-style secret keys
    r"\bgh[pousr]_[A-Za-z0-9]{30,}", r"\bgithub_pat_[A-Za-z0-9_]{20,}",
    r"\bAKIA[0-9A-Z]{16}\b", r"\bxox[abprs]-[A-Za-z0-9-]{10,}", r"\bhf_[A-Za-z0-9]{30,}",
    r"\bAIza[0-9A-Za-z_-]{35}\b", r"\bglpat-[A-Za-z0-9_-]{20,}",
]
ROUTED_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/fim/completions"}
# Routes whose prompt size can send them out (a /v1/responses chain lives here, so only an alias moves it).
SIZED_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/fim/completions"}


@dataclass
class RoutePolicy:
    aliases: dict[str, str] = field(default_factory=dict)  # local name -> upstream model
    max_local_prompt: int | None = None

    @classmethod
    def parse(cls, text: str) -> RoutePolicy:
        policy = cls()
        for raw in text.split(","):
            term = raw.strip()
            if term.startswith("alias="):
                name, _, upstream = term[len("alias="):].partition(":")
                if not name:
                    raise DevstralError(f"--route: {term!r}: alias needs a name (alias=NAME or alias=NAME:UPSTREAM)")
                policy.aliases[name] = upstream or name
            elif term.startswith("prompt>"):
                value = term[len("prompt>"):]
                if not value.isdigit() or int(value) < 1:
                    raise DevstralError(f"--route: {term!r}: expected prompt>N with N a number of tokens")
                policy.max_local_prompt = int(value)
            else:
                raise DevstralError(f"--route: unknown term {term!r} (use alias=NAME[:UPSTREAM] and/or prompt>N)")
        if policy.max_local_prompt is not None and not policy.aliases:
            raise DevstralError("--route: prompt>N needs an alias=NAME:UPSTREAM term to name the remote model")
        return policy

    @property
    def default_upstream(self) -> str:
        return next(iter(self.aliases.values()))


@dataclass
class RemoteConfig:
    url: str  # an OpenAI-compatible base URL, as given to an OpenAI client (ends with /v1)
    policy: RoutePolicy
    api_key: str | None = None  # read from --remote-key-env at startup, never from the request

    @classmethod
    def from_cli(cls, url: str | None, route: str | None, key_env: str | None,
                 env: Mapping[str, str] | None = None) -> RemoteConfig | None:
        env = os.environ if env is None else env
        if url is None:
            if route or key_env:
                raise DevstralError("--route and --remote-key-env need --remote URL")
            return None
        if not re.match(r"^https?://[^\s/]+", url):
            raise DevstralError(f"--remote: {url!r} is not an http(s) URL")
        if not route:
            raise DevstralError("--remote needs --route POLICY (e.g. --route alias=cloud:devstral-medium-latest)")
        key = None
        if key_env:
            key = env.get(key_env)
            if not key:
                raise DevstralError(f"--remote-key-env: environment variable {key_env} is not set")
        return cls(url.rstrip("/"), RoutePolicy.parse(route), key)

    def target(self, path: str) -> str:
        return self.url + path.removeprefix("/v1")


class Masker:
    """Secret values from the environment (agent/secrets.py's rule) and credential-shaped strings."""

    def __init__(self, env: Mapping[str, str] | None = None, extra: list[str] | None = None):
        from devstral.agent.secrets import MASK, SecretMasker

        self.mask_text = MASK
        self.env = SecretMasker(os.environ if env is None else env)
        self.shapes = re.compile("|".join(CREDENTIAL_PATTERNS))
        self.extra = [e for e in (extra or []) if e]

    def mask(self, text: str) -> str:
        for value in self.extra:
            text = text.replace(value, self.mask_text)
        return self.shapes.sub(self.mask_text, self.env.mask(text))

    def mask_json(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, list):
            return [self.mask_json(v) for v in value]
        if isinstance(value, dict):
            return {k: self.mask_json(v) for k, v in value.items()}
        return value
