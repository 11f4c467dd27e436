"""Secret masking: the second line of defence, behind the command environment's allowlist.

Everything the model sees and everything written to a trajectory (which is training data) passes
through `SecretMasker.mask`, which replaces with `<secret-hidden>`:
- values of environment variables whose names say KEY, TOKEN, SECRET, PASSWORD, PAT, AUTH ... (the
  agent's own, and those a command exports), and values added by hand (the agent's `--api-key`);
- those values' base64 (standard and URL-safe, at every alignment, across line wraps) and hex copies,
  for values of 8 characters or more;
- passwords inside URLs (`postgres://user:PASSWORD@host`), whatever variable or file they came from;
- tokens of well-known formats (GitHub, GitLab, OpenAI, Anthropic, Hugging Face, Slack, AWS access key
  ids, Google API keys, npm, PyPI, JWTs) and PEM private key blocks.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW(OR)?D|PASSPHRASE|CREDENTIAL|"
                         r"(^|_)(PAT|AUTH|DSN|COOKIE|PRIVATE|SESSION_ID)(_|$)", re.IGNORECASE)
MASK = "<secret-hidden>"
# Shorter values ("1", "yes") would mask ordinary text everywhere.
MIN_SECRET_LENGTH = 6
# An encoded copy shorter than this could match by chance.
MIN_ENCODED_LENGTH = 8

_URL_PASSWORD = re.compile(r"(?<=://)([^\s:/@'\"]*):([^\s/@'\"]+)(?=@)")
_TOKEN_FORMATS = re.compile("|".join([
    r"\bgh[pousr]_[A-Za-z0-9]{36,}",
    r"\bgithub_pat_[A-Za-z0-9_]{22,}",
    r"\bglpat-[A-Za-z0-9_-]{20,}",
    r"\bsk-(?:proj-|ant-|svcacct-)?[A-Za-z0-9_-]{20,}",
    r"\bhf_[A-Za-z0-9]{30,}",
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\bAIza[0-9A-Za-z_-]{35}",
    r"\bnpm_[A-Za-z0-9]{36}",
    r"\bpypi-[A-Za-z0-9_-]{50,}",
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    # A private key block, or the start of one cut off by truncation.
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|.*\Z)",
]), re.DOTALL)


class SecretMasker:
    def __init__(self, env: Mapping[str, str] | None = None):
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        if env:
            self.add_from_env(env)

    def add_from_env(self, env: Mapping[str, str]) -> None:
        """Values of secret-named variables, and passwords in any variable's URLs."""
        new = set()
        for name, value in env.items():
            if SECRET_NAME.search(name):
                new.add(value)
            new.update(m.group(2) for m in _URL_PASSWORD.finditer(value))
        self.add_values(new)

    def add_values(self, values: set[str] | list[str] | tuple[str, ...]) -> None:
        new = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH} - self._values
        if not new:
            return
        self._values |= new
        literal = sorted(self._values, key=len, reverse=True)
        encoded = sorted({e for v in self._values for e in _encoded_copies(v)}, key=len, reverse=True)
        # Longest first, so that a secret containing another is hidden whole. Encoded copies may be
        # wrapped over lines (base64 wraps at 76 columns).
        alternatives = [re.escape(v) for v in literal] + ["\n?".join(map(re.escape, e)) for e in encoded]
        self._pattern = re.compile("|".join(alternatives))

    def mask(self, text: str) -> str:
        if not text:
            return text
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        text = _TOKEN_FORMATS.sub(MASK, text)
        return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{MASK}", text)

    def mask_json(self, value: Any) -> Any:
        """Mask every string inside a JSON-like structure (messages, tool calls)."""
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, list):
            return [self.mask_json(v) for v in value]
        if isinstance(value, dict):
            return {k: self.mask_json(v) for k, v in value.items()}
        return value


def _encoded_copies(secret: str) -> set[str]:
    """Substrings that any base64 or hex encoding of a text containing `secret` must contain."""
    raw = secret.encode("utf-8", errors="surrogatepass")
    copies = {raw.hex(), raw.hex().upper()}
    for offset in range(3):
        # Base64 encodes 3-byte groups; a group mixing the secret with its neighbours varies, so only
        # the groups made of secret bytes alone are certain to appear.
        padded = b"\0" * offset + raw
        whole_groups = len(padded) // 3
        encoded = base64.b64encode(padded[: whole_groups * 3]).decode("ascii")
        core = encoded[4 if offset else 0:]
        copies |= {core, core.replace("+", "-").replace("/", "_")}
    return {c for c in copies if len(c) >= MIN_ENCODED_LENGTH}
