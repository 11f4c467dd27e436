"""Pretraining a small model from scratch with the project's own model and trainer (`devstral pretrain`).

A recipe (YAML) holds four sections: `model` (a ModelConfig), `tokenizer` (how many tekken ranks to
keep), `init`, `data` (pretrain_data.DataRecipe) and `train` (`devstral finetune` flags). The steps:
1. `data`: build train/eval JSONL offline from the installed Python packages (pretrain_data.py);
2. `init`: a model folder with the recipe's architecture, a tekken prefix tokenizer with the real
   control tokens, and freshly initialized fp32 weights;
3. `train`: `finetune(full=True)` on that folder: the same loop, packing, checkpoints and resume as
   LoRA fine-tuning, with every weight learning; then a model card from the template.
"""

from __future__ import annotations

import json
import math
import string
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from devstral.config import ModelConfig, YarnScaling
from devstral.errors import DevstralError
from devstral.train.pretrain_data import DataRecipe

RECIPES = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = RECIPES / "default_model" / "recipe.yaml"
CARD_TEMPLATE = RECIPES / "default_model" / "MODEL_CARD.md.template"


@dataclass
class PretrainRecipe:
    path: Path
    model: dict[str, Any]
    inner_vocab: int
    tokenizer_version: str
    init_std: float
    init_seed: int
    data: DataRecipe
    train: dict[str, Any] = field(default_factory=dict)

    def model_config(self, vocab_size: int) -> ModelConfig:
        spec = dict(self.model)
        yarn = spec.pop("yarn", None)
        try:
            return ModelConfig(vocab_size=vocab_size, yarn=YarnScaling(**yarn) if yarn else None, **spec)
        except TypeError as e:
            raise DevstralError(f"{self.path}: model: {e}") from None


