"""Schemathesis over the server's own OpenAPI schema: no generated request may cause a 5xx.

Driven through hypothesis directly (one test per operation) rather than schemathesis' pytest
plugin, which does not load under this pytest.
"""

from __future__ import annotations

import functools
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from test_server_harness import fuzz_target

EXAMPLES = int(os.environ.get("DEVSTRAL_FUZZ_EXAMPLES", "8"))


@functools.cache
def openapi_schema():
    return schemathesis.openapi.from_url(fuzz_target().url + "/openapi.json")


def operations() -> list[tuple[str, str, GenerationMode]]:
    """Every operation with valid data; those with a JSON body with invalid data too."""
    from devstral.server import ServerConfig, create_app
    from test_server_harness import load_llm

    spec = create_app(load_llm(40), ServerConfig(model_id="tiny")).openapi()
    # /api/pull downloads from the hub (the one route that may use the network): tested with a stub instead
    ops = sorted((path, method.upper()) for path, item in spec["paths"].items() for method in item
                 if path != "/api/pull")
    return [(path, method, mode) for path, method in ops
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            if mode is GenerationMode.POSITIVE or method == "POST"]


@pytest.mark.parametrize(("path", "method", "mode"), operations())
def test_no_request_makes_the_server_fail(path, method, mode):
    operation = openapi_schema()[path][method]
    url = fuzz_target().url

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(base_url=url, timeout=30)
        assert response.status_code < 500, f"{method} {path} -> {response.status_code}: {response.text[:300]}"
        if response.status_code >= 400:
            body = response.json()
            assert "error" in body, body

    check()
