"""Small checkpoints in the real on-disk formats, for tests and demos.

`make_tiny_checkpoint` writes a folder that loads exactly like a real Devstral download: HF layout
(config.json + safetensors, optionally sharded with an index) or Mistral's native layout
(params.json + consolidated.safetensors, q/k rows in the interleaved rotary order), with a tokenizer
built from the files mistral-common ships.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from devstral.config import ModelConfig, YarnScaling
from devstral.formats.safetensors import permute_for_interleaved

_SPM_FILES = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
              "v3": "mistral_instruct_tokenizer_240323.model.v3", "v7": "mistral_instruct_tokenizer_241114.model.v7"}
# Control-token ranks as Mistral's tekken files lay them out (Devstral's tekken.json).
_TEKKEN_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]",
                    6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]",
                    11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]",
                    17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]", 32: "[ARGS]",
                    33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]"}
TEKKEN_SPECIAL_COUNT = 1000


def mistral_common_data() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data"


def write_tekken(path: Path, *, version: str = "v13", inner_vocab: int = 3096,
                 image: dict[str, int] | None = None) -> int:
    """A tekken.json with the first `inner_vocab` BPE ranks of mistral-common's tekken_240911.json.

    Truncating by rank keeps a valid byte-level BPE. Returns the total vocab size (specials included).
    `image`: mistral-common's image section (image_patch_size, max_image_size, spatial_merge_size), as a
    multimodal model's tekken.json carries it.
    """
    src = json.loads((mistral_common_data() / "tekken_240911.json").read_text(encoding="utf-8"))
    if not 256 <= inner_vocab <= len(src["vocab"]):
        raise ValueError(f"inner_vocab must be in [256, {len(src['vocab'])}]")
    vocab = _with_fim_lead_pair(src["vocab"][:inner_vocab])
    specials = [{"rank": i, "token_str": _TEKKEN_SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
                for i in range(TEKKEN_SPECIAL_COUNT)]
    data = {
        "config": {**src["config"], "version": version, "num_vocab_tokens": inner_vocab,
                   "default_vocab_size": inner_vocab + TEKKEN_SPECIAL_COUNT,
                   "default_num_special_tokens": TEKKEN_SPECIAL_COUNT},
        "vocab": vocab,
        "special_tokens": specials,
    }
    if image is not None:
        data["image"] = dict(image)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return inner_vocab + TEKKEN_SPECIAL_COUNT


# mistral-common encodes a FIM suffix as `encode("☺" + suffix)[2:]` (a SentencePiece leading-space
# trick it applies to tekken too). In the full tekken vocab "☺" is two tokens, b"\xe2\x98" + b"\xba";
# a vocab cut by rank lacks that merge, makes "☺" three tokens and leaves a stray byte in every FIM
# prompt. The last kept rank is given to the pair so small vocabs encode FIM like the real one.
_FIM_LEAD_PAIR = base64.b64encode(b"\xe2\x98").decode()


def _with_fim_lead_pair(vocab: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(vocab) <= 256 or any(v["token_bytes"] == _FIM_LEAD_PAIR for v in vocab):
        return vocab
    last = vocab[-1]["rank"]
    return [*vocab[:-1], {"rank": last, "token_bytes": _FIM_LEAD_PAIR, "token_str": None}]


def _random_state(cfg: ModelConfig, seed: int, std: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = std) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": rnd(cfg.vocab_size, cfg.dim, scale=1.0),
          "model.norm.weight": 1 + rnd(cfg.dim, scale=0.1)}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = rnd(cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": rnd(q, cfg.dim), p + "self_attn.k_proj.weight": rnd(kv, cfg.dim),
               p + "self_attn.v_proj.weight": rnd(kv, cfg.dim), p + "self_attn.o_proj.weight": rnd(cfg.dim, q)}
        if cfg.n_experts:  # Mixtral's checkpoint names; the dense order below is kept (seeded tests rely on it)
            for e in range(cfg.n_experts):
                x = f"{p}block_sparse_moe.experts.{e}."
                sd |= {x + "w1.weight": rnd(cfg.hidden_dim, cfg.dim), x + "w3.weight": rnd(cfg.hidden_dim, cfg.dim),
                       x + "w2.weight": rnd(cfg.dim, cfg.hidden_dim)}
            sd[p + "block_sparse_moe.gate.weight"] = rnd(cfg.n_experts, cfg.dim, scale=0.5)
        else:
            sd |= {p + "mlp.gate_proj.weight": rnd(cfg.hidden_dim, cfg.dim),
                   p + "mlp.up_proj.weight": rnd(cfg.hidden_dim, cfg.dim),
                   p + "mlp.down_proj.weight": rnd(cfg.dim, cfg.hidden_dim)}
        sd |= {p + "input_layernorm.weight": 1 + rnd(cfg.dim, scale=0.1),
               p + "post_attention_layernorm.weight": 1 + rnd(cfg.dim, scale=0.1)}
    return sd


def tiny_vision_config(text_dim: int, **dims: Any):
    """A Pixtral encoder + Mistral 3 projector at toy size: 4-pixel patches, 2x2 merge (8 pixels per
    image token), images up to 64 pixels a side."""
    from devstral.model.vision_config import VisionConfig

    base: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, n_layers=2, n_heads=2, patch_size=4,
                                image_size=64, rope_theta=10000.0, hidden_act="silu", spatial_merge_size=2,
                                projector_act="gelu")
    return VisionConfig(text_dim=text_dim, **(base | dims))


def _random_vision_state(vc, seed: int, std: float) -> dict[str, torch.Tensor]:
    """HF names of Mistral3ForConditionalGeneration (transformers >= 5: under `model.`)."""
    g = torch.Generator().manual_seed(seed + 7919)

    def rnd(*shape: int, scale: float = std) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    d, f = vc.hidden_size, vc.intermediate_size
    t, p = "model.vision_tower.", "model.multi_modal_projector."
    sd = {t + "patch_conv.weight": rnd(d, vc.num_channels, vc.patch_size, vc.patch_size, scale=0.2),
          t + "ln_pre.weight": 1 + rnd(d, scale=0.1),
          p + "norm.weight": 1 + rnd(d, scale=0.1),
          p + "patch_merger.merging_layer.weight": rnd(d, d * vc.spatial_merge_size ** 2, scale=0.1),
          p + "linear_1.weight": rnd(vc.text_dim, d, scale=0.2), p + "linear_2.weight": rnd(vc.text_dim, vc.text_dim)}
    if vc.projector_bias:
        sd |= {p + "linear_1.bias": rnd(vc.text_dim), p + "linear_2.bias": rnd(vc.text_dim)}
    for i in range(vc.n_layers):
        q = f"{t}transformer.layers.{i}."
        sd |= {q + "attention_norm.weight": 1 + rnd(d, scale=0.1), q + "ffn_norm.weight": 1 + rnd(d, scale=0.1),
               **{q + f"attention.{n}_proj.weight": rnd(d, d, scale=0.15) for n in "qkvo"},
               q + "feed_forward.gate_proj.weight": rnd(f, d, scale=0.15),
               q + "feed_forward.up_proj.weight": rnd(f, d, scale=0.15),
               q + "feed_forward.down_proj.weight": rnd(d, f, scale=0.15)}
    return sd


def to_mistral_names(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our (HF) names and rotary layout -> Mistral's consolidated names and interleaved layout."""
    out = {}
    rename = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
              "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
              "post_attention_layernorm": "ffn_norm", "block_sparse_moe": "feed_forward"}
    for name, t in sd.items():
        if name == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = t
        elif name == "model.norm.weight":
            out["norm.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
        else:
            rest = name.removeprefix("model.")
            for ours, theirs in rename.items():
                rest = rest.replace(ours, theirs)
            if rest.endswith(("attention.wq.weight", "attention.wk.weight")):
                t = permute_for_interleaved(t, cfg.n_heads if "wq" in rest else cfg.n_kv_heads)
            out[rest] = t
    return out


def tiny_config(arch: str = "mistral", vocab_size: int = 4096, **dims: Any) -> ModelConfig:
    base: dict[str, Any] = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                                rope_theta=10000.0, max_position_embeddings=1024, norm_eps=1e-5)
    if arch == "ministral3":
        base |= dict(rope_theta=1e6, yarn=YarnScaling(factor=4.0, original_max_position_embeddings=64,
                                                       beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                     llama4_beta=0.1, llama4_original_max=64, max_position_embeddings=256)
    base |= dims
    return ModelConfig(arch=arch, vocab_size=vocab_size, **base)


def make_tiny_checkpoint(path: str | Path, layout: str = "hf", arch: str = "mistral", tokenizer: str = "tekken",
                         seed: int = 0, *, tokenizer_version: str | None = None, shards: int = 1,
                         dtype: torch.dtype = torch.float32, std: float = 0.08, wrap_mistral3: bool = False,
                         inner_vocab: int = 3096, vision: dict[str, Any] | None = None, **dims: Any) -> Path:
    """Write a small random checkpoint in a real format and return its folder.

    layout: "hf" (config.json + safetensors) or "mistral" (params.json + consolidated.safetensors).
    arch: "mistral" (Devstral Small 1.x) or "ministral3" (Devstral Small 2: YaRN + llama-4 scaling).
    tokenizer: "tekken" (version v13 by default) or "spm" (SentencePiece, v7 by default).
    wrap_mistral3: HF only; write a Mistral3ForConditionalGeneration (Devstral Small 2's layout): the
    decoder under `model.language_model.`, a tiny random Pixtral tower and projector
    (tiny_vision_config, overridden by `vision`), and the image section in tekken.json.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vc = None
    if wrap_mistral3:
        vc = tiny_vision_config(dims.get("dim", 64), **(vision or {}))
    if tokenizer == "tekken":
        image = None if vc is None else {"image_patch_size": vc.patch_size, "max_image_size": vc.image_size,
                                         "spatial_merge_size": vc.spatial_merge_size}
        vocab = write_tekken(path / "tekken.json", version=tokenizer_version or "v13", inner_vocab=inner_vocab,
                             image=image)
    elif tokenizer == "spm":
        version = tokenizer_version or "v7"
        shutil.copy(mistral_common_data() / _SPM_FILES[version], path / f"tokenizer.model.{version}")
        vocab = 32000 if version == "v1" else 32768
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}")
    cfg = tiny_config(arch, vocab_size=dims.pop("vocab_size", vocab), **dims)
    sd = {k: v.to(dtype).contiguous() for k, v in _random_state(cfg, seed, std).items()}
    if layout == "mistral":
        (path / "params.json").write_text(json.dumps(cfg.to_params(), indent=2))
        save_file(to_mistral_names(sd, cfg), str(path / "consolidated.safetensors"))
        return path
    if layout != "hf":
        raise ValueError(f"unknown layout {layout!r}")
    hf = cfg.to_hf()
    if vc is not None:
        hf = vc.to_hf(hf)
        sd = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
              for k, v in sd.items()}
        sd |= {k: v.to(dtype).contiguous() for k, v in _random_vision_state(vc, seed, std).items()}
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    _save_sharded(sd, path, shards)
    return path


def _save_sharded(sd: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    from safetensors.torch import save_file

    if shards <= 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[i::shards]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def make_nano(path: str | Path) -> Path:
    """The embedded `nano` model: Devstral Small 2's architecture at toy size, untrained (random) weights."""
    from devstral.config import YarnScaling

    return make_tiny_checkpoint(
        path, layout="hf", arch="ministral3", tokenizer="tekken", seed=2512, dtype=torch.bfloat16, std=0.05,
        dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=768, max_position_embeddings=32768,
        yarn=YarnScaling(factor=8.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0),
        llama4_original_max=4096)


@contextlib.contextmanager
def patched_sampler(pick):
    """Replace the engine's sampler while the block runs: `pick(logits_row, params, history) -> token id`
    is called for every sequence that samples, on the engine's thread. Tests use it to script the
    model's output (a tool call from a random model), to hold a request mid-generation, or to fail."""
    import devstral.engine.llamacpp_engine as llama_engine
    import devstral.engine.model_runner as runner
    import devstral.engine.scheduler as scheduler

    real_sample, real_allowed = runner.sample, scheduler.speculation_allowed

    def sample(logits, params, histories, generators):
        return torch.tensor([pick(logits[i], params[i], histories[i]) for i in range(logits.shape[0])],
                            dtype=torch.long, device=logits.device)

    runner.sample = llama_engine.sample = sample  # both engines' samplers
    scheduler.speculation_allowed = lambda params, has_constraint: False  # every token through `pick`
    try:
        yield
    finally:
        runner.sample, scheduler.speculation_allowed = real_sample, real_allowed
        llama_engine.sample = real_sample
