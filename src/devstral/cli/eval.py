"""`devstral eval ...`: quality measurements (`eval kld`: quantization KL divergence)."""

from __future__ import annotations

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
