"""A live devstral server on 127.0.0.1 (random free port, tiny random model) shared by the server tests.

Started once per test process in a background thread (uvicorn.Server), stopped at exit. A second,
strict server (API key, alias, one slot, no waiting line, small body limit) covers the limits.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

CTX = 256
API_KEY = "sk-test-123"
ALIAS = "devstral-test"
BODY_LIMIT = 64 * 1024


@dataclass
class Live:
    url: str
    llm: Any
    server: Any
    thread: threading.Thread

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def checkpoint() -> Path:
    from devstral.testing import make_tiny_checkpoint

    root = Path(tempfile.mkdtemp(prefix="devstral-serve-"))
    atexit.register(shutil.rmtree, root, True)
    return make_tiny_checkpoint(root / "tiny", seed=1)


def load_llm(ctx: int = CTX):
    import devstral

    return devstral.load(str(checkpoint()), max_context=ctx)


@functools.cache
def reference_llm():
    """A separate instance for expected outputs, never touched by the server's worker thread."""
    return load_llm()


@functools.cache
def _store_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="devstral-store-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def _start(ctx: int = CTX, llm: Any = None, model_id: str = "tiny", **config: Any) -> Live:
    import uvicorn

    from devstral.server import ServerConfig, create_app

    llm = llm if llm is not None else load_llm(ctx)
    config.setdefault("store_dir", _store_dir())  # never the user's own model store
    app = create_app(llm, ServerConfig(model_id=model_id, **config))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    atexit.register(stop)
    return Live(f"http://127.0.0.1:{port}", llm, server, thread)


@functools.cache
def live() -> Live:
    return _start(parallel=4, max_queue=64)


@functools.cache
def strict() -> Live:
    return _start(parallel=1, max_queue=0, api_key=API_KEY, alias=ALIAS, max_body_bytes=BODY_LIMIT)


@functools.cache
def nano() -> Live:
    """The embedded `nano` model (random weights, Devstral Small 2's shape, tekken v13) served with
    --strict-tools: what structured output must hold up against is a model that writes anything."""
    import devstral

    return _start(llm=devstral.load("nano", max_context=1024), model_id="nano", parallel=4, max_queue=64,
                  strict_tools=True)


@functools.cache
def fuzz_target() -> Live:
    """A small context keeps every generation a fuzzer can ask for short."""
    return _start(ctx=40, parallel=2, max_queue=64, max_body_bytes=BODY_LIMIT)


@contextmanager
def forced_output(token_ids: list[int], delay_s: float = 0.0):
    """Make every sampler created inside the block emit `token_ids`, then EOS (delay_s: a slower model,
    for tests that must act while a generation is still running).

    The model still runs; only the choice of token is replaced, so the server's whole production
    path (detokenizing, tool-call parsing, chunking, JSON shapes) is what is under test. Where a
    grammar constraint masks the wanted token out (its logit is -inf), the best allowed token is
    taken instead: the model "wanted" to write it and the grammar did not let it.
    """
    from devstral.testing import patched_sampler

    eos = reference_llm().tokenizer.eos_id
    scripts: dict[int, tuple[list[int], Any]] = {}  # per sequence (its token list), kept alive with it

    def pick(logits: Any, params: Any, history: list[int]) -> int:
        _, ids = scripts.setdefault(id(history), (history, iter(token_ids)))
        token = next(ids, eos)
        if delay_s:
            time.sleep(delay_s)
        if token < logits.shape[-1] and logits[token] == float("-inf"):  # masked out by a grammar
            return int(logits.argmax())
        return token

    with patched_sampler(pick):
        yield


def tool_call_ids(calls: list[tuple[str, str]], content: str = "") -> list[int]:
    """Token ids of `content[TOOL_CALLS]name[ARGS]{json}...` in the v13 format the tiny model uses."""
    tok = reference_llm().tokenizer
    ids = tok.encode(content) if content else []
    for name, arguments in calls:
        ids += [tok.special_id("[TOOL_CALLS]"), *tok.encode(name), tok.special_id("[ARGS]"), *tok.encode(arguments)]
    return ids


def wait_idle(server: Live, timeout: float = 10.0) -> dict[str, Any]:
    """/health once no slot is busy and nothing waits (a cancelled job frees its slot within a step)."""
    deadline = time.monotonic() + timeout
    with server.client(headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        while True:
            health = c.get("/health").json()
            if health["slots_processing"] == 0 and health["queue_depth"] == 0 or time.monotonic() > deadline:
                return health
            time.sleep(0.05)


# ---------------------------------------------------------------- the harness's own checks
def test_health_and_models_report_the_loaded_model():
    server = live()
    with server.client() as c:
        assert c.get("/health").json()["status"] == "ok"
        models = c.get("/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == "tiny" and card["context_length"] == CTX


def test_metrics_are_prometheus_text_and_count_requests_and_tokens():
    server = live()
    with server.client() as c:
        before = _metric(c.get("/metrics").text, "devstral_completion_tokens_total")
        r = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200
        text = c.get("/metrics").text
    assert "# TYPE devstral_requests_total counter" in text
    assert 'devstral_requests_total{route="/v1/completions",status="200"}' in text
    n_out = r.json()["usage"]["completion_tokens"]
    assert _metric(text, "devstral_completion_tokens_total") == before + n_out
    for name in ("devstral_queue_depth", "devstral_tokens_per_second", "devstral_prompt_tokens_total"):
        assert _metric(text, name) >= 0
    for line in text.splitlines():  # every sample line is `name{labels} number`
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics")