def load_recipe(path: Path | None = None) -> PretrainRecipe:
    import yaml

    path = Path(path) if path is not None else DEFAULT_RECIPE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DevstralError(f"--recipe {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DevstralError(f"{path}: invalid YAML" + (f" at line {mark.line + 1}" if mark else "")) from None
    if not isinstance(data, dict):
        raise DevstralError(f"{path}: a recipe is a mapping with model, tokenizer, init, data and train")
    unknown = set(data) - {"model", "tokenizer", "init", "data", "train"}
    if unknown:
        raise DevstralError(f"{path}: unknown section {sorted(unknown)[0]!r}")
    for section in ("model", "tokenizer"):
        if not isinstance(data.get(section), dict):
            raise DevstralError(f"{path}: section {section!r} is missing or not a mapping")
    tok, init = data["tokenizer"], data.get("init") or {}
    inner = tok.get("inner_vocab")
    if not isinstance(inner, int) or inner < 256:
        raise DevstralError(f"{path}: tokenizer.inner_vocab must be an integer >= 256")
    recipe = PretrainRecipe(path, dict(data["model"]), inner, str(tok.get("version", "v13")),
                            float(init.get("std", 0.02)), int(init.get("seed", 0)),
                            DataRecipe.from_mapping(data.get("data") or {}, f"{path}: data"),
                            dict(data.get("train") or {}))
    recipe.model_config(inner + 1000)  # the architecture is checked now, not after the data is built
    return recipe


def init_weights(cfg: ModelConfig, *, std: float, seed: int) -> dict[str, torch.Tensor]:
    """GPT-2 style: N(0, std) everywhere, residual outputs (o_proj, down_proj) scaled down by
    sqrt(2 * n_layers) so the residual stream does not grow with depth; norms at 1."""
    from devstral.model.transformer import Transformer

    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Transformer(cfg).named_parameters()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape)
        else:
            scale = std / math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            out[name] = torch.randn(shape, generator=g) * scale
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def init_model(recipe: PretrainRecipe, dest: Path) -> Path:
    """A loadable model folder: config.json, tekken.json (prefix of the real vocabulary), fp32 weights."""
    from safetensors.torch import save_file

    from devstral.testing import write_tekken

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab = write_tekken(dest / "tekken.json", version=recipe.tokenizer_version, inner_vocab=recipe.inner_vocab)
    cfg = recipe.model_config(vocab)
    save_file(init_weights(cfg, std=recipe.init_std, seed=recipe.init_seed), str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["torch_dtype"] = "float32"
    (dest / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    return dest


def train(recipe: PretrainRecipe, data_dir: Path, output: Path, overrides: dict[str, Any],
          measure: Callable[[Path], str] | None = None):
    """Init (unless resuming), full-parameter training into output/model, then the model card
    (with `measure(model_dir)`'s text as the HumanEval result when given)."""
    from devstral.train.config import build_config
    from devstral.train.trainer import finetune

    data_dir, output = Path(data_dir), Path(output)
    for name in ("train.jsonl", "eval.jsonl"):
        if not (data_dir / name).is_file():
            raise DevstralError(f"--data {data_dir}: no {name} (build it with `devstral pretrain data`)")
    init_dir = output / "init"
    if not (overrides.get("resume") and (init_dir / "config.json").is_file()):
        init_model(recipe, init_dir)
    base = {**recipe.train, "model": str(init_dir), "data": str(data_dir / "train.jsonl"),
            "eval_data": str(data_dir / "eval.jsonl"), "output": str(output / "model"), "full": True}
    if overrides.get("max_minutes") is not None and overrides.get("max_steps") is None:
        base.pop("max_steps", None)  # a time budget given on the command line replaces the recipe's step count
    cfg = build_config(None, overrides, base=base)
    if not cfg.full:
        raise DevstralError("pretraining trains every weight: the recipe cannot set full: false")
    start = time.time()
    result = finetune(cfg)
    seconds = time.time() - start
    extra = {"humaneval": measure(output / "model")} if measure is not None else {}
    write_model_card(recipe, cfg, data_dir, output / "model", seconds, **extra)
    return result


def _metrics(folder: Path) -> tuple[list[dict], list[dict]]:
    steps, evals = [], []
    path = folder / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            (evals if "eval_loss" in r else steps).append(r)
    return steps, evals


def write_model_card(recipe: PretrainRecipe, cfg, data_dir: Path, model_dir: Path, seconds: float,
                     humaneval: str = "not measured yet: `devstral eval humaneval --model <this folder>`") -> Path:
    mcfg = ModelConfig.from_dir(model_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8")) \
        if (data_dir / "manifest.json").is_file() else {}
    steps, evals = _metrics(model_dir)
    tps = sorted(r["tokens_per_s"] for r in steps) or [0.0]
    losses = [f"| {r['step']} | {r['loss']:.3f} |" for r in steps[:: max(1, len(steps) // 10)]]
    if steps and (not losses or not losses[-1].startswith(f"| {steps[-1]['step']} |")):
        losses.append(f"| {steps[-1]['step']} | {steps[-1]['loss']:.3f} |")
    rec = manifest.get("records", {})
    values = {
        "params_m": f"{mcfg.n_params / 1e6:.1f}", "dim": mcfg.dim, "n_layers": mcfg.n_layers, "n_heads": mcfg.n_heads,
        "n_kv_heads": mcfg.n_kv_heads, "head_dim": mcfg.head_dim, "hidden_dim": mcfg.hidden_dim,
        "vocab": mcfg.vocab_size, "inner_vocab": recipe.inner_vocab, "ctx": mcfg.max_position_embeddings,
        "steps": steps[-1]["step"] if steps else 0, "tokens": sum(r["tokens"] for r in steps),
        "final_loss": f"{steps[-1]['loss']:.3f}" if steps else "-",
        "eval_loss": f"{evals[-1]['eval_loss']:.3f}" if evals else "-",
        "tokens_per_s": f"{tps[len(tps) // 2]:,.0f}", "minutes": f"{seconds / 60:.1f}",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "loss_table": "\n".join(losses) or "| - | - |",
        "source_files": manifest.get("source", {}).get("files_kept", "-"),
        "source_mb": f"{manifest.get('source', {}).get('bytes_kept', 0) / 1e6:.1f}",
        "duplicates": manifest.get("source", {}).get("duplicates", "-"),
        "source_pieces": rec.get("source_pieces", "-"), "instruction_pairs": rec.get("instruction_pairs", "-"),
        "tool_conversations": rec.get("tool_use_conversations", "-"),
        "overlap_dropped": json.dumps(manifest.get("humaneval_overlap", {}).get("dropped", {})),
        "overlap_left": manifest.get("humaneval_overlap", {}).get("left_after_writing", "-"),
        "lr": cfg.lr, "batch_tokens": cfg.batch_size * cfg.max_seq_len * cfg.grad_accum, "seq": cfg.max_seq_len,
        "humaneval": humaneval, "recipe": recipe.path.name,
        "torch": torch.__version__, "python": sys.version.split()[0],
    }
    text = string.Template(CARD_TEMPLATE.read_text(encoding="utf-8")).safe_substitute(values)
    path = model_dir / "MODEL_CARD.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
