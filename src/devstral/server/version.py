"""The installed package's version, reported by the OpenAPI document and Ollama's /api/version."""

from __future__ import annotations


def server_version() -> str:
    try:
        from importlib.metadata import version

        return version("devstral")
    except Exception:
        return "0.0.0"
