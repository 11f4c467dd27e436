"""Images on a GPU (issue 19): the Pixtral encoder + Mistral 3 projector at Devstral Small 2's shape in
bf16, and the prefill of an agent turn carrying a 1024x1024 screenshot through the Devstral-Small decoder
(random weights), the first time (encoder + full prefill) and on the next turn (prefix cache: no encode).

    python benchmarks/vision_gpu.py                       # H200, ~40 s: $OUT/vision_gpu.json or benchmarks/results/
    python benchmarks/vision_gpu.py --shape tiny --device cpu --runs 1   # smoke test of the script

Figures are medians of --runs runs (CUDA events for the encoder, wall clock to the first token for the
turns). The encoder's limit is its FLOPs (2 per weight per patch, 4·N²·d per layer for attention, the
projector on N/4 merged tokens) at the bf16 matmul rate measured in the same run; the peer is
transformers' PixtralVisionModel + Mistral3MultiModalProjector (SDPA) on the same weights and pixels.
A turn's prefill limit is the decoder's FLOPs for its tokens at that rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import SHAPES, NullTokenizer, random_model  # noqa: E402
from devstral.config import ModelConfig  # noqa: E402
from devstral.engine.engine import EngineConfig  # noqa: E402
from devstral.engine.generate import LLM  # noqa: E402
from devstral.engine.sampling import SamplingParams  # noqa: E402
from devstral.model.vision import VisionModel  # noqa: E402
from devstral.model.vision_config import VisionConfig  # noqa: E402
from devstral.prompt.images import ImageTokens, attach_images  # noqa: E402
from gpu_engine import matmul_tflops  # noqa: E402

# Devstral Small 2's vision_config (Mistral Small 3.1's Pixtral tower): 14-pixel patches, 2x2 merge
VISION = {
    "devstral-small": dict(hidden_size=1024, intermediate_size=4096, n_layers=24, n_heads=16, patch_size=14,
                           image_size=1540, rope_theta=10000.0, hidden_act="silu", spatial_merge_size=2,
                           projector_act="gelu"),
    "tiny": dict(hidden_size=64, intermediate_size=128, n_layers=2, n_heads=2, patch_size=14, image_size=1540,
                 rope_theta=10000.0, hidden_act="silu", spatial_merge_size=2, projector_act="gelu"),
}
TOKENS = ImageTokens(img=10, img_break=12, img_end=13)  # tekken's ids
GREEDY = SamplingParams(temperature=0)


def image_side(pixels: int, vc: VisionConfig) -> int:
    """mistral-common's size for a square image of `pixels` a side: whole image tokens, rounded up."""
    unit = vc.patch_size * vc.spatial_merge_size
    return -(-min(pixels, vc.image_size) // unit) * unit


def random_vision(vc: VisionConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> VisionModel:
    with torch.device("meta"):
        model = VisionModel(vc)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return model.eval()


def encoder_flops(vc: VisionConfig, patches: int) -> float:
    d, f, n = vc.hidden_size, vc.intermediate_size, patches
    per_layer = 2 * n * (4 * d * d + 3 * d * f) + 4 * n * n * d
    merged = n // vc.spatial_merge_size ** 2
    projector = 2 * merged * (vc.spatial_merge_size ** 2 * d * d + d * vc.text_dim + vc.text_dim ** 2)
    return vc.n_layers * per_layer + projector + 2 * n * d * 3 * vc.patch_size ** 2


def timed(fn, device: torch.device, runs: int) -> list[float]:
    """ms per call: CUDA events on a GPU, wall clock on the CPU; one warm-up call first."""
    fn()
    out = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def transformers_peer(vision: VisionModel, pixels: torch.Tensor, device: torch.device, runs: int) -> dict:
    """transformers' Pixtral tower + Mistral 3 projector with our weights, SDPA attention."""
    try:
        import transformers
        from transformers import Mistral3Config
        from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector
        from transformers.models.pixtral.modeling_pixtral import PixtralVisionModel

        vc = vision.config
        text = {"model_type": "mistral", "hidden_size": vc.text_dim, "vocab_size": 1024, "num_hidden_layers": 1,
                "num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 64}
        cfg = Mistral3Config(**{k: v for k, v in vc.to_hf(text).items() if k != "architectures"})
        cfg.vision_config._attn_implementation = "sdpa"
        with torch.device(device):  # built where it runs: a CPU init of 0.4B weights would cost seconds
            tower = PixtralVisionModel(cfg.vision_config).to(vision.dtype).eval()
            projector = Mistral3MultiModalProjector(cfg).to(vision.dtype).eval()
        missing = tower.load_state_dict(vision.vision_tower.state_dict(), strict=False).missing_keys
        missing += projector.load_state_dict(vision.multi_modal_projector.state_dict(), strict=False).missing_keys
        if [k for k in missing if "inv_freq" not in k]:
            return {"error": f"weights not mapped: {missing[:3]}"}
        sizes = torch.tensor([list(pixels.shape[1:])], device=device)
        batch = pixels[None]

        def run():
            with torch.no_grad():
                states = tower(batch, image_sizes=sizes).last_hidden_state
                return projector(states.squeeze(0), sizes)

        ours = vision([pixels])[0].float()
        theirs = run().float()
        corr = torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1].item()
        ms = timed(run, device, runs)
        return {"version": transformers.__version__, "ms": statistics.median(ms), "runs_ms": ms,
                "output_correlation_with_ours": corr}
    except Exception as e:  # the peer is informative only: its API moves between releases
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def image_turn(vc: VisionConfig, side: int, prefix: int, suffix: int, vocab: int, seed: int):
    """Prompt ids of a turn: `prefix` history tokens, one screenshot, `suffix` tokens of request."""
    rng = np.random.default_rng(seed)
    unit = vc.patch_size * vc.spatial_merge_size
    rows = cols = side // unit
    run = ([TOKENS.img] * cols + [TOKENS.img_break]) * (rows - 1) + [TOKENS.img] * cols + [TOKENS.img_end]
    ids = [1, *rng.integers(1000, vocab, prefix - 1).tolist(), *run, *rng.integers(1000, vocab, suffix).tolist()]
    pixels = rng.standard_normal((3, side, side), dtype=np.float32)
    return attach_images(ids, [pixels], TOKENS)


def first_token(llm: LLM, ids, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    seq = llm.engine.add(ids, GREEDY, 1, set(), images=ids.images)
    while not seq.finished:
        llm.engine.step()
    return time.perf_counter() - t


def machine(device: torch.device) -> dict:
    import triton

    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "sms": torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                         "python": platform.python_version()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["devstral-small", "tiny"], default="devstral-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image", type=int, default=1024, help="screenshot side in pixels")
    ap.add_argument("--history", type=int, default=4096, help="tokens of the turn before the screenshot")
    ap.add_argument("--request", type=int, default=64, help="tokens after it")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.shape == "tiny":
        a.image, a.history, a.request = 112, 64, 8
    tflops = matmul_tflops(device)
    cfg = ModelConfig(**SHAPES[a.shape])
    vc = VisionConfig(text_dim=cfg.dim, **VISION[a.shape])
    vision = random_vision(vc, device, dtype)
    side = image_side(a.image, vc)
    patches = (side // vc.patch_size) ** 2
    g = torch.Generator(device=device).manual_seed(1)
    shots = [torch.randn(3, side, side, device=device, dtype=dtype, generator=g) for _ in range(2)]
    res: dict = {"benchmark": "vision_gpu", "shape": a.shape, "vision_config": vc.as_dict(), "runs": a.runs,
                 "image": {"requested": a.image, "side": side, "patches": patches,
                           "image_tokens": patches // vc.spatial_merge_size ** 2},
                 "bf16_matmul_tflops": tflops, "machine": machine(device)}

    # 1. the encoder: one screenshot per call, and two per call (ms per image)
    with torch.no_grad():
        one = timed(lambda: vision(shots[:1]), device, a.runs)
        two = timed(lambda: vision(shots), device, a.runs)
    flops = encoder_flops(vc, patches)
    limit_ms = flops / (tflops * 1e12) * 1e3 if tflops else None
    res["encoder"] = {
        "ms_per_image": statistics.median(one), "runs_ms": one,
        "batch_of_2_ms_per_image": statistics.median(two) / 2, "batch_of_2_runs_ms": two,
        "gflops_per_image": flops / 1e9, "limit_ms_at_measured_matmul_rate": limit_ms,
        "fraction_of_limit": limit_ms / statistics.median(one) if limit_ms else None,
        "transformers": transformers_peer(vision, shots[0], device, a.runs)}

    # 2. an agent turn with the screenshot: first time (encode + prefill) and the next turn (cached)
    model = random_model(cfg, device, dtype)
    turn = image_turn(vc, side, a.history, a.request, cfg.vocab_size, seed=0)
    ec = EngineConfig(max_context=len(turn) + 2 * a.request + 64, max_num_seqs=1, cuda_graphs=False,
                      max_num_batched_tokens=8192 if device.type == "cuda" else 512)
    llm = LLM(model, cfg, NullTokenizer(cfg.vocab_size), engine_config=ec, vision=vision)
    first_token(llm, image_turn(vc, side, a.history, a.request, cfg.vocab_size, seed=99), device)  # warm-up
    miss, hit, encodes = [], [], []
    for i in range(a.runs):
        ids = image_turn(vc, side, a.history, a.request, cfg.vocab_size, seed=1 + i)  # new history, new image
        before = llm.engine.images.encoded_images
        miss.append(first_token(llm, ids, device))
        follow_up = [*ids, *np.random.default_rng(100 + i).integers(1000, cfg.vocab_size, a.request).tolist()]
        nxt = attach_images(follow_up, [ids.images[0].pixels], TOKENS)
        hit.append(first_token(llm, nxt, device))
        encodes.append(llm.engine.images.encoded_images - before)
    n, n_next = len(turn), len(turn) + a.request
    flops_per_token = 2 * (cfg.n_params - cfg.vocab_size * cfg.dim)
    attn = 4 * n * n / 2 * cfg.n_heads * cfg.head_dim * cfg.n_layers
    prefill_limit_s = (flops_per_token * n + attn) / (tflops * 1e12) if tflops else None
    res["image_turn"] = {
        "prompt_tokens": n, "next_turn_prompt_tokens": n_next, "decoder_params": cfg.n_params,
        "miss": {"ttft_s": statistics.median(miss), "runs_s": miss, "prefill_tok_s": n / statistics.median(miss),
                 "limit_s_encoder_plus_prefill": (prefill_limit_s + limit_ms / 1e3) if tflops else None},
        "hit": {"ttft_s": statistics.median(hit), "runs_s": hit,
                "effective_tok_s": n_next / statistics.median(hit)},
        "encoder_runs_per_two_turns": encodes,
        "note": "random weights; CUDA graphs off (they serve decode steps only; image steps run eagerly)"}
    out = a.out or (Path(os.environ["OUT"]) / "vision_gpu.json" if os.environ.get("OUT")
                    else Path(__file__).parent / "results" / f"vision_gpu_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({"encoder_ms_per_image": res["encoder"]["ms_per_image"],
                      "encoder_fraction_of_limit": res["encoder"]["fraction_of_limit"],
                      "transformers_ms": res["encoder"]["transformers"].get("ms"),
                      "miss_ttft_s": res["image_turn"]["miss"]["ttft_s"],
                      "miss_prefill_tok_s": res["image_turn"]["miss"]["prefill_tok_s"],
                      "hit_ttft_s": res["image_turn"]["hit"]["ttft_s"], "encodes": encodes, "out": str(out)}))


if __name__ == "__main__":
    main()
