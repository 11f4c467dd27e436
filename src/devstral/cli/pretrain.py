"""`devstral pretrain data|init|train`: the reproducible recipe for training a small model from scratch
(the embedded default model's recipe by default)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from devstral.cli.app import app
from devstral.cli.options import THREADS_OPTION, apply_threads

pretrain_app = typer.Typer(help="Train a small model from scratch (the default model's recipe).",
                           no_args_is_help=True)
app.add_typer(pretrain_app, name="pretrain")

RECIPE_HELP = "Recipe YAML (default: the default model's, train/recipes/default_model/recipe.yaml)."


@pretrain_app.command("data")
def data(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for train.jsonl, eval.jsonl and manifest.json."),
    recipe: Path = typer.Option(None, "--recipe", help=RECIPE_HELP),
    source_mb: float = typer.Option(None, "--source-mb", help="Override the recipe: MB of Python source to read."),
    root: list[Path] = typer.Option(None, "--root", help="Read Python files here instead of the stdlib and "
                                    "site-packages (repeatable)."),
) -> None:
    """Build the training data offline from the installed Python packages (HumanEval excluded)."""
    import dataclasses

    from devstral.errors import DevstralError
    from devstral.train.pretrain import load_recipe
    from devstral.train.pretrain_data import build_dataset

    r = load_recipe(recipe)
    data_recipe = r.data if source_mb is None else dataclasses.replace(r.data, source_mb=source_mb)
    for folder in root or []:
        if not folder.is_dir():
            raise DevstralError(f"--root {folder}: no such folder")
    manifest = build_dataset(out, data_recipe, roots=[p.resolve() for p in root] if root else None,
                             log=lambda line: print(line, file=sys.stderr))
    rec = manifest["records"]
    typer.echo(f"wrote {out}/train.jsonl ({rec['train_lines']} lines) and eval.jsonl ({rec['eval_lines']} lines); "
               f"HumanEval overlap left: {manifest['humaneval_overlap']['left_after_writing']}")


@pretrain_app.command("init")
def init(
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
    recipe: Path = typer.Option(None, "--recipe", help=RECIPE_HELP),
) -> None:
    """Write the recipe's architecture with a tekken prefix tokenizer and freshly initialized weights."""
    from devstral.config import ModelConfig
    from devstral.train.pretrain import init_model, load_recipe

    folder = init_model(load_recipe(recipe), out)
    typer.echo(f"wrote {folder} ({ModelConfig.from_dir(folder).n_params / 1e6:.1f}M parameters)")


@pretrain_app.command("train")
def train(
    data_dir: Path = typer.Option(..., "--data", help="Folder written by `devstral pretrain data`."),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder: init/ and model/ are written here."),
    recipe: Path = typer.Option(None, "--recipe", help=RECIPE_HELP),
    max_steps: int = typer.Option(None, "--max-steps", help="Override the recipe's number of steps."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Train for this wall-clock time (loading "
                                      "included): the step count is fixed after 50 steps from their speed, so "
                                      "the schedule still ends on time; --max-steps/--epochs then cap it."),
    lr: float = typer.Option(None, "--lr", help="Override the peak learning rate."),
    batch_size: int = typer.Option(None, "--batch-size", help="Override rows per micro-batch."),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Override micro-batches per step."),
    max_seq_len: int = typer.Option(None, "--max-seq-len", help="Override the row length."),
    warmup_steps: int = typer.Option(None, "--warmup-steps", help="Override the warmup."),
    eval_every: int = typer.Option(None, "--eval-every", help="Override how often the eval loss is measured."),
    save_every: int = typer.Option(None, "--save-every", help="Override how often a checkpoint is written."),
    grad_checkpointing: bool = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing"),
    device: str = typer.Option(None, "--device", help="auto (default), cpu or cuda."),
    resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from OUTPUT/model/checkpoint."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Show the progress bar."),
    humaneval: bool = typer.Option(False, "--humaneval", help="Then measure HumanEval pass@1 and put it in the card."),
    threads: int = THREADS_OPTION,
) -> None:
    """Train the recipe's model from scratch (full-parameter `devstral finetune`) and write its model card."""
    flags = dict(locals())
    from devstral.train.pretrain import load_recipe
    from devstral.train.pretrain import train as run_train

    apply_threads(flags.pop("threads"))
    r = load_recipe(flags.pop("recipe"))
    data_dir, output, measure = flags.pop("data_dir"), flags.pop("output"), flags.pop("humaneval")
    result = run_train(r, data_dir, output, flags, measure=_humaneval if measure else None)
    final = f"{result.losses[-1]:.4f}" if result.losses else "-"
    typer.echo(f"saved model to {output / 'model'} (final loss {final}); model card in MODEL_CARD.md")


def _humaneval(model_dir: Path) -> str:
    import devstral
    from devstral.eval.generators import InProcessGenerator
    from devstral.eval.humaneval import evaluate, load_problems
    from devstral.eval.sandbox import Sandbox

    llm = devstral.load(model_dir, max_context=4096, parallel=16)
    gen = InProcessGenerator(llm, mode="chat", temperature=0.0, max_tokens=512, parallel=16)
    report = evaluate(load_problems(), gen, Sandbox(), samples=1, mode="chat", ks=[1], model=str(model_dir),
                      temperature=0.0)
    solved = sum(p.correct for p in report.problems)
    return f"{100 * report.pass_at(1):.2f} % ({solved}/{len(report.problems)} problems)"
