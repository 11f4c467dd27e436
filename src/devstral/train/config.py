"""TrainConfig: every `devstral finetune` setting, from defaults <- a YAML recipe <- command-line flags."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from devstral.errors import DevstralError

SCHEDULES = ("cosine", "linear", "constant")
LORA_DTYPES = ("auto", "bf16", "fp32")
TRAIN_ON = {"all-assistant": "assistant", "assistant": "assistant", "last-assistant": "last-assistant"}

MLP_TILE = 4096  # tokens: 1.5 GiB of 32768-wide intermediates in bf16, and matmuls still large


@dataclass
class TrainConfig:
    model: str | None = None
    data: str | None = None
    output: str | None = None
    eval_data: str | None = None
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    rslora: bool = False
    lora_dtype: str = "auto"  # the LoRA weights the forward uses: bf16 (fp32 masters in the optimizer) or fp32
    router_aux_loss: float = 0.0  # MoE: weight of the routers' load-balancing loss
    target: str = "all-linear"
    qlora: bool = False
    full: bool = False  # full-parameter training: every weight learns, the output is a model folder
    train_projector: bool = False  # images in the data: the vision projector learns too (the tower stays frozen)
    double_quant: bool = True
    epochs: float | None = None
    max_steps: int | None = None
    max_minutes: float | None = None  # wall-clock budget: the step count is fixed from measured speed
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    batch_size: int = 1
    grad_accum: int = 1
    batch_tokens: int | None = None
    max_seq_len: int = 2048
    packing: bool = False
    drop_long: bool = False
    train_on: str = "all-assistant"
    grad_checkpointing: bool = False
    offload_activations: bool = False  # checkpointed layer inputs in pinned CPU memory (implies checkpointing)
    offload_host_gib: float | None = None  # host memory the offload may pin; None: available less a reserve
    checkpoint_layers: int = 1  # decoder layers per gradient checkpoint (2: half the checkpoints kept)
    mlp_tile: int | None = None  # MLP trained in tiles of this many tokens; None: 4096 with checkpointing, 0: off
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0
    eval_every: int = 0
    resume: bool = False
    skip_invalid: bool = False
    merge: bool = False
    gguf: str | None = None
    ollama: bool = False  # also an Ollama Modelfile beside the GGUF (a Q8_0 one unless --gguf says)
    device: str = "auto"
    progress: bool = True
    threads: int | None = None  # CPU threads for torch; None: the physical core count
    nproc: int = 1  # processes (GPUs) training together under FSDP2 (parallel/fsdp.py); torchrun sets it too

    def mlp_tile_tokens(self) -> int:
        """The MLP's token tile: --mlp-tile, else 4096 under checkpointing (no extra work there) and off
        without it (where a tile's forward would run a second time)."""
        if self.mlp_tile is not None:
            return self.mlp_tile
        return MLP_TILE if self.grad_checkpointing else 0

    def validate(self) -> None:
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise DevstralError(f"--{name.replace('_', '-')} is required")
        if self.full and self.qlora:
            raise DevstralError("--full trains every weight in 16/32-bit; it cannot be combined with --qlora")
        if self.lora_r <= 0:
            raise DevstralError(f"--lora-r must be a positive integer, got {self.lora_r}")
        if self.lora_dtype not in LORA_DTYPES:
            raise DevstralError(f"--lora-dtype must be one of {', '.join(LORA_DTYPES)}, got {self.lora_dtype!r}")
        if self.lora_dtype == "bf16" and (self.full or self.nproc > 1):
            raise DevstralError("--lora-dtype bf16 is for LoRA / QLoRA in one process (" +
                                ("--full trains fp32 master weights under bf16 autocast)" if self.full else
                                 "--nproc shards fp32 LoRA weights)"))
        if self.lora_alpha <= 0:
            raise DevstralError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not (math.isfinite(self.router_aux_loss) and self.router_aux_loss >= 0):
            raise DevstralError(f"--router-aux-loss must be a finite number >= 0, got {self.router_aux_loss}")
        if not 0 <= self.lora_dropout < 1:
            raise DevstralError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.epochs is not None and self.max_steps is not None:
            raise DevstralError("give --epochs or --max-steps, not both")
        if self.epochs is not None and self.epochs <= 0:
            raise DevstralError(f"--epochs must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise DevstralError(f"--max-steps must be positive, got {self.max_steps}")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise DevstralError(f"--max-minutes must be a positive number, got {self.max_minutes}")
        if self.lr <= 0:
            raise DevstralError(f"--lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise DevstralError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise DevstralError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.train_on not in TRAIN_ON:
            raise DevstralError(f"--train-on must be all-assistant or last-assistant, got {self.train_on!r}")
        for name in ("batch_size", "grad_accum", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise DevstralError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.batch_tokens is not None:
            if self.batch_tokens <= 0:
                raise DevstralError(f"--batch-tokens must be positive, got {self.batch_tokens}")
            if self.batch_tokens < self.max_seq_len:
                raise DevstralError(f"--batch-tokens ({self.batch_tokens}) must be at least --max-seq-len "
                                    f"({self.max_seq_len})")
        if self.save_every < 0 or self.eval_every < 0:
            raise DevstralError("--save-every and --eval-every must be >= 0")
        if self.offload_activations:  # what it offloads are the checkpoints
            self.grad_checkpointing = True
        if self.offload_host_gib is not None and not (math.isfinite(self.offload_host_gib)
                                                      and self.offload_host_gib >= 0):
            raise DevstralError(f"--offload-host-gib must be a number >= 0, got {self.offload_host_gib}")
        if self.checkpoint_layers <= 0:
            raise DevstralError(f"--checkpoint-layers must be a positive number of layers, got {self.checkpoint_layers}")
        if self.mlp_tile is not None and self.mlp_tile < 0:
            raise DevstralError(f"--mlp-tile must be >= 0 tokens (0 = off), got {self.mlp_tile}")
        if self.ollama and not self.gguf:
            self.gguf = "Q8_0"
        if self.threads is not None and self.threads <= 0:
            raise DevstralError(f"--threads must be a positive integer, got {self.threads}")
        if self.nproc < 1:
            raise DevstralError(f"--nproc must be a positive integer, got {self.nproc}")
        if self.nproc > 1 and self.full:
            raise DevstralError("--nproc shards LoRA / QLoRA training; --full runs in one process")
        if self.nproc > 1 and self.grad_accum % self.nproc:
            raise DevstralError(f"--grad-accum ({self.grad_accum}) must be a multiple of --nproc ({self.nproc}): "
                                "each process takes the same number of micro-batches per step")
        if self.train_projector and (self.full or self.nproc > 1):
            raise DevstralError("--train-projector goes with LoRA / QLoRA in one process (not --full or --nproc)")
        if self.max_grad_norm < 0:
            raise DevstralError("--max-grad-norm must be >= 0 (0 turns clipping off)")

    @property
    def chat_train_on(self) -> str:
        return TRAIN_ON[self.train_on]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_recipe(path: Path) -> dict[str, Any]:
    """A YAML mapping of flag names (dashes or underscores) to values."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DevstralError(f"--config {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise DevstralError(f"--config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DevstralError(f"--config {path}: not a YAML recipe (not UTF-8 text: invalid byte at offset "
                            f"{e.start})") from None
    try:
        data = yaml.safe_load(text) or {}
    except RecursionError:
        raise DevstralError(f"{path}: invalid YAML (nested too deeply)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or getattr(e, "reason", None)
        detail = f" ({' '.join(str(problem).split())[:120]})" if problem else ""
        raise DevstralError(f"{path}: invalid YAML{where}{detail}") from None
    if not isinstance(data, dict):
        raise DevstralError(f"{path}: a recipe must be a mapping of flag names to values")
    known = {f.name: f for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in known:
            raise DevstralError(f"{path}: unknown setting {key!r}")
        out[name] = value
    return out


def build_config(recipe: Path | None, flags: dict[str, Any], base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, overridden by `base` (settings from elsewhere, e.g. a pretraining recipe), then the recipe
    file, then flags given on the command line (non-None)."""
    values: dict[str, Any] = dict(base or {})
    values.update(read_recipe(recipe) if recipe else {})
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise DevstralError(f"invalid recipe: {e}") from None
    _coerce_types(cfg, recipe)
    cfg.validate()
    return cfg


def _coerce_types(cfg: TrainConfig, source: Path | None) -> None:
    """YAML gives ints for floats (lr: 1) and strings for numbers (lr: 2e-4 is a string in YAML 1.1)."""
    where = str(source) if source else "flags"
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        kind = f.type if isinstance(f.type, str) else str(f.type)
        try:
            if kind.startswith("float"):
                setattr(cfg, f.name, float(value))
            elif kind.startswith("int"):
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                setattr(cfg, f.name, int(value))
            elif kind == "bool" and not isinstance(value, bool):
                raise ValueError
            elif kind.startswith("str") and not isinstance(value, str):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError  # a list or mapping where a name or path belongs
                setattr(cfg, f.name, str(value))
        except (TypeError, ValueError):
            raise DevstralError(f"{where}: {f.name.replace('_', '-')} has an invalid value {value!r}") from None
