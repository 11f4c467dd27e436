"""Prefill and decode tok/s of our engine, against HF transformers' `generate` in the same run.

    python benchmarks/decode.py --shape devstral-small --device cuda --out results/decode_h100.json
    python benchmarks/decode.py --model ~/models/Devstral-Small-2507 --device cuda
    python benchmarks/decode.py --shape tiny --device cpu --runs 1      # smoke test

Random-shape runs build the weights directly on the device (bf16, N(0, 0.02)); both engines use the
very same tensors (the HF model is assigned our parameters), so memory holds one copy. The roofline
for batch-1 decode is the measured HBM bandwidth divided by the bytes of weights read per token.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from devstral.config import ModelConfig  # noqa: E402
from devstral.engine.generate import LLM  # noqa: E402
from devstral.engine.sampling import SamplingParams  # noqa: E402
from devstral.model.transformer import Transformer  # noqa: E402

SHAPES = {
    # Devstral Small 1.x / 2 text decoder
    "devstral-small": dict(arch="mistral", vocab_size=131072, dim=5120, n_layers=40, n_heads=32, n_kv_heads=8,
                           head_dim=128, hidden_dim=32768, rope_theta=1e9, max_position_embeddings=131072),
    # Devstral 2 (123B dense): Mistral Large 2's decoder widths (12288 / 88 layers / 96 heads / 8 kv heads /
    # FFN 28672) with the tekken vocabulary of 131072 and a 256k window; tensor_parallel.py runs it on 2 GPUs
    "devstral-2": dict(arch="mistral", vocab_size=131072, dim=12288, n_layers=88, n_heads=96, n_kv_heads=8,
                       head_dim=128, hidden_dim=28672, rope_theta=1e6, max_position_embeddings=262144),
    "tiny": dict(arch="mistral", vocab_size=4096, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                 hidden_dim=256),
}


class NullTokenizer:
    """Random weights need no vocabulary: ids in, empty text out, and no EOS to stop early."""

    version, bos_id, eos_id, default_system_prompt = "none", 1, -1, None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text, *, bos=False, eos=False):
        return [1] if bos else []

    def decode(self, ids, *, special=False):
        return ""

    def is_special(self, token_id):
        return False

    def special_id(self, token):
        return None

    def encode_chat(self, messages, tools=None):
        raise NotImplementedError


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 24B model has no room for an fp32 copy
    try:
        with torch.device("meta"):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    from devstral.model.rope import Rotary

    model.rotary = Rotary(cfg).to(device)
    return model.eval().requires_grad_(False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy, counting bytes read plus written (GB/s)."""
    if device.type != "cuda":
        return None
    x = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t)
    del x, y
    return 2 * (2 << 30) / statistics.median(times) / 1e9


def bench_ours(llm: LLM, prompt: list[int], new_tokens: int, runs: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=new_tokens)
    llm.generate(prompt[:32], params.updated(max_tokens=4))  # warm-up
    pre, dec = [], []
    for _ in range(runs):
        c = llm.generate(prompt, params)
        assert len(c.token_ids) == new_tokens
        pre.append(c.timings["prefill_tok_s"])
        dec.append(c.timings["decode_tok_s"])
    return {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
            "prefill_runs": pre, "decode_runs": dec}


def bench_hf(model: Transformer, cfg: ModelConfig, prompt: list[int], new_tokens: int, runs: int,
             device: torch.device) -> dict:
    import transformers

    hf_cfg = transformers.MistralConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures",)})
    with torch.device("meta"):
        hf = transformers.MistralForCausalLM(hf_cfg)
    hf.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("rotary")}, assign=True,
                       strict=False)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg).to(device)
    hf = hf.eval()
    ids = torch.tensor([prompt], device=device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    hf.generate(ids[:, :32], max_new_tokens=4, min_new_tokens=4, **kw)
    pre, dec = [], []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            hf(ids, use_cache=True)
        sync(device)
        t1 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        sync(device)
        t2 = time.perf_counter()
        assert out.shape[1] - ids.shape[1] == new_tokens
        prefill = t1 - t0
        pre.append(len(prompt) / prefill)
        dec.append((new_tokens - 1) / max((t2 - t1) - prefill, 1e-9))
    return {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
            "prefill_runs": pre, "decode_runs": dec, "version": transformers.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="devstral-small")
    ap.add_argument("--model", help="a model folder instead of a random shape")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model:
        import devstral

        llm = devstral.load(args.model, device=args.device, max_context=args.prompt_len + args.new_tokens + 64,
                            backend="torch")  # it times our torch engine (llm.model)
        cfg, model = llm.config, llm.model
        llm.tokenizer.eos_id = -1  # measure exactly new_tokens
    else:
        cfg = ModelConfig(**SHAPES[args.shape])
        model = random_model(cfg, device, dtype)
        llm = LLM(model, cfg, NullTokenizer(cfg.vocab_size),
                  max_context=args.prompt_len + args.new_tokens + 64)
    g = torch.Generator().manual_seed(1)
    prompt = [1] + torch.randint(1000, cfg.vocab_size, (args.prompt_len - 1,), generator=g).tolist()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = measure_bandwidth(device)

    result = {
        "benchmark": "decode",
        "model": args.model or args.shape,
        "params": cfg.n_params,
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_len,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
            platform.machine(),
            "host_cpus": __import__("os").cpu_count(),
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "weight_bytes": weight_bytes,
        "measured_hbm_gb_s": bandwidth,
        "roofline_decode_tok_s": bandwidth * 1e9 / weight_bytes if bandwidth else None,
        "devstral": bench_ours(llm, prompt, args.new_tokens, args.runs),
    }
    if not args.no_hf:
        result["transformers"] = bench_hf(model, cfg, prompt, args.new_tokens, args.runs, device)
        result["versions"]["transformers"] = result["transformers"].pop("version")
        ours, hf = result["devstral"], result["transformers"]
        result["ratio_vs_transformers"] = {"prefill": ours["prefill_tok_s"] / hf["prefill_tok_s"],
                                           "decode": ours["decode_tok_s"] / hf["decode_tok_s"]}
    if result["roofline_decode_tok_s"]:
        result["decode_fraction_of_roofline"] = result["devstral"]["decode_tok_s"] / result["roofline_decode_tok_s"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
