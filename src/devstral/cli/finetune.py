"""`devstral finetune`: LoRA / QLoRA on chat, tool-use, prompt/completion or text JSONL.

Every flag defaults to None here so that a flag given on the command line can be told apart from a
default: the recipe (--config) fills what the flags leave out, TrainConfig fills the rest.
"""

from __future__ import annotations

from pathlib import Path

import typer

from devstral.cli.app import app
from devstral.cli.options import THREADS_OPTION, apply_threads


@app.command()
def finetune(
    model: str = typer.Option(None, "--model", "-m", help="Base model folder (HF or Mistral layout), org/repo or nano."),
    data: Path = typer.Option(None, "--data", help="Training JSONL: {messages, tools}, {prompt, completion} or {text}."),
    output: Path = typer.Option(None, "--output", "-o", help="Folder for the adapter, metrics and exports."),
    eval_data: Path = typer.Option(None, "--eval-data", help="Validation JSONL; prints an eval loss."),
    config: Path = typer.Option(None, "--config", help="YAML recipe holding any of these flags; flags override it."),
    lora_r: int = typer.Option(None, "--lora-r", help="LoRA rank (default 16)."),
    lora_alpha: float = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 16); scale is alpha/r."),
    lora_dropout: float = typer.Option(None, "--lora-dropout", help="Dropout on the LoRA input (default 0)."),
    lora_dtype: str = typer.Option(None, "--lora-dtype",
                                   help="LoRA weights in the forward: auto (default: bf16 with fp32 master copies in "
                                        "the optimizer on CUDA, fp32 elsewhere), bf16 or fp32."),
    rslora: bool = typer.Option(None, "--rslora/--no-rslora", help="Scale by alpha/sqrt(r) (rank-stabilized)."),
    target: str = typer.Option(None, "--target", help="all-linear (default) or a comma list of q,k,v,o,gate,up,down, "
                                                      "experts (a Mixtral model's expert linears w1,w2,w3)."),
    router_aux_loss: float = typer.Option(None, "--router-aux-loss", help="MoE models: weight of the router's "
                                          "load-balancing loss (Mixtral trained with 0.02; default 0)."),
    qlora: bool = typer.Option(None, "--qlora/--no-qlora", help="Keep the base weights in 4-bit NF4."),
    full: bool = typer.Option(None, "--full/--no-full", help="Train every weight (fp32 master weights); "
                              "OUTPUT becomes a model folder instead of an adapter."),
    train_projector: bool = typer.Option(None, "--train-projector/--no-train-projector",
                                         help="Data with images: train the vision projector too (fp32; the tower "
                                              "stays frozen); saved in the adapter as PEFT modules_to_save."),
    double_quant: bool = typer.Option(None, "--double-quant/--no-double-quant",
                                      help="QLoRA: 8-bit quantize the NF4 block scales (default on)."),
    epochs: float = typer.Option(None, "--epochs", help="Passes over the data (default 1)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (instead of --epochs)."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Train for this wall-clock time (loading "
                                      "included): the step count is fixed after 50 steps from their speed, so "
                                      "the schedule still ends on time; --max-steps/--epochs then cap it."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default 2e-4)."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0)."),
    warmup_steps: int = typer.Option(None, "--warmup-steps", help="Linear warmup steps (default 0)."),
    schedule: str = typer.Option(None, "--schedule", help="cosine (default), linear or constant."),
    batch_size: int = typer.Option(None, "--batch-size", help="Examples (or packed rows) per micro-batch."),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
    batch_tokens: int = typer.Option(None, "--batch-tokens", help="Padding-free micro-batches of up to T tokens."),
    max_seq_len: int = typer.Option(None, "--max-seq-len", help="Longer examples are truncated (default 2048)."),
    drop_long: bool = typer.Option(None, "--drop-long/--truncate-long", help="Drop, instead of truncate, long examples."),
    packing: bool = typer.Option(None, "--packing/--no-packing", help="Pack examples into rows of --max-seq-len."),
    train_on: str = typer.Option(None, "--train-on", help="all-assistant (default) or last-assistant."),
    grad_checkpointing: bool = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing",
                                            help="Recompute activations in backward to save memory."),
    offload_activations: bool = typer.Option(None, "--offload-activations/--no-offload-activations",
                                             help="Keep the checkpointed layer inputs in pinned CPU memory (async "
                                                  "copies) for long sequences; implies --grad-checkpointing."),
    offload_host_gib: float = typer.Option(None, "--offload-host-gib",
                                           help="Host memory --offload-activations may pin (default: what is "
                                                "available less a tenth); layer inputs beyond it stay on the GPU."),
    checkpoint_layers: int = typer.Option(None, "--checkpoint-layers",
                                          help="Decoder layers per gradient checkpoint (default 1); 2 keeps half "
                                               "as many layer inputs for one more layer recomputed at a time."),
    mlp_tile: int = typer.Option(None, "--mlp-tile", help="Train the MLP in tiles of N tokens so its wide "
                                 "intermediates exist one tile at a time (default 4096 with checkpointing; 0 = off)."),
    max_grad_norm: float = typer.Option(None, "--max-grad-norm", help="Gradient clipping norm (default 1; 0 = off)."),
    seed: int = typer.Option(None, "--seed", help="Seed for data order, LoRA init and dropout (default 0)."),
    save_every: int = typer.Option(None, "--save-every", help="Write a resumable checkpoint every N steps."),
    eval_every: int = typer.Option(None, "--eval-every", help="Evaluate on --eval-data every N steps."),
    resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from OUTPUT/checkpoint."),
    skip_invalid: bool = typer.Option(None, "--skip-invalid/--no-skip-invalid",
                                      help="Skip (and count) bad lines instead of stopping."),
    merge: bool = typer.Option(None, "--merge/--no-merge", help="Also write OUTPUT/merged (bf16 safetensors)."),
    gguf: str = typer.Option(None, "--gguf", help="Also write OUTPUT/model-TYPE.gguf (e.g. Q4_K_M)."),
    ollama: bool = typer.Option(None, "--ollama/--no-ollama",
                                help="Also write OUTPUT/Modelfile for `ollama create` (implies --gguf Q8_0)."),
    device: str = typer.Option(None, "--device", help="auto (default), cpu or cuda."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Show the progress bar."),
    nproc: int = typer.Option(None, "--nproc", min=1, help="Train in N processes (N GPUs) with FSDP2: this one is "
                              "rank 0 and starts the others; --grad-accum must be a multiple of N."),
    threads: int = THREADS_OPTION,
) -> None:
    """Fine-tune a model with LoRA or QLoRA and save a PEFT adapter (optionally merged and GGUF), or train every
    weight with --full and save a whole model folder."""
    flags = dict(locals())  # first statement: only the parameters are local yet
    from devstral.train.config import build_config
    from devstral.train.trainer import finetune as run_finetune

    recipe = flags.pop("config")
    for key in ("data", "output", "eval_data"):
        if flags[key] is not None:
            flags[key] = str(flags[key])
    cfg = build_config(recipe, flags)
    apply_threads(cfg.threads)
    _sweep_interrupted_writes(Path(cfg.output))
    result = run_finetune(cfg)
    if cfg.ollama:
        from devstral.cli.options import write_ollama_modelfile

        out = Path(cfg.output)
        model_dir = out if cfg.full else out / "merged"  # --full: OUTPUT is the model folder
        modelfile = write_ollama_modelfile(out / f"model-{cfg.gguf}.gguf", out / "Modelfile", model_dir)
        typer.echo(f"wrote {modelfile}: ollama create NAME -f {modelfile}", err=True)
    final = f"{result.losses[-1]:.4f}" if result.losses else "-"
    typer.echo(f"saved {'model' if cfg.full else 'adapter'} to {result.output} (final loss {final})")


def _sweep_interrupted_writes(output: Path) -> None:
    """Temporaries a killed run left in the output folder (checkpoint, adapter, merged/, GGUF, loss.png)."""
    from devstral.tmpfiles import remove_stale

    for folder in (output, output / "checkpoint"):
        remove_stale(folder)
