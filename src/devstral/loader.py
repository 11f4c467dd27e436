"""`devstral.load()`: a model spec -> a ready LLM (config, weights, tokenizer, sampling defaults).

Resolution order for the model: the argument, then $DEVSTRAL_MODEL, then the embedded `nano`.
Only "org/repo" specs touch the network, and only through huggingface_hub (formats/hub.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from devstral.config import ModelConfig, check_generation_config
from devstral.devices import resolve_device, resolve_dtype
from devstral.errors import DevstralError
from devstral.model.rope import Rotary
from devstral.model.transformer import Transformer

NANO_DIR = Path(__file__).parent / "models" / "nano"


def resolve_model(spec: str | os.PathLike | None, *, fetch_mmproj: bool = True) -> Path:
    """Turn a model spec into a local path (folder or .gguf file). An `org/repo:QUANT` download also
    fetches the repo's vision projector unless `fetch_mmproj` is False (formats/hub.py)."""
    spec = str(spec) if spec is not None else os.environ.get("DEVSTRAL_MODEL") or "nano"
    if spec == "nano":
        return NANO_DIR
    path = Path(spec).expanduser()
    if path.exists():
        return path
    stored = _stored(spec)
    if stored is not None:
        return Path(stored.path)
    looks_like_repo = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and "\\" not in spec
    if looks_like_repo:
        from devstral.formats.hub import download

        return download(spec, mmproj=fetch_mmproj)
    raise DevstralError(f"model not found: {spec} (no such file or folder)")


def _stored(spec: str):
    """The local model store's entry named `spec` (devstral/store.py), if any."""
    from devstral.store import ModelStore

    try:
        return ModelStore().get(spec)
    except DevstralError:  # not a valid store name, or an unreadable index: not a stored model
        return None


def build_model(folder: Path, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device,
                quantize_on_load: str | None = None, vision_notice: bool = True,
                shard: tuple[int, int] | None = None) -> Transformer:
    """Create the network without allocating it, then fill it tensor by tensor from disk (with
    `shard=(rank, world)`, only that tensor-parallel rank's slices; parallel/layers.py then wires it)."""
    from devstral.formats.bnb4bit import bnb_quantization, iter_model_weights
    from devstral.formats.safetensors import check_config_against_weights
    from devstral.model.nf4 import NF4Linear
    from devstral.parallel.sharding import local_shape
    from devstral.quant.on_load import make_setter

    check_config_against_weights(folder, cfg)  # before building anything from the config's sizes
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {n: tuple(p.shape) if shard is None else local_shape(n, tuple(p.shape), *shard)
                for n, p in model.named_parameters()}
    loaded: set[str] = set()
    set_tensor = _set_parameter if quantize_on_load is None else make_setter(quantize_on_load, dtype=dtype,
                                                                             default=_set_parameter)
    if quantize_on_load is not None and bnb_quantization(folder) is not None:
        raise DevstralError(f"--quantize-on-load: {folder} is already quantized (bitsandbytes 4-bit)")
    for name, tensor in iter_model_weights(folder, cfg, dtype=dtype, device=device, notice=vision_notice,
                                           shard=shard):
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # tied: the head is the embedding, whatever copy the file also carries
        if name not in expected:
            raise DevstralError(f"{folder}: unexpected tensor {name!r} in the weights")
        shape = (tensor.out_features, tensor.in_features) if isinstance(tensor, NF4Linear) else tuple(tensor.shape)
        if shape != expected[name]:
            raise DevstralError(f"{folder}: tensor {name} has shape {list(shape)} but the config "
                                f"implies {list(expected[name])}")
        if isinstance(tensor, NF4Linear):  # a bitsandbytes-4bit linear: the module replaces the nn.Linear
            parent, _, leaf = name.rpartition(".")[0].rpartition(".")
            setattr(model.get_submodule(parent), leaf, tensor)
        else:
            set_tensor(model, name, tensor)
        loaded.add(name)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = sorted(set(expected) - loaded)
    if missing:
        raise DevstralError(f"{folder}: tensor {missing[0]} is missing from the weights"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.rotary = Rotary(cfg).to(device)
    return model.eval().requires_grad_(False)


def _set_parameter(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))


def _is_gguf(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not any(path.glob("*.safetensors")) and any(path.glob("*.gguf"))


def load(model: str | os.PathLike | None = None, *, adapter: str | os.PathLike | None = None, device: str = "auto",
         dtype: str = "auto", kv_cache_dtype: str = "auto", max_context: int | None = None, parallel: int = 1,
         gpu_memory_fraction: float | None = None, cuda_graphs: bool = True, prefix_caching: bool = True,
         speculative: str = "lookup", max_batched_tokens: int | None = None, backend: str = "auto",
         threads: int | None = None, quantize_on_load: str | None = None, vision: bool = True,
         mmproj: str | os.PathLike | None = None, tensor_parallel: int | None = None):
    """Load a model folder (HF or Mistral layout), a .gguf file, "org/repo", or the embedded "nano".

    `max_context` None gives the model's whole window where the KV cache's memory allows it;
    `parallel` is how many sequences the engine batches (the server's --parallel). `backend` is
    "auto", "torch" or "llama.cpp" (engine/backend.py); `threads` is llama.cpp's CPU thread count
    (default: torch's, which `--threads` sets); `quantize_on_load` ("q8_0", "q4_k" or "fp8") quantizes a
    safetensors model's linear weights as they stream in (quant/on_load.py). A multimodal checkpoint's
    vision encoder is loaded too (images in chat), unless `vision` is False; `mmproj` is the vision
    projector GGUF that goes with a GGUF model (llama.cpp's --mmproj). `tensor_parallel` N > 1 spreads
    the text model over N processes (parallel/): this one becomes rank 0 and spawns the others; under
    torchrun every process calls load() and only rank 0 returns."""
    from devstral.engine.backend import choose_backend
    from devstral.engine.engine import EngineConfig
    from devstral.engine.generate import LLM
    from devstral.engine.sampling import defaults_for_model
    from devstral.prompt.tokenizer import load_tokenizer
    from devstral.quant.on_load import parse_kind

    quantize_on_load = parse_kind(quantize_on_load)
    # a projector of our own choosing (--mmproj) or none wanted (--no-vision): the repo's is not fetched
    path = resolve_model(model, fetch_mmproj=vision and mmproj is None)
    vision_model = None
    # generation_config.json beside the weights: a bad one fails here, in a second, not after them
    check_generation_config(path if path.is_dir() else path.parent)
    if _is_gguf(path) and quantize_on_load:
        raise DevstralError(f"--quantize-on-load applies to safetensors models; {path} is a GGUF, already quantized")
    if mmproj is not None and not _is_gguf(path):
        raise DevstralError("--mmproj goes with a GGUF model; a safetensors model carries its own vision encoder")
    tp = None
    from devstral.parallel.launch import wanted

    if wanted(tensor_parallel):
        from devstral.parallel.launch import start

        if mmproj is not None:
            raise DevstralError("--mmproj with --tensor-parallel: images run in one process (text only here)")
        tp = start(tensor_parallel, path, device=device, backend=backend, adapter=adapter, load_kwargs=dict(
            dtype=dtype, quantize_on_load=quantize_on_load, backend="torch"))
        backend, vision = "torch", False  # the text decoder is split; a vision tower is not loaded
    shard = (tp.rank, tp.world) if tp is not None else None
    engine = choose_backend(backend, gguf=_is_gguf(path), device=device, adapter=adapter is not None)
    if engine == "llama.cpp" and backend == "auto" and vision and _is_gguf(path):
        engine = _auto_with_images(path, mmproj)
    llama = engine == "llama.cpp"
    dev = torch.device("cpu") if llama else tp.device if tp is not None else resolve_device(device)
    if llama:
        from devstral.engine.backend import gpu_layers
        from devstral.engine.llamacpp_model import LlamaCppModel, check_gguf
        from devstral.formats.gguf_model import gguf_config
        from devstral.formats.gguf_read import GGUFFile
        from devstral.formats.gguf_tokenizer import GGUFTokenizer

        if dtype != "auto":
            print(f"note: --dtype {dtype} is ignored by the llama.cpp backend (the GGUF's types are used)",
                  file=sys.stderr)
        g = GGUFFile(path)
        cfg = gguf_config(g)
        tokenizer = GGUFTokenizer(g.metadata, source=str(g.path))
        check_gguf(g, cfg)  # our one-line errors for a bad file; then the weights are llama.cpp's alone
        net = LlamaCppModel(g.path, gpu_layers=gpu_layers(device))
        folder = path.parent if path.is_file() else path
        vision_model = _llama_cpp_images(path, mmproj, net, cfg, tokenizer, vision=vision,
                                         threads=threads or torch.get_num_threads())
    elif _is_gguf(path):
        from devstral.formats.gguf import load_gguf_model

        net, cfg, tokenizer = load_gguf_model(path, device=dev, dtype=dtype, shard=shard)
        folder = path.parent if path.is_file() else path
        projector = Path(mmproj).expanduser() if mmproj is not None else None
        if projector is None and vision:
            projector = _beside(path, cfg, tokenizer)
            if projector is not None:
                print(f"note: vision projector {projector} (found beside the model; --mmproj picks another, "
                      "--no-vision skips it)", file=sys.stderr)
        if projector is not None and vision:
            vision_model = _load_mmproj(projector, net, cfg, tokenizer)
        elif hasattr(tokenizer, "no_images_reason"):
            tokenizer.no_images_reason = NO_PROJECTOR if tp is None and vision else None
    else:
        if not path.is_dir():
            raise DevstralError(f"{path}: not a model folder or .gguf file")
        from devstral.formats.vision_checkpoint import build_vision, has_vision_tensors, vision_config_of

        cfg = ModelConfig.from_dir(path)
        tokenizer = load_tokenizer(path)  # before the weights: a missing tokenizer should fail in a second
        vc = vision_config_of(path, cfg) if vision else None
        if vc is not None and not has_vision_tensors(path):
            vc = None  # a mistral3 config over text-only weights
        dt = resolve_dtype(dtype, dev, cfg)
        net = build_model(path, cfg, dtype=dt, device=dev, quantize_on_load=quantize_on_load,
                          vision_notice=vc is None, shard=shard)
        if vc is not None and _images_enabled(tokenizer, vc):
            vision_model = build_vision(path, cfg, vc, dtype=dt, device=dev)
        folder = path
    if tp is not None:
        from devstral.parallel.layers import parallelize

        parallelize(net, tp)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise DevstralError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{cfg.vocab_size}")
    if adapter is not None:
        from devstral.formats.peft import apply_adapter

        apply_adapter(net, Path(adapter))
        from devstral.formats.peft import apply_projector

        apply_projector(vision_model, Path(adapter))  # a projector trained with the LoRA (--train-projector)
    if max_context is not None and max_context <= 0:
        raise DevstralError(f"--ctx-size must be positive, got {max_context}")
    if max_context is not None:
        warn_beyond_trained_context(max_context, cfg)
    sampling = defaults_for_model(folder if folder.is_dir() else None)
    spec = str(model) if model is not None else os.environ.get("DEVSTRAL_MODEL")
    stored = _stored(spec) if spec and spec != "nano" and not Path(spec).expanduser().exists() else None
    if stored is not None:  # a stored model's Modelfile: its system prompt and sampling parameters
        if stored.system is not None:
            tokenizer.default_system_prompt = stored.system
        sampling = sampling.updated(**_store_sampling(stored.parameters))
        if max_context is None and stored.parameters.get("num_ctx"):
            max_context = min(int(stored.parameters["num_ctx"]), cfg.max_position_embeddings)
    if speculative not in ("off", "lookup"):
        raise DevstralError(f"--speculative: unknown value {speculative!r} (choose off or lookup)")
    ec = EngineConfig(max_context=max_context, max_num_seqs=parallel, kv_cache_dtype=kv_cache_dtype,
                      cuda_graphs=cuda_graphs, prefix_caching=prefix_caching, speculative=speculative,
                      max_num_batched_tokens=max_batched_tokens)
    if gpu_memory_fraction is not None:
        ec.gpu_memory_fraction = gpu_memory_fraction
    if tp is not None:
        from devstral.parallel.lockstep import TensorParallelLLM, follow

        if not tp.is_leader:
            follow(net, cfg, tp)  # until rank 0 says stop
            raise SystemExit(0)
        return TensorParallelLLM(net, cfg, tokenizer, tp=tp, path=path, sampling=sampling, engine_config=ec)
    if llama:
        from devstral.engine.llamacpp_llm import LlamaCppLLM

        return LlamaCppLLM(net, cfg, tokenizer, path=path, sampling=sampling, engine_config=ec,
                           threads=threads or torch.get_num_threads(), vision=vision_model)
    return LLM(net, cfg, tokenizer, path=path, sampling=sampling, engine_config=ec, vision=vision_model)


def load_prompt_encoder(model: str | os.PathLike | None = None, *, mmproj: str | os.PathLike | None = None,
                        vision: bool = True):
    """A model's tokenizer, taking images as `load()` would set it up (the vision config of a mistral3
    folder, or of the mmproj GGUF given or found beside a GGUF model), from headers and config files
    alone: no weights are read. What `devstral template` shows a request as."""
    from devstral.prompt.tokenizer import load_tokenizer

    path = resolve_model(model, fetch_mmproj=vision and mmproj is None)
    tokenizer = load_tokenizer(path)
    if mmproj is not None and not _is_gguf(path):
        raise DevstralError("--mmproj goes with a GGUF model; a safetensors model carries its own vision encoder")
    if not vision:
        return tokenizer
    if _is_gguf(path):
        from devstral.formats.gguf_mmproj import find_mmproj, vision_config_from_gguf
        from devstral.formats.gguf_read import parse_header, resolve_gguf_path

        md = parse_header(resolve_gguf_path(path)).metadata
        dim = md.get(f"{md.get('general.architecture')}.embedding_length")
        img = tokenizer.special_id("[IMG]")
        projector = Path(mmproj).expanduser() if mmproj is not None else None
        if projector is None and img is not None and isinstance(dim, int):
            projector = find_mmproj(path, dim)
        if projector is None:
            tokenizer.no_images_reason = NO_PROJECTOR
            return tokenizer
        if not projector.is_file():
            raise DevstralError(f"--mmproj: {projector}: no such file")
        if img is None:
            raise DevstralError(f"--mmproj: the model's vocabulary has no [IMG] token; {projector} does not go with it")
        vc = vision_config_from_gguf(parse_header(projector).metadata, text_dim=dim, image_token_id=img,
                                     source=str(projector))
        _images_enabled(tokenizer, vc)
    elif (path / "config.json").is_file():  # a mistral3 config (a tokenizer-only folder has none)
        from devstral.formats.vision_checkpoint import has_vision_tensors, vision_config_of

        vc = vision_config_of(path, ModelConfig.from_dir(path))
        try:
            tower = vc is not None and has_vision_tensors(path)
        except DevstralError:  # config and tokenizer without weights: what the config describes
            tower = True
        if tower:
            _images_enabled(tokenizer, vc)
    return tokenizer


NO_PROJECTOR = ("this GGUF has no vision projector: pass --mmproj FILE (llama.cpp's mmproj GGUF), or keep "
                "mmproj-*.gguf beside the model")


def _beside(path: Path, cfg: ModelConfig, tokenizer) -> Path | None:
    """The mmproj GGUF beside a GGUF model that fits it (formats/gguf_mmproj.find_mmproj), when the
    model's vocabulary has image tokens at all."""
    from devstral.formats.gguf_mmproj import find_mmproj

    if tokenizer.special_id("[IMG]") is None:
        return None
    return find_mmproj(path, cfg.dim)


def _auto_with_images(path: Path, mmproj) -> str:
    """`--backend auto` chose llama.cpp for a GGUF: torch instead when a projector goes with it and this
    llama-cpp-python has no multimodal library (images keep working, on our encoder)."""
    from devstral.engine.llamacpp_images import mtmd_unavailable

    if mtmd_unavailable() is None:
        return "llama.cpp"
    if mmproj is not None:
        return "torch"
    from devstral.formats.gguf_read import parse_header, resolve_gguf_path

    md = parse_header(resolve_gguf_path(path)).metadata
    dim = md.get(f"{md.get('general.architecture')}.embedding_length")
    from devstral.formats.gguf_mmproj import find_mmproj

    return "torch" if isinstance(dim, int) and find_mmproj(path, dim) is not None else "llama.cpp"


def _llama_cpp_images(path: Path, mmproj, net, cfg: ModelConfig, tokenizer, *, vision: bool, threads: int):
    """The projector of a GGUF on the llama.cpp backend, run by llama.cpp's libmtmd (--mmproj, or the
    one found beside the model); None, with the tokenizer saying why, when there is none or it cannot run."""
    from devstral.engine.llamacpp_images import LlamaCppImages, mtmd_unavailable
    from devstral.formats.gguf_mmproj import vision_config_from_gguf
    from devstral.formats.gguf_read import parse_header

    if not vision:
        return None
    projector = Path(mmproj).expanduser() if mmproj is not None else None
    if projector is None:
        projector = _beside(path, cfg, tokenizer)
        if projector is None:
            tokenizer.no_images_reason = NO_PROJECTOR
            return None
        print(f"note: vision projector {projector} (found beside the model; --mmproj picks another, "
              "--no-vision skips it)", file=sys.stderr)
    if not projector.is_file():
        raise DevstralError(f"--mmproj: {projector}: no such file")
    img = tokenizer.special_id("[IMG]")
    if img is None:
        raise DevstralError(f"--mmproj: the model's vocabulary has no [IMG] token; {projector} does not go with it")
    vc = vision_config_from_gguf(parse_header(projector).metadata, text_dim=cfg.dim, image_token_id=img,
                                 source=str(projector))
    reason = mtmd_unavailable()
    if reason is not None:
        if mmproj is not None:
            raise DevstralError(f"--mmproj with --backend llama.cpp: {reason}")
        tokenizer.no_images_reason = reason
        return None
    if not _images_enabled(tokenizer, vc):
        return None
    return LlamaCppImages(net, projector, threads=threads)


def _load_mmproj(mmproj: Path, net, cfg: ModelConfig, tokenizer):
    from devstral.formats.gguf_mmproj import load_mmproj

    if not mmproj.is_file():
        raise DevstralError(f"--mmproj: {mmproj}: no such file")
    img = tokenizer.special_id("[IMG]")
    if img is None:
        raise DevstralError(f"--mmproj: the model's vocabulary has no [IMG] token; {mmproj} does not go with it")
    param = net.model.norm.weight
    vision = load_mmproj(mmproj, text_dim=cfg.dim, image_token_id=img, dtype=param.dtype, device=param.device)
    return vision if _images_enabled(tokenizer, vision.config) else None


def _images_enabled(tokenizer, vc) -> bool:
    """Teach the tokenizer to encode images for this vision encoder; False (with a note) when its kind
    cannot (mistral-common's encoder needs a mistral-common tokenizer)."""
    if not hasattr(tokenizer, "enable_images"):
        print(f"note: the vision encoder is not loaded: this model's tokenizer ({type(tokenizer).__name__}) "
              "cannot encode images (a tekken.json can)", file=sys.stderr)
        return False
    tokenizer.enable_images(vc)
    return True


def _store_sampling(parameters: dict) -> dict:
    names = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n", "seed": "seed", "stop": "stop"}
    out = {ours: parameters[theirs] for theirs, ours in names.items() if theirs in parameters}
    if parameters.get("num_predict", -1) > 0:
        out["max_tokens"] = parameters["num_predict"]
    return out


def warn_beyond_trained_context(ctx: int, cfg: ModelConfig) -> None:
    """One warning on stderr when the context asked for is longer than the one the model was trained on."""
    trained = cfg.max_position_embeddings
    if ctx > trained:
        where = cfg.extra.get("source", "the model's config")
        print(f"warning: --ctx-size {ctx} exceeds the model's trained context of {trained} tokens ({where}); "
              "output degrades past it", file=sys.stderr)
