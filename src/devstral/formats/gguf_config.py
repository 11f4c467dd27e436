"""GGUF metadata <-> ModelConfig, with the key names llama.cpp reads.

Devstral Small 1.x is written as llama.cpp's `llama` architecture; models with the llama-4 query
temperature (Devstral Small 2, `ministral3`) as `mistral3`, whose loader reads
`attention.temperature_scale` and takes the temperature length from the YaRN original context.
"""

from __future__ import annotations

from typing import Any

from devstral.config import ModelConfig, YarnScaling
from devstral.errors import DevstralError

KNOWN_ARCHS = ("llama", "mistral3", "mistral")


def _first(v: Any) -> Any:
    """Per-layer arrays (llama.cpp allows them) must be uniform for our model."""
    if isinstance(v, list):
        if not v or any(x != v[0] for x in v):
            raise DevstralError(f"per-layer values {v[:8]} differ; only uniform layers are supported")
        return v[0]
    return v


def config_from_gguf(md: dict[str, Any], *, source: str, vocab_size: int | None = None,
                     has_output: bool = True) -> ModelConfig:
    """ModelConfig from GGUF metadata; a key of the wrong type or an absurd value names the file."""
    try:
        return _config_from_gguf(md, source=source, vocab_size=vocab_size, has_output=has_output)
    except (TypeError, ValueError, OverflowError) as e:
        raise DevstralError(f"{source}: invalid model metadata ({' '.join(str(e).split())[:200]})") from None
    except DevstralError as e:
        message = str(e)
        if message.startswith("config: "):
            ours, _, rest = message.removeprefix("config: ").partition(" ")
            key = _GGUF_KEYS.get(ours)
            message = f"{source}: {md.get('general.architecture')}.{key} {rest}" if key else \
                f"{source}: {ours} {rest}"
        raise DevstralError(message) from None


# Our config fields and the GGUF metadata key (after "ARCH.") each one is read from, for error messages.
_GGUF_KEYS = {"n_layers": "block_count", "dim": "embedding_length", "n_heads": "attention.head_count",
              "n_kv_heads": "attention.head_count_kv", "hidden_dim": "feed_forward_length",
              "head_dim": "attention.key_length", "norm_eps": "attention.layer_norm_rms_epsilon",
              "rope_theta": "rope.freq_base", "max_position_embeddings": "context_length",
              "vocab_size": "vocab_size", "sliding_window": "attention.sliding_window"}


def _config_from_gguf(md: dict[str, Any], *, source: str, vocab_size: int | None, has_output: bool) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch not in KNOWN_ARCHS:
        raise DevstralError(f"{source}: unknown architecture {arch!r} in general.architecture "
                            f"(supported: {', '.join(KNOWN_ARCHS)})")

    def key(name: str, default: Any = ...) -> Any:
        full = f"{arch}.{name}"
        if full in md:
            return _first(md[full])
        if default is ...:
            raise DevstralError(f"{source}: missing metadata key {full}")
        return default

    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", 0) or dim // n_heads)
    rope_dims = key("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise DevstralError(f"{source}: {arch}.rope.dimension_count {rope_dims} != head size {head_dim} "
                            "(partial rotary embeddings are not supported)")
    ctx = int(key("context_length", 32768))
    yarn = None
    scaling = key("rope.scaling.type", None)
    if scaling == "yarn":
        orig = int(key("rope.scaling.original_context_length", ctx))
        log_mul = key("rope.scaling.yarn_log_multiplier", None)
        attn_factor = key("rope.scaling.attn_factor", None)
        # llama.cpp: a non-zero log multiplier (mscale_all_dim) cancels the YaRN magnitude scaling
        # (HF's mscale == mscale_all_dim case); zero or absent means the default 0.1*ln(factor)+1.
        if attn_factor is None and log_mul:
            attn_factor = 1.0
        yarn = YarnScaling(factor=float(key("rope.scaling.factor")), original_max_position_embeddings=orig,
                           beta_fast=float(key("rope.scaling.yarn_beta_fast", 32.0)),
                           beta_slow=float(key("rope.scaling.yarn_beta_slow", 1.0)),
                           attention_factor=None if attn_factor is None else float(attn_factor))
    elif scaling not in (None, "none"):
        raise DevstralError(f"{source}: unsupported {arch}.rope.scaling.type {scaling!r}")
    temp_scale = key("attention.temperature_scale", None)
    llama4_beta = llama4_max = None
    model_arch = "mistral"
    if temp_scale is not None:
        model_arch = "ministral3"
        llama4_beta = float(temp_scale)
        llama4_max = int(key("attention.temperature_length", 0)
                         or (yarn.original_max_position_embeddings if yarn else 0) or ctx)
    vocab = vocab_size or key("vocab_size", None) or len(md.get("tokenizer.ggml.tokens", []))
    if not vocab:
        raise DevstralError(f"{source}: cannot tell the vocabulary size")
    return ModelConfig(
        extra={"source": source},
        arch=model_arch,
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        hidden_dim=int(key("feed_forward_length")),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=ctx,
        sliding_window=key("attention.sliding_window", None),
        tie_embeddings=not has_output,
        yarn=yarn,
        llama4_beta=llama4_beta,
        llama4_original_max=llama4_max,
        bos_id=int(md.get("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(md.get("tokenizer.ggml.eos_token_id", 2)),
        pad_id=md.get("tokenizer.ggml.padding_token_id"),
        n_experts=int(key("expert_count", 0) or 0),
        n_experts_per_tok=int(key("expert_used_count", 0) or 0),
    )


def gguf_arch_for(cfg: ModelConfig) -> str:
    return "mistral3" if cfg.llama4_beta is not None else "llama"


def write_config(writer, cfg: ModelConfig) -> None:
    """Add the architecture keys for `cfg` to a gguf.GGUFWriter (whose arch is gguf_arch_for(cfg))."""
    w = writer
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    if cfg.n_experts:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.n_experts_per_tok)
    if cfg.yarn is not None:
        import gguf

        y = cfg.yarn
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(y.factor)
        w.add_rope_scaling_orig_ctx_len(y.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(y.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(y.beta_slow)
        factor = y.resolved_attention_factor()
        default = 0.1 * __import__("math").log(y.factor) + 1.0 if y.factor > 1 else 1.0
        if abs(factor - 1.0) < 1e-6:
            w.add_rope_scaling_yarn_log_mul(1.0)  # llama.cpp: cancel the magnitude scaling
        elif abs(factor - default) > 1e-6:
            raise DevstralError(f"YaRN attention factor {factor} cannot be expressed in GGUF metadata "
                                "(llama.cpp supports 1.0 or 0.1*ln(factor)+1)")
    if cfg.llama4_beta is not None:
        w.add_attn_temperature_scale(cfg.llama4_beta)
        w.add_uint32(f"{w.arch}.attention.temperature_length", int(cfg.llama4_original_max or 0))
        if cfg.yarn is None or cfg.yarn.original_max_position_embeddings != cfg.llama4_original_max:
            # llama.cpp takes the temperature length from the YaRN original context
            if cfg.yarn is not None:
                raise DevstralError("llama-4 temperature length differs from YaRN's original context; "
                                    "llama.cpp cannot express that")
            w.add_rope_scaling_orig_ctx_len(int(cfg.llama4_original_max or cfg.max_position_embeddings))
