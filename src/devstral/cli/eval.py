"""`devstral eval ...`: quality measurements: `kld` (a quant against its reference), `humaneval` (pass@k
by execution in a sandbox), `agent` (repository tasks solved by `devstral agent`)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from devstral.cli.app import app
from devstral.cli.options import THREADS_OPTION, apply_threads

eval_app = typer.Typer(help="Measure model quality.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("kld")
def kld(
    reference: str = typer.Option(..., "--reference", help="Reference model: folder, .gguf or org/repo."),
    model: str = typer.Option(..., "--model", help="Model to test, usually a quantized .gguf."),
    data: Path = typer.Option(..., "--data", help="UTF-8 text file to score (e.g. wiki.test.raw)."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk; the second half of each is scored."),
    chunks: int | None = typer.Option(None, "--chunks", help="Score at most this many chunks."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print every statistic as JSON."),
    threads: int = THREADS_OPTION,
) -> None:
    """KL divergence of MODEL from REFERENCE, the way llama-perplexity --kl-divergence measures it."""
    import json
    import sys

    import devstral
    from devstral.errors import DevstralError
    from devstral.eval.kld import format_report, kld_between

    try:
        text = data.read_text(encoding="utf-8")
    except OSError as e:
        raise DevstralError(f"{data}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DevstralError(f"{data}: not UTF-8 text (byte {e.start})") from None
    apply_threads(threads)
    ref = devstral.load(reference, device=device, max_context=ctx)
    test = devstral.load(model, device=device, max_context=ctx)

    def on_chunk(done: int, total: int) -> None:
        print(f"\rchunk {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    stats = kld_between(ref, test, text, ctx=ctx, max_chunks=chunks, on_chunk=None if json_out else on_chunk)
    if json_out:
        print(json.dumps({"reference": reference, "model": model, "ctx": ctx, **stats.to_dict()}, indent=2))
    else:
        print(format_report(stats, reference, model))


@eval_app.command("humaneval")
def humaneval(
    model: str = typer.Option(None, "--model", "-m", help="Model folder, .gguf, org/repo or nano (default: as devstral run)."),
    base_url: str = typer.Option(None, "--base-url", help="Score an OpenAI-compatible server instead of a local model."),
    api_key: str = typer.Option(None, "--api-key", envvar="DEVSTRAL_API_KEY", help="Bearer token for --base-url."),
    model_name: str = typer.Option(None, "--model-name", help="Model name sent to --base-url (default: its first)."),
    canonical: bool = typer.Option(False, "--canonical", help="Score the reference solutions: checks the harness "
                                   "and sandbox on this machine (expect 100 %)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N problems."),
    task: list[str] = typer.Option(None, "--task", help="Only this problem, e.g. HumanEval/0 (repeatable)."),
    samples: int = typer.Option(1, "--samples", "-k", min=1, help="Samples per problem (n in pass@k)."),
    ks: str = typer.Option(None, "--k", help="Report pass@k for these k, e.g. 1,10 (default: 1, 10, 100 up to n)."),
    temperature: float = typer.Option(None, "--temperature", min=0.0,
                                      help="Default 0 (greedy) with one sample, 0.8 with several (Chen et al.)."),
    max_tokens: int = typer.Option(768, "--max-tokens", min=1, help="Cap on tokens per answer."),
    raw: bool = typer.Option(False, "--raw", help="Complete the prompt as plain text instead of asking in chat."),
    seed: int = typer.Option(0, "--seed", help="Sample i uses seed + i."),
    system: str = typer.Option(None, "--system", help="System prompt (overrides SYSTEM_PROMPT.txt)."),
    no_system: bool = typer.Option(False, "--no-system", help="Send no system prompt."),
    parallel: int = typer.Option(4, "--parallel", min=1, help="Sequences generated at once."),
    workers: int = typer.Option(2, "--workers", min=1, help="Programs executed at once."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="Seconds each program may run (wall clock)."),
    memory_mb: int = typer.Option(1024, "--memory-mb", min=64, help="Address-space limit per program process."),
    sandbox: str = typer.Option("auto", "--sandbox", help="auto (bwrap when installed), bwrap, or process."),
    ctx_size: int = typer.Option(4096, "--ctx-size", "-c", min=256, help="Context window for a local model."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16."),
    output: Path = typer.Option(None, "--output", "-o", help="Also write the full JSON report (programs included) here."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON (per-problem results included)."),
    threads: int = THREADS_OPTION,
) -> None:
    """HumanEval pass@k of a model, every completion executed in a sandbox."""
    import json

    from devstral.errors import DevstralError
    from devstral.eval.humaneval import evaluate, load_problems, print_progress
    from devstral.eval.passk import parse_ks
    from devstral.eval.sandbox import Sandbox, SandboxLimits

    if sum(x is not None and x is not False for x in (model, base_url, canonical or None)) > 1:
        raise DevstralError("give at most one of --model, --base-url and --canonical")
    apply_threads(threads)
    mode = "raw" if raw or canonical else "chat"
    k_list = parse_ks(ks, samples)
    temp = temperature if temperature is not None else (0.0 if samples == 1 else 0.8)
    problems = load_problems(limit, task or None)
    box = Sandbox(SandboxLimits(timeout_s=timeout, memory_mb=memory_mb), kind=sandbox)
    if box.kind == "process" and not json_out:
        print("note: bubblewrap (bwrap) is not available: programs run without a network namespace; "
              "network is refused by a Python-level guard only", file=sys.stderr)
    if canonical:
        from devstral.eval.generators import canonical as generate

        label = "canonical solutions"
    elif base_url is not None:
        from devstral.eval.generators import EndpointGenerator

        generate = EndpointGenerator(base_url, model_name=model_name, api_key=api_key, mode=mode, temperature=temp,
                                     max_tokens=max_tokens, seed=seed, parallel=parallel)
        generate.check()
        label = f"{generate.model_name or 'default'} at {generate.base_url}"
    else:
        from devstral.cli.options import load_llm
        from devstral.eval.generators import InProcessGenerator

        llm = load_llm(model, device=device, dtype=dtype, ctx_size=ctx_size, system=system, no_system=no_system)
        llm.set_parallel(parallel)
        generate = InProcessGenerator(llm, mode=mode, temperature=temp, max_tokens=max_tokens, seed=seed,
                                      parallel=parallel, show_progress=not json_out)
        import os

        label = model or os.environ.get("DEVSTRAL_MODEL") or "nano"
    report = evaluate(problems, generate, box, samples=samples, mode=mode, ks=k_list, model=label,
                      temperature=temp, workers=workers, on_progress=None if json_out else print_progress)
    if output is not None:
        from devstral.eval.report_io import write_json

        write_json(output, report.to_dict(with_programs=True))
    if json_out:
        print(json.dumps(report.to_dict(with_programs=False), indent=2))
    else:
        print(report.summary())


@eval_app.command("agent")
def agent_tasks(
    model: str = typer.Option(None, "--model", "-m", help="Run this model in process (folder, .gguf, org/repo, nano)."),
    base_url: str = typer.Option(None, "--base-url", help="Use an OpenAI-compatible server instead."),
    api_key: str = typer.Option(None, "--api-key", envvar="DEVSTRAL_API_KEY", help="Bearer token for --base-url."),
    model_name: str = typer.Option(None, "--model-name", help="Model name sent to --base-url (default: its first)."),
    suite: Path = typer.Option(None, "--suite", help="A folder of task folders (default: the suite shipped with devstral)."),
    task: list[str] = typer.Option(None, "--task", help="Only this task (repeatable)."),
    max_steps: int = typer.Option(30, "--max-steps", min=1, help="Model calls per task (a task.json may set its own)."),
    max_time: float = typer.Option(600.0, "--max-time", min=1, help="Seconds per task."),
    temperature: float = typer.Option(0.15, "--temperature", min=0.0, help="Sampling temperature."),
    max_tokens: int = typer.Option(2048, "--max-tokens", min=1, help="Cap on tokens per model reply."),
    device: str = typer.Option("auto", "--device", help="Device for --model."),
    trajectories: Path = typer.Option(None, "--trajectories", help="Write each task's trajectory JSONL into this folder."),
    keep: Path = typer.Option(None, "--keep", help="Copy each task's final workspace into this folder."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    threads: int = THREADS_OPTION,
) -> None:
    """Run `devstral agent` on each task of a suite in a fresh copy; success is the task's own check passing."""
    import json

    from devstral.errors import DevstralError
    from devstral.eval.agent_eval import load_suite, run_suite

    if model is not None and base_url is not None:
        raise DevstralError("give --model (run in process) or --base-url (use a server), not both")
    if api_key and not base_url:
        raise DevstralError("--api-key only applies with --base-url")
    apply_threads(threads)
    tasks = load_suite(suite, task or None)
    if base_url is not None:
        from devstral.agent.endpoint_model import EndpointChatModel

        chat_model = EndpointChatModel(base_url, model_name, api_key, temperature=temperature, max_tokens=max_tokens)
        chat_model.check()
        label = f"{chat_model.model_name or 'default'} at {chat_model.base_url}"
    else:
        import os

        from devstral.agent.inprocess_model import InProcessChatModel

        chat_model = InProcessChatModel(model or os.environ.get("DEVSTRAL_MODEL") or "nano", device=device,
                                        temperature=temperature, max_tokens=max_tokens)
        label = model or os.environ.get("DEVSTRAL_MODEL") or "nano"

    def progress(result) -> None:
        if not json_out:
            mark = "PASS" if result.success else "FAIL"
            print(f"{mark} {result.name} ({result.steps} steps, agent {result.stop})", file=sys.stderr, flush=True)

    report = run_suite(tasks, chat_model, model_label=label, trajectories=trajectories, keep=keep,
                       max_steps=max_steps, max_time_s=max_time, on_task=progress)
    if json_out:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
