"""`devstral agent`: work on a task in a workspace with a local model or any OpenAI-compatible URL."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import typer

from devstral.cli.app import app
from devstral.cli.options import BACKEND_OPTION
from devstral.errors import DevstralError


@app.command()
def agent(
    task: str = typer.Argument(None, help="The task. Without it, tasks are read from the terminal."),
    workspace: Path = typer.Option(Path("."), "--workspace", "-w", help="The folder the agent works in."),
    model: str = typer.Option(None, "--model", "-m", help="Run this model in process (folder, .gguf, org/repo)."),
    base_url: str = typer.Option(None, "--base-url", help="Use an OpenAI-compatible server instead, e.g. http://127.0.0.1:8080/v1."),
    api_key: str = typer.Option(None, "--api-key", envvar="DEVSTRAL_API_KEY", help="Bearer token for --base-url."),
    model_name: str = typer.Option(None, "--model-name", help="Model name sent to --base-url (default: the first one it lists)."),
    max_steps: int = typer.Option(100, "--max-steps", min=1, help="Stop after this many model calls per task."),
    max_time: float = typer.Option(None, "--max-time", min=1, help="Stop a task after this many seconds."),
    mode: str = typer.Option("confirm", "--mode", help="confirm (ask before commands and edits), auto, or read-only."),
    trajectory: Path = typer.Option(None, "--trajectory", "-t", help="Write the conversation here as fine-tuning JSONL."),
    temperature: float = typer.Option(0.15, "--temperature", min=0.0, help="Sampling temperature."),
    max_tokens: int = typer.Option(None, "--max-tokens", min=1, help="Cap on tokens per model reply."),
    device: str = typer.Option("auto", "--device", help="Device for --model (auto, cpu, cuda, cuda:1)."),
    backend: str = BACKEND_OPTION,
    soft_timeout: float = typer.Option(30.0, "--soft-timeout", min=0.1, help="Return a command's output after this many silent seconds."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print observations."),
) -> int:
    """Run a coding agent in WORKSPACE. Exit code 0 when it finished, 1 when a limit stopped it."""
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
    from devstral.agent.terminal import TerminalUI, stdin_is_terminal
    from devstral.agent.workspace import Workspace

    try:
        agent_mode = Mode(mode)
    except ValueError:
        raise DevstralError(f"--mode must be confirm, auto or read-only, got {mode!r}") from None
    if (model is None) == (base_url is None):
        raise DevstralError("give exactly one of --model (run in process) or --base-url (use a server)")
    if api_key and not base_url:
        raise DevstralError("--api-key only applies with --base-url")
    if backend != "auto" and base_url:
        raise DevstralError("--backend only applies with --model (the server at --base-url runs its own)")
    ws = Workspace.open(workspace)
    interactive = task is None
    if (agent_mode is Mode.CONFIRM or interactive) and not stdin_is_terminal():
        raise DevstralError("confirm mode and interactive tasks need a terminal; pass a TASK with --mode auto or read-only")
    if task is not None and not task.strip():
        raise DevstralError("TASK is empty")

    import os
    masker = SecretMasker(os.environ)
    ui = TerminalUI(verbose=not quiet)
    chat_model = _make_model(model, base_url, api_key, model_name, temperature, max_tokens, device, backend)
    chat_model.check()  # an unreachable server fails here, before any step
    policy = Policy(agent_mode, ws, ui.approve if agent_mode is Mode.CONFIRM else None)
    toolbox = ToolBox(ws, policy, masker, ToolLimits(soft_timeout_s=soft_timeout))
    writer = TrajectoryWriter(trajectory, toolbox.schemas, masker) if trajectory else None
    runner = Agent(chat_model, toolbox, limits=AgentLimits(max_steps=max_steps, max_time_s=max_time),
                   trajectory=writer, on_event=ui.event)
    _exit_cleanly_on_sigterm()
    try:
        if not interactive:
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


def _make_model(model, base_url, api_key, model_name, temperature, max_tokens, device, backend="auto"):
    if base_url is not None:
        from devstral.agent.endpoint_model import EndpointChatModel

        return EndpointChatModel(base_url, model_name, api_key, temperature=temperature, max_tokens=max_tokens)
    from devstral.agent.inprocess_model import InProcessChatModel

    return InProcessChatModel(model, device=device, temperature=temperature, max_tokens=max_tokens, backend=backend)


def _exit_cleanly_on_sigterm() -> None:
    # SIGTERM would skip `finally`, leaving the commands' processes behind.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
