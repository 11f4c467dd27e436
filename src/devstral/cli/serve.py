"""`devstral serve`: an OpenAI- and Ollama-compatible HTTP server for one model."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import typer

from devstral.cli.app import app
from devstral.cli.options import (
    BACKEND_OPTION,
    GPU_MEMORY_OPTION,
    MMPROJ_OPTION,
    QUANTIZE_ON_LOAD,
    SPECULATIVE_OPTION,
    TENSOR_PARALLEL_OPTION,
    THREADS_OPTION,
    VISION_OPTION,
    apply_threads,
)
from devstral.errors import DevstralError


def served_model_id(model: str) -> str:
    """The name clients use by default: the folder or file name for a local path, else what was given."""
    path = Path(model).expanduser()
    if path.exists():
        path = path.resolve()
        return path.stem if path.is_file() else path.name
    return model


@app.command()
def serve(
    model: str = typer.Option("nano", "--model", "-m", help="Model folder, .gguf file, org/repo, or 'nano'."),
    adapter: Path | None = typer.Option(None, help="LoRA adapter folder (PEFT format) to apply."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="auto, fp32, bf16 or fp16."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server to your network."),
    port: int = typer.Option(8080, min=0, max=65535),
    api_key: str | None = typer.Option(None, envvar="DEVSTRAL_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on every route but /health."),
    ctx_size: int | None = typer.Option(None, "--ctx-size", "-c", min=1, help="Context length per request."),
    parallel: int = typer.Option(1, "--parallel", "-np", min=1,
                                 help="Requests batched together in each forward pass."),
    queue_size: int = typer.Option(64, min=0, help="Requests that may wait for a slot before 503s."),
    alias: str | None = typer.Option(None, help="Model name to report and accept (default: the model's name)."),
    kv_cache_dtype: str = typer.Option("auto", help="auto, bf16, fp16, fp32, fp8 (CUDA), q8_0 or q4_0."),
    quantize_on_load: str | None = QUANTIZE_ON_LOAD,
    max_body_mb: float = typer.Option(16.0, min=0.001, help="Largest request body accepted, in MiB."),
    body_timeout: float = typer.Option(30.0, min=0, help="Seconds a request body may take to arrive (0: no limit)."),
    allowed_host: list[str] = typer.Option(
        [], "--allowed-host", help="Another host name clients may use (Host and Origin headers), besides "
                                   "localhost and the bound address; repeatable; '*' allows any."),
    strict_tools: bool = typer.Option(False, "--strict-tools", help="Constrain tool calls to the declared "
                                      "tools and their schemas under tool_choice 'auto' too."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    keep_alive: str = typer.Option("-1", help="How long an idle model stays in memory (Ollama durations: 5m, "
                                              "1h, 0; -1: forever). Requests may set their own."),
    remote: str | None = typer.Option(None, help="An OpenAI-compatible base URL (…/v1) that --route may forward "
                                                 "requests to. Off by default: nothing leaves the machine."),
    remote_key_env: str | None = typer.Option(None, help="Environment variable holding the remote's API key."),
    route: str | None = typer.Option(None, help="What goes to --remote: alias=NAME[:UPSTREAM] (that model name), "
                                                "prompt>N (prompts over N tokens); comma-separated."),
    speculative: str = SPECULATIVE_OPTION,
    backend: str = BACKEND_OPTION,
    gpu_memory_fraction: float = GPU_MEMORY_OPTION,
    max_batched_tokens: int | None = typer.Option(None, "--max-batched-tokens", min=16,
                                                  help="Tokens per forward pass (prompt chunks and decodes "
                                                       "together); default 8192 on CUDA, 512 on the CPU."),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache",
                                      help="Reuse the KV cache of prompt prefixes seen before (agent turns)."),
    threads: int | None = THREADS_OPTION,
    mmproj: Path | None = MMPROJ_OPTION,
    vision: bool = VISION_OPTION,
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image URLs in "
                                             "requests (network use); otherwise images come as data: URLs."),
    tensor_parallel: int | None = TENSOR_PARALLEL_OPTION,
) -> None:
    """Serve a model over HTTP: /v1/chat/completions, /v1/completions, /api/chat, /api/generate, ..."""
    import uvicorn

    import devstral
    from devstral.server import ServerConfig, create_app

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    from devstral.server.remote import RemoteConfig
    from devstral.server.residency import keep_alive_seconds

    remote_config = RemoteConfig.from_cli(remote, route, remote_key_env)
    try:
        idle = keep_alive_seconds(keep_alive)
    except Exception:
        raise DevstralError(f"--keep-alive: {keep_alive!r} is not a duration (e.g. 5m, 1h, 0, -1)") from None

    apply_threads(threads)

    def load():  # also how keep_alive reloads the weights it unloaded
        return devstral.load(model, adapter=adapter, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                             max_context=ctx_size, parallel=parallel, speculative=speculative,
                             gpu_memory_fraction=gpu_memory_fraction, max_batched_tokens=max_batched_tokens,
                             prefix_caching=prefix_cache, backend=backend,
                             quantize_on_load=quantize_on_load, mmproj=mmproj, vision=vision,
                             tensor_parallel=tensor_parallel)

    sock = bind(host, port)  # before the model loads: a busy port is reported at once, not minutes later
    try:
        llm = load()
        config = ServerConfig(model_id=served_model_id(model), alias=alias, api_key=api_key, parallel=parallel,
                              max_queue=queue_size, max_body_bytes=int(max_body_mb * 1024 * 1024),
                              # a tensor-parallel model stays loaded: its other ranks hold their shards
                              loader=None if getattr(llm, "tp", None) is not None else load,
                              keep_alive=idle, remote=remote_config, strict_tools=strict_tools, host=host,
                              allowed_hosts=allowed_host, body_timeout_s=body_timeout or None,
                              allow_remote_images=allow_remote_images)
        server = uvicorn.Server(uvicorn.Config(create_app(llm, config), host=host, port=port, log_level=log_level))
        server.run(sockets=[sock])
    finally:
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it), or one line saying why it cannot be."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise DevstralError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse TIME_WAIT ports
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = " (another server is using it; pick another with --port)" if e.errno == errno.EADDRINUSE else ""
        raise DevstralError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock
