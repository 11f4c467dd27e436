"""ModelConfig: the one description of a Mistral decoder, whatever file it was read from.

Three sources feed it: an HF `config.json` (mistral, ministral3, or mistral3 wrapping a text_config),
Mistral's native `params.json`, and GGUF metadata (see formats/gguf.py). Everything downstream (the
model, the KV cache, the exporters) reads only this dataclass.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devstral.errors import DevstralError

# Bounds no real checkpoint comes near; past them a value is a typo or a hostile file, and building
# the model from it would allocate without end.
MAX_LAYERS = 4096
MAX_POSITIONS = 1 << 31

@dataclass(frozen=True)
class YarnScaling:
    """YaRN rotary scaling, as in transformers' `_compute_yarn_parameters`."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # attention_factor multiplies cos/sin; None means derive it from factor/mscale the way transformers does.
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def resolved_attention_factor(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
        return get_mscale(self.factor)


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "mistral" (no query temperature) or "ministral3" (llama-4 query temperature)
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_embeddings: bool = False
    yarn: YarnScaling | None = None
    # Queries are scaled by 1 + beta * ln(1 + floor(pos / llama4_original_max)).
    llama4_beta: float | None = None
    llama4_original_max: int | None = None
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int | None = 11
    n_experts: int = 0  # Mixtral-style routed experts in every layer's FFN; 0: a dense FFN
    n_experts_per_tok: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise DevstralError(f"config: {name} must be an integer, got {v!r}")
            if v <= 0:
                raise DevstralError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise DevstralError(
                f"config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise DevstralError(f"config: head_dim must be even (rotary embeddings pair dimensions), got {self.head_dim}")
        if self.n_layers > MAX_LAYERS:
            raise DevstralError(f"config: n_layers {self.n_layers} is absurd (more than {MAX_LAYERS})")
        for name, lo, hi in (("norm_eps", 0.0, 1.0), ("rope_theta", 0.0, math.inf)):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and lo < v < hi):
                raise DevstralError(f"config: {name} must be a finite number in ({lo:g}, {hi:g}), got {v!r}")
        if not 0 < self.max_position_embeddings <= MAX_POSITIONS:
            raise DevstralError(f"config: max_position_embeddings must be in [1, {MAX_POSITIONS}], got "
                                f"{self.max_position_embeddings}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, int)):
            raise DevstralError(f"config: sliding_window must be an integer or null, got {self.sliding_window!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            object.__setattr__(self, "sliding_window", None)
        if self.yarn is not None:
            y = self.yarn
            if not (math.isfinite(y.factor) and y.factor > 0):
                raise DevstralError(f"config: YaRN factor must be a positive number, got {y.factor!r}")
            if not 0 < y.original_max_position_embeddings <= MAX_POSITIONS:
                raise DevstralError("config: YaRN original_max_position_embeddings must be in "
                                    f"[1, {MAX_POSITIONS}], got {y.original_max_position_embeddings}")
        if self.llama4_beta is not None:
            if not math.isfinite(self.llama4_beta):
                raise DevstralError(f"config: llama_4_scaling_beta must be finite, got {self.llama4_beta!r}")
            if not (isinstance(self.llama4_original_max, int) and self.llama4_original_max > 0):
                raise DevstralError("config: the llama-4 scaling original_max_position_embeddings must be a "
                                    f"positive integer, got {self.llama4_original_max!r}")
        if self.n_experts or self.n_experts_per_tok:
            for name, v in (("num_local_experts", self.n_experts), ("num_experts_per_tok", self.n_experts_per_tok)):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise DevstralError(f"config: {name} must be a positive integer, got {v!r}")
            if self.n_experts_per_tok > self.n_experts:
                raise DevstralError(f"config: num_experts_per_tok ({self.n_experts_per_tok}) is more than "
                                    f"num_local_experts ({self.n_experts})")
            if self.n_experts > 1024:
                raise DevstralError(f"config: num_local_experts {self.n_experts} is absurd (more than 1024)")
        for name in ("bos_id", "eos_id"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.vocab_size:
                raise DevstralError(f"config: {name} must be a token id below vocab_size {self.vocab_size}, "
                                    f"got {v!r}")

    # ------------------------------------------------------------------ readers
    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        g = _Getter(d, source)
        model_type = g.opt("model_type")
        if model_type == "mistral3":
            if g.opt("text_config") is None:
                raise DevstralError(f"{source}: model_type mistral3 needs a text_config")
            return cls.from_hf(d["text_config"], source=f"{source}: text_config")
        if model_type not in ("mistral", "ministral3", "mixtral"):
            raise DevstralError(
                f"{source}: unknown model_type {model_type!r} (expected mistral, ministral3, mistral3 or mixtral)"
            )
        dim, n_heads = g.integer("hidden_size"), g.integer("num_attention_heads")
        head_dim = g.integer("head_dim", None) or (dim // n_heads if n_heads > 0 else 0)  # 0: reported below
        rope_key = "rope_parameters" if g.opt("rope_parameters") else "rope_scaling"
        rope = _Getter(g.opt(rope_key) or {}, f"{source}: {rope_key}")
        theta = rope.number("rope_theta", None)
        if theta is None:
            theta = g.number("rope_theta", 1e6 if model_type == "ministral3" else 10000.0)
        rope_type = rope.text("rope_type", None) or rope.text("type", None)
        yarn = None
        if rope_type == "yarn":
            yarn = YarnScaling(
                factor=rope.number("factor"),
                original_max_position_embeddings=rope.integer("original_max_position_embeddings"),
                beta_fast=rope.number("beta_fast", 32.0) or 32.0,
                beta_slow=rope.number("beta_slow", 1.0) or 1.0,
                attention_factor=rope.number("attention_factor", None),
                mscale=rope.number("mscale", None),
                mscale_all_dim=rope.number("mscale_all_dim", None),
                truncate=rope.flag("truncate", True),
            )
        elif rope_type not in (None, "default"):
            raise DevstralError(f"{source}: unsupported rope type {rope_type!r}")
        llama4_beta = llama4_max = None
        if model_type == "ministral3":
            llama4_beta = rope.number("llama_4_scaling_beta", 0.0)
            llama4_max = (rope.integer("original_max_position_embeddings", None)
                          or g.integer("max_position_embeddings", None))
        eos = g.opt("eos_token_id", 2)
        if isinstance(eos, list) and eos:
            eos = eos[0]
        return _build(
            cls, source,
            arch="ministral3" if model_type == "ministral3" else "mistral",
            vocab_size=g.integer("vocab_size"),
            dim=dim,
            n_layers=g.integer("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=g.integer("num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            hidden_dim=g.integer("intermediate_size"),
            norm_eps=g.number("rms_norm_eps", 1e-5),
            rope_theta=theta,
            max_position_embeddings=g.integer("max_position_embeddings", 32768),
            sliding_window=g.integer("sliding_window", None),
            tie_embeddings=g.flag("tie_word_embeddings", False),
            yarn=yarn,
            llama4_beta=llama4_beta,
            llama4_original_max=llama4_max,
            bos_id=g.integer("bos_token_id", 1),
            eos_id=_Getter({"eos_token_id": eos}, source).integer("eos_token_id"),
            pad_id=g.integer("pad_token_id", None),
            n_experts=g.integer("num_local_experts") if model_type == "mixtral" else 0,
            n_experts_per_tok=g.integer("num_experts_per_tok") if model_type == "mixtral" else 0,
        )

    @classmethod
    def from_params(cls, d: dict[str, Any], source: str = "params.json") -> ModelConfig:
        g = _Getter(d, source)
        dim, n_heads = g.integer("dim"), g.integer("n_heads")
        yarn = None
        if g.opt("yarn"):
            y = _Getter(g.opt("yarn"), f"{source}: yarn")
            apply_scale = y.flag("apply_scale", True)
            yarn = YarnScaling(
                factor=y.number("factor"),
                original_max_position_embeddings=y.integer("original_max_position_embeddings"),
                beta_fast=y.number("beta", 32.0),
                beta_slow=y.number("alpha", 1.0),
                # Mistral's reference only scales cos/sin when apply_scale is set.
                attention_factor=None if apply_scale else 1.0,
            )
        llama4_beta = llama4_max = None
        arch = "mistral"
        if g.opt("llama_4_scaling"):
            l4 = _Getter(g.opt("llama_4_scaling"), f"{source}: llama_4_scaling")
            arch = "ministral3"
            llama4_beta = l4.number("beta", 0.0)
            llama4_max = (l4.integer("original_max_position_embeddings", None)
                          or (yarn.original_max_position_embeddings if yarn else 0) or g.integer("max_seq_len"))
        moe = _Getter(g.opt("moe") or {}, f"{source}: moe")
        n_experts = moe.integer("num_experts", None) or 0 if g.opt("moe") else 0
        per_tok = moe.integer("num_experts_per_tok", None) or 0 if g.opt("moe") else 0
        max_pos = g.integer("max_position_embeddings", None) or g.integer("max_seq_len", None)
        if max_pos is None:
            max_pos = int(yarn.factor * yarn.original_max_position_embeddings) if yarn else 32768
        return _build(
            cls, source,
            arch=arch,
            vocab_size=g.integer("vocab_size"),
            dim=dim,
            n_layers=g.integer("n_layers"),
            n_heads=n_heads,
            n_kv_heads=g.integer("n_kv_heads", None) or n_heads,
            head_dim=g.integer("head_dim", None) or (dim // n_heads if n_heads > 0 else 0),
            hidden_dim=g.integer("hidden_dim"),
            norm_eps=g.number("norm_eps"),
            rope_theta=g.number("rope_theta", 10000.0),
            max_position_embeddings=max_pos,
            sliding_window=g.integer("sliding_window", None),
            tie_embeddings=g.flag("tied_embeddings", False),
            yarn=yarn,
            llama4_beta=llama4_beta,
            llama4_original_max=llama4_max,
            n_experts=n_experts,
            n_experts_per_tok=per_tok,
        )

    @classmethod
    def from_dir(cls, folder: Path) -> ModelConfig:
        """Read config.json (preferred) or params.json from a model folder."""
        for name, reader in (("config.json", cls.from_hf), ("params.json", cls.from_params)):
            path = folder / name
            if path.is_file():
                return reader(read_json(path), source=str(path))
        raise DevstralError(f"{folder}: no config.json or params.json")

    # ------------------------------------------------------------------ writers
    def to_hf(self) -> dict[str, Any]:
        """An HF config.json that transformers loads as MistralForCausalLM / Ministral3ForCausalLM."""
        d: dict[str, Any] = {
            "architectures": ["Ministral3ForCausalLM" if self.arch == "ministral3" else "MistralForCausalLM"],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "pad_token_id": self.pad_id,
            "torch_dtype": "bfloat16",
        }
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.yarn is not None:
            y = self.yarn
            rope.update(rope_type="yarn", type="yarn", factor=y.factor,
                        original_max_position_embeddings=y.original_max_position_embeddings,
                        beta_fast=y.beta_fast, beta_slow=y.beta_slow)
            for k in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(y, k) is not None:
                    rope[k] = getattr(y, k)
        if self.arch == "ministral3":
            rope["llama_4_scaling_beta"] = self.llama4_beta or 0.0
            rope.setdefault("original_max_position_embeddings", self.llama4_original_max)
        d["rope_parameters"] = rope
        d["rope_theta"] = self.rope_theta
        if self.n_experts:
            if self.arch == "ministral3":
                raise DevstralError("config.json has no Mixtral with llama-4 query scaling; use params.json")
            d.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=self.n_experts,
                     num_experts_per_tok=self.n_experts_per_tok)
        return d

    def to_params(self) -> dict[str, Any]:
        """Mistral's native params.json."""
        d: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings, "tied_embeddings": self.tie_embeddings,
        }
        if self.sliding_window:
            d["sliding_window"] = self.sliding_window
        if self.yarn is not None:
            y = self.yarn
            if y.attention_factor not in (None, 1.0) or y.mscale is not None:
                raise DevstralError("params.json cannot express this YaRN attention factor; use config.json")
            d["yarn"] = {"factor": y.factor, "original_max_position_embeddings": y.original_max_position_embeddings,
                         "beta": y.beta_fast, "alpha": y.beta_slow, "apply_scale": y.attention_factor is None}
        if self.arch == "ministral3":
            d["llama_4_scaling"] = {"beta": self.llama4_beta or 0.0,
                                    "original_max_position_embeddings": self.llama4_original_max}
        if self.n_experts:
            d["moe"] = {"num_experts": self.n_experts, "num_experts_per_tok": self.n_experts_per_tok}
        return d

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim * max(1, self.n_experts) + self.dim * self.n_experts  # + router
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.dim) + emb + self.dim

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d


# generation_config.json keys the sampler reads (engine/sampling.defaults_for_model), with the values
# it accepts: checked here so that a bad file is one line naming the key, not an error deep in sampling.
_GENERATION_KEYS = {
    "temperature": ("number", lambda v: v >= 0, ">= 0"),
    "top_k": ("integer", lambda v: v >= 0, ">= 0"),
    "top_p": ("number", lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": ("number", lambda v: 0 <= v < 1, "in [0, 1)"),
    "repetition_penalty": ("number", lambda v: v > 0, "> 0"),
    "do_sample": ("flag", lambda v: True, ""),
}


def check_generation_config(folder: Path | None) -> None:
    """Raise one DevstralError naming the file and key when generation_config.json would not load."""
    path = Path(folder) / "generation_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return
    g = _Getter(read_json(path), str(path))
    for key, (kind, ok, why) in _GENERATION_KEYS.items():
        value = getattr(g, kind)(key, None)
        if value is None:
            continue
        if kind == "number" and not math.isfinite(value) or not ok(value):
            raise DevstralError(f"{path}: {key} must be {why}, got {g.d[key]!r}")


# Our field names and the key each one has in config.json / params.json, for error messages.
SOURCE_KEYS = {
    "vocab_size": ("vocab_size", "vocab_size"), "dim": ("hidden_size", "dim"),
    "n_layers": ("num_hidden_layers", "n_layers"), "n_heads": ("num_attention_heads", "n_heads"),
    "n_kv_heads": ("num_key_value_heads", "n_kv_heads"), "head_dim": ("head_dim", "head_dim"),
    "hidden_dim": ("intermediate_size", "hidden_dim"), "norm_eps": ("rms_norm_eps", "norm_eps"),
    "rope_theta": ("rope_theta", "rope_theta"),
    "max_position_embeddings": ("max_position_embeddings", "max_position_embeddings"),
    "sliding_window": ("sliding_window", "sliding_window"), "bos_id": ("bos_token_id", "bos_token_id"),
    "eos_id": ("eos_token_id", "eos_token_id"), "n_experts": ("num_local_experts", "moe.num_experts"),
    "n_experts_per_tok": ("num_experts_per_tok", "moe.num_experts_per_tok"),
}


def source_key(source: str, field_name: str) -> str:
    """The key our field `field_name` has in the file `source` came from (params.json or config.json)."""
    keys = SOURCE_KEYS.get(field_name)
    return keys[1 if source.endswith("params.json") else 0] if keys else field_name


def config_key(cfg: ModelConfig, field_name: str) -> str:
    """'path/config.json: num_hidden_layers' for the field 'n_layers' of a config read from a file."""
    source = str(cfg.extra.get("source", "config"))
    return f"{source}: {source_key(source, field_name)}"


def _build(cls, source: str, **fields: Any) -> ModelConfig:
    """Construct, naming the file and its key when a value is invalid."""
    try:
        return cls(**fields, extra={"source": source})
    except (TypeError, ValueError, OverflowError) as e:
        raise DevstralError(f"{source}: {e}") from None
    except DevstralError as e:
        message = str(e).removeprefix("config: ")
        ours, _, rest = message.partition(" ")
        if ours in SOURCE_KEYS:
            message = f"{source_key(source, ours)} {rest}"
        raise DevstralError(f"{source}: {message}") from None


_REQUIRED: Any = object()


class _Getter:
    """Reads keys from a config dict, checking their JSON types; errors name the file and the key."""

    def __init__(self, d: Any, source: str):
        if not isinstance(d, dict):
            raise DevstralError(f"{source}: expected a JSON object, got {_json_type(d)}")
        self.d, self.source = d, source

    def req(self, key: str) -> Any:
        if key not in self.d or self.d[key] is None:
            raise DevstralError(f"{self.source}: missing key {key!r}")
        return self.d[key]

    def opt(self, key: str, default: Any = None) -> Any:
        v = self.d.get(key)
        return default if v is None else v

    def _get(self, key: str, default: Any) -> Any:
        return self.req(key) if default is _REQUIRED else self.opt(key, default)

    def _bad(self, key: str, kind: str) -> DevstralError:
        return DevstralError(f"{self.source}: {key} must be {kind}, got {self.d[key]!r}"[:300])

    def integer(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self._get(key, default)
        if v is default:
            return v
        # 4096.0 is an integer written by a float-minded exporter; 1.5, "8" and true are not.
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, "an integer")
        return v

    def number(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self._get(key, default)
        if v is default:
            return v
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self._bad(key, "a number")
        return float(v)

    def flag(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self._get(key, default)
        if v is not default and not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def text(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self._get(key, default)
        if v is not default and not isinstance(v, str):
            raise self._bad(key, "a string")
        return v


def _json_type(v: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(v), type(v).__name__)


def read_text(path: Path) -> str:
    """A UTF-8 text file (a leading BOM dropped), or one line naming the file and the bad byte."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DevstralError(f"{path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DevstralError(f"{path}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at line {line})") from None


def read_json(path: Path) -> Any:
    """A JSON file, or one line naming the file and what is wrong with it."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DevstralError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DevstralError(f"{path}: invalid JSON (nested too deeply)") from None
