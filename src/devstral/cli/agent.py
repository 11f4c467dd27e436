"""`devstral agent`: work on a task in a workspace with a local model or any OpenAI-compatible URL.

Exit codes: 0 the model finished, 1 a limit stopped it, 2 a usage error (bad flags, an unreachable
endpoint, no sandbox for --mode auto), 3 a crash (a bug: the traceback is printed).
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import traceback
from pathlib import Path

import typer

from devstral.cli.app import app
from devstral.cli.options import BACKEND_OPTION
from devstral.errors import DevstralError

CRASH_EXIT_CODE = 3
_SIZE = re.compile(r"\s*(\d+)\s*([kmg]i?b?|b)?\s*", re.IGNORECASE)


@app.command()
def agent(
    task: str = typer.Argument(None, help="The task. Without it, tasks are read from the terminal."),
    workspace: Path = typer.Option(Path("."), "--workspace", "-w", help="The folder the agent works in."),
    model: str = typer.Option(None, "--model", "-m", help="Run this model in process (folder, .gguf, org/repo; default: as devstral run, "
                                                    "$DEVSTRAL_MODEL or the embedded model)."),
    base_url: str = typer.Option(None, "--base-url", help="Use an OpenAI-compatible server instead, e.g. http://127.0.0.1:8080/v1."),
    api_key: str = typer.Option(None, "--api-key", envvar="DEVSTRAL_API_KEY", help="Bearer token for --base-url (prefer the DEVSTRAL_API_KEY variable)."),
    model_name: str = typer.Option(None, "--model-name", help="Model name sent to --base-url (default: the first one it lists)."),
    max_steps: int = typer.Option(100, "--max-steps", min=1, help="Stop after this many model calls per task."),
    max_time: float = typer.Option(None, "--max-time", min=1, help="Stop a task after this many seconds (model calls included)."),
    mode: str = typer.Option("confirm", "--mode", help="confirm (ask before commands and edits), auto, or read-only."),
    use_sandbox: bool = typer.Option(True, "--sandbox/--no-sandbox", help="Run commands in a bubblewrap sandbox (the default; required by --mode auto), or unconfined."),
    allow_network: bool = typer.Option(False, "--allow-network", help="Let commands reach the network (the sandbox has none)."),
    env: list[str] = typer.Option([], "--env", metavar="NAME[=VALUE]", help="Pass this variable to commands, which otherwise get only PATH, LANG and a private HOME. Repeatable."),
    allow_read: list[Path] = typer.Option([], "--allow-read", metavar="PATH", help="Show this path to commands, read-only, where the sandbox hides it (e.g. ~/.gitconfig). Repeatable."),
    max_output: str = typer.Option("64M", "--max-output", metavar="SIZE", help="Kill a command that prints more than this (bytes; K, M, G allowed)."),
    trajectory: Path = typer.Option(None, "--trajectory", "-t", help="Write the conversation here as fine-tuning JSONL."),
    temperature: float = typer.Option(0.15, "--temperature", min=0.0, help="Sampling temperature."),
    max_tokens: int = typer.Option(None, "--max-tokens", min=1, help="Cap on tokens per model reply."),
    device: str = typer.Option("auto", "--device", help="Device for --model (auto, cpu, cuda, cuda:1)."),
    backend: str = BACKEND_OPTION,
    soft_timeout: float = typer.Option(30.0, "--soft-timeout", min=0.1, help="Return a command's output after this many silent seconds."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print observations."),
) -> int:
    """Run a coding agent in WORKSPACE. Exit code 0 when it finished, 1 when a limit stopped it, 2 on a
    usage error, 3 when it crashed."""
    from devstral.agent import Mode
    from devstral.agent.terminal import stdin_is_terminal
    from devstral.agent.workspace import Workspace

    try:
        agent_mode = Mode(mode)
    except ValueError:
        raise DevstralError(f"--mode must be confirm, auto or read-only, got {mode!r}") from None
    if model is not None and base_url is not None:
        raise DevstralError("give --model (run in process) or --base-url (use a server), not both")
    if api_key and not base_url:
        raise DevstralError("--api-key only applies with --base-url")
    if backend != "auto" and base_url:
        raise DevstralError("--backend only applies with --model (the server at --base-url runs its own)")
    if base_url is not None:
        from devstral.agent.endpoint_model import normalize_base_url

        normalize_base_url(base_url)  # a malformed URL is a usage error, whatever else is wrong
    max_output_bytes = parse_size(max_output, "--max-output")
    ws = Workspace.open(workspace)
    interactive = task is None
    if (agent_mode is Mode.CONFIRM or interactive) and not stdin_is_terminal():
        raise DevstralError("confirm mode and interactive tasks need a terminal; pass a TASK with --mode auto or read-only")
    if task is not None and not task.strip():
        raise DevstralError("TASK is empty")
    for path in allow_read:
        if not path.expanduser().exists():
            raise DevstralError(f"--allow-read {path}: no such file or directory")
    import os

    from devstral.agent.environment import command_environment

    command_environment(os.environ, env)  # a bad --env fails here, before the model is loaded
    try:
        return _run(task, ws, agent_mode, model, base_url, api_key, model_name, max_steps, max_time, use_sandbox,
                    allow_network, env, [p.expanduser().resolve() for p in allow_read], max_output_bytes,
                    trajectory, temperature, max_tokens, device, backend, soft_timeout, quiet)
    except (DevstralError, typer.Exit, KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        # A bug, not a limit (1) or a usage error (2): keep the traceback for the report.
        traceback.print_exc()
        print(f"error: devstral agent crashed (a bug; exit code {CRASH_EXIT_CODE})", file=sys.stderr)
        raise typer.Exit(CRASH_EXIT_CODE) from None


def _run(task, ws, agent_mode, model, base_url, api_key, model_name, max_steps, max_time, use_sandbox, allow_network,
         env, allow_read, max_output_bytes, trajectory, temperature, max_tokens, device, backend, soft_timeout,
         quiet) -> int:
    import os

    from devstral.agent import (
        Agent,
        AgentLimits,
        Mode,
        Policy,
        SecretMasker,
        ToolBox,
        ToolLimits,
        TrajectoryWriter,
    )
    from devstral.agent.proc_scrub import scrub_secret
    from devstral.agent.sandbox import detect
    from devstral.agent.terminal import TerminalUI
    from devstral.agent.tools import SandboxOptions

    ui = TerminalUI(verbose=not quiet)
    if use_sandbox:
        status = detect()
        if not status.available:
            if agent_mode is Mode.AUTO:
                raise DevstralError(f"--mode auto runs commands without asking, so it needs a sandbox, and there is "
                                    f"none: {status.reason}. Install bubblewrap, or pass --no-sandbox to run "
                                    "commands unconfined.")
            ui.console.print(f"[yellow]warning:[/] no sandbox ({status.reason}); commands run unconfined")
            use_sandbox = False
    masker = SecretMasker(os.environ)
    if api_key:
        masker.add_values([api_key])
        # Commands could read it from /proc/<agent>/cmdline or /environ when they run unconfined.
        scrub_secret(api_key)
    chat_model = _make_model(model, base_url, api_key, model_name, temperature, max_tokens, device, backend)
    chat_model.check()  # an unreachable server fails here, before any step
    policy = Policy(agent_mode, ws, ui.approve if agent_mode is Mode.CONFIRM else None)
    _exit_cleanly_on_signals()
    toolbox = ToolBox(ws, policy, masker, ToolLimits(soft_timeout_s=soft_timeout, max_output_bytes=max_output_bytes),
                      pass_env=env, sandbox=SandboxOptions(enabled=use_sandbox, allow_network=allow_network,
                                                           read_paths=tuple(allow_read)))
    try:
        writer = TrajectoryWriter(trajectory, toolbox.schemas, masker) if trajectory else None
        runner = Agent(chat_model, toolbox, limits=AgentLimits(max_steps=max_steps, max_time_s=max_time),
                       trajectory=writer, on_event=ui.event)
        if task is not None:
            return runner.run(task).exit_code
        while (next_task := ui.read_task()) is not None:
            try:
                runner.run(next_task)
            except KeyboardInterrupt:
                runner.interrupted()
                ui.console.print("[yellow]interrupted[/]")
        return 0
    finally:
        toolbox.close()  # kills whatever the commands left running


def parse_size(text: str, flag: str) -> int:
    """'64M' -> 67108864; plain numbers are bytes; K, M, G are powers of 1024."""
    m = _SIZE.fullmatch(text)
    if not m or int(m.group(1)) <= 0:
        raise DevstralError(f"{flag} must be a size such as 65536, 512K, 64M or 2G, got {text!r}")
    unit = (m.group(2) or "b")[0].lower()
    return int(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def _make_model(model, base_url, api_key, model_name, temperature, max_tokens, device, backend="auto"):
    if base_url is not None:
        from devstral.agent.endpoint_model import EndpointChatModel

        return EndpointChatModel(base_url, model_name, api_key, temperature=temperature, max_tokens=max_tokens)
    from devstral.agent.inprocess_model import InProcessChatModel

    return InProcessChatModel(model, device=device, temperature=temperature, max_tokens=max_tokens, backend=backend)


def _exit_cleanly_on_signals() -> None:
    # SIGTERM and SIGHUP (the terminal closed) would skip `finally`, leaving the commands' processes
    # behind when there is no sandbox; exiting through Python runs it.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
