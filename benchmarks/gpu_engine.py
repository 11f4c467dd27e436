"""The engine's targets (issue 10) in one run on a GPU: batch-1 decode, decode at 32k of context,
prefill at 8k and 32k, 64 concurrent streams, and an agent turn's time to first token with its
history in the prefix cache. transformers' `generate` runs on the same weights in the same run.

    python benchmarks/gpu_engine.py --out $OUT/engine_h200.json          # Devstral-Small shape, bf16
    python benchmarks/gpu_engine.py --shape tiny --device cpu --runs 1   # smoke test of the script
    python benchmarks/gpu_engine.py --gguf /tmp/q4km.gguf --out $OUT/engine_q4km_h200.json
                                  # the same targets on a GGUF's quantized weights (issue 11), plus the
                                  # GPU memory of the loaded weights against the file's tensor bytes

On a GPU one batch-1 decode step is also taken apart (step_profile.py: kernels by kind, their GPU time,
launch gaps; `--skip step` leaves it out). Each figure is the median of --runs runs. Rooflines: decode
reads every weight but the embedding table once per step, plus the KV cache of the context; prefill is
counted at 2 FLOPs per weight per token plus the attention's 4·T·ctx·heads·head_dim per layer, against
the bf16 matmul rate measured in the same run.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import SHAPES, NullTokenizer, measure_bandwidth, random_model  # noqa: E402
from devstral.config import ModelConfig  # noqa: E402
from devstral.engine.engine import EngineConfig  # noqa: E402
from devstral.engine.generate import LLM  # noqa: E402
from devstral.engine.sampling import SamplingParams  # noqa: E402
from devstral.kernels import pdl, stamps  # noqa: E402
from devstral.kernels.kv_format import bytes_per_token  # noqa: E402
from step_profile import step_breakdown  # noqa: E402

GREEDY = SamplingParams(temperature=0)


def matmul_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(1000, vocab, (n - 1,), generator=g).tolist()


def run(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Add the sequences, step until all finish; time the prefill (to the last first token) and decode."""
    t0 = time.perf_counter()
    seqs = [engine.add(p, GREEDY, new_tokens, set()) for p in prompts]
    while any(s.first_token_time is None for s in seqs):
        engine.step()
    t1 = time.perf_counter()
    stamps = [t1]  # when each step() returned: in steady state one step's GPU time apart
    while engine.has_work():
        engine.step()
        stamps.append(time.perf_counter())
    t2 = time.perf_counter()
    assert all(s.num_output_tokens == new_tokens for s in seqs)
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "ttft_s": [s.first_token_time - t0 for s in seqs],
            "decode_tok_s": len(seqs) * (new_tokens - 1) / (t2 - t1), "steps": step_intervals(stamps)}


def step_intervals(stamps: list[float]) -> dict:
    """The decode loop's step() intervals: their median is the steady state's time per step; what the
    loop took beyond median x steps is fixed cost (the first and last steps, which overlap nothing)."""
    gaps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    if not gaps:
        return {}
    mid = statistics.median(gaps)
    deciles = statistics.quantiles(gaps, n=10, method="inclusive") if len(gaps) > 1 else [None]
    p10, p90 = deciles[0], deciles[-1]
    return {"count": len(gaps), "median_us": round(mid * 1e6, 1),
            "p10_us": p10 and round(p10 * 1e6, 1), "p90_us": p90 and round(p90 * 1e6, 1),
            "beyond_median_ms": round((stamps[-1] - stamps[0] - mid * len(gaps)) * 1e3, 2),
            "first_three_us": [round(g * 1e6, 1) for g in gaps[:3]], "last_three_us": [round(g * 1e6, 1) for g in gaps[-3:]]}


def load_gguf(path: Path, device: torch.device):
    """The GGUF's model on the device (weights kept quantized), the bytes a decode step reads (every
    tensor but the token embedding, which is a lookup), and its GPU memory against the file."""
    from devstral.formats.gguf_model import load_gguf_model
    from devstral.formats.gguf_read import GGUFFile

    g = GGUFFile(path)
    tensor_bytes = {name: int(g.info(name).nbytes) for name in g.tensor_names}
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model, cfg, _ = load_gguf_model(path, device=device)
    loaded = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else None
    read = sum(n for name, n in tensor_bytes.items() if name != "token_embd.weight")
    if "output.weight" not in tensor_bytes:  # tied head: the embedding is read once per step after all
        read += tensor_bytes.get("token_embd.weight", 0)
    total = sum(tensor_bytes.values())
    memory = {"file_tensor_bytes": total, "gpu_bytes_after_load": loaded,
              "ratio_to_file": loaded / total if loaded else None}
    return model, cfg, read, memory


def median(xs):
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="devstral-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--long", type=int, default=32768, help="the long context (decode and prefill)")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--stream-context", type=int, default=2048)
    ap.add_argument("--agent-prefix", type=int, default=16384)
    ap.add_argument("--agent-new", type=int, default=500)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-overlap", action="store_true", help="EngineConfig(overlap=False): read each decode "
                    "step's tokens before launching the next (the default on CUDA overlaps them)")
    ap.add_argument("--speculative", default="off", choices=["off", "lookup"],
                    help="off (default) measures plain decode; random weights make lookup's drafts meaningless")
    ap.add_argument("--gguf", type=Path, help="measure this GGUF's weights (kept quantized) instead of random bf16")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out: step,long,streams,agent")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.shape == "tiny":  # a smoke test of the script itself
        a.long, a.streams, a.stream_context, a.agent_prefix, a.agent_new, a.new_tokens = 512, 4, 128, 256, 32, 8

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    skip = set(filter(None, a.skip.split(",")))
    bandwidth, tflops = measure_bandwidth(device), matmul_tflops(device)
    memory: dict = {}
    if a.gguf is not None:
        model, cfg, read_per_step, memory = load_gguf(a.gguf, device)
        a.no_hf = True  # transformers has no quantized-GGUF path to compare on the GPU
    else:
        cfg = ModelConfig(**SHAPES[a.shape])
        model = random_model(cfg, device, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        read_per_step = weight_bytes - model.model.embed_tokens.weight.nbytes  # the embedding is a lookup
    ec = EngineConfig(max_context=a.long + a.new_tokens + 64, max_num_seqs=a.streams, kv_cache_dtype=a.kv_cache_dtype,
                      cuda_graphs=not a.no_graphs, speculative=a.speculative, overlap=not a.no_overlap)
    t = time.perf_counter()
    llm = LLM(model, cfg, NullTokenizer(cfg.vocab_size), engine_config=ec)
    engine = llm.engine
    setup_s = time.perf_counter() - t
    kv_per_token = bytes_per_token(engine.kind, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    flops_per_token = 2 * (cfg.n_params - cfg.vocab_size * cfg.dim)

    def decode_limit(ctx: int) -> float | None:
        return bandwidth * 1e9 / (read_per_step + ctx * kv_per_token) if bandwidth else None

    def prefill_limit(n: int) -> float | None:
        attn = 4 * n * n / 2 * cfg.n_heads * cfg.head_dim * cfg.n_layers  # causal: half the square
        return tflops * 1e12 / (flops_per_token + attn / n) if tflops else None

    run(engine, [prompt(64, cfg.vocab_size, 0)], 8)  # warm-up: kernels compiled, graphs replayed once
    res: dict = {}
    # 1. batch-1 decode with a 512-token prompt
    r, snaps = [], []
    for i in range(a.runs):
        stamps.snapshot(device)  # clears what earlier work left in the stamp buffer (None unless DEVSTRAL_STAMPS=1)
        r.append(run(engine, [prompt(512, cfg.vocab_size, 10 + i)], a.new_tokens))
        snaps.append(stamps.snapshot(device))
    res["decode_b1_ctx512"] = {"tok_s": median([x["decode_tok_s"] for x in r]), "runs": [x["decode_tok_s"] for x in r],
                               "limit_tok_s": decode_limit(512 + a.new_tokens // 2), "step_intervals": r[-1]["steps"]}
    if any(snaps):  # DEVSTRAL_STAMPS=1: the last step's attention chain and final norm, from inside the kernels
        res["decode_b1_ctx512"]["stamps"] = {"phases_us": [stamps.phases(sn) for sn in snaps if sn],
                                             "last_snapshot": snaps[-1]}
    if device.type == "cuda" and "step" not in skip:  # where the step goes (kernels by kind, launch gaps)
        try:
            # at the timed decode's context (512 tokens): profiled at 16, busy + idle fell short of the timed
            # step's wall time by ~90 us on 40 layers and ~12 on 10 (H200, session 13), the attention's share
            res["decode_step"] = step_breakdown(engine, run, prompt(512, cfg.vocab_size, 7), cfg.n_layers, a.gguf)
        except Exception as e:  # the profiler is an aid: a failure there must not lose the run's figures
            res["decode_step"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    # 2. prefill at 8k, and 3. at the long context, followed by decode there
    for name, n in (("8k", 8192), ("long", a.long)):
        if n + a.new_tokens > engine.max_context or (name == "long" and "long" in skip):
            continue
        r = [run(engine, [prompt(n, cfg.vocab_size, 100 + i)], a.new_tokens) for i in range(a.runs)]
        res[f"prefill_{name}"] = {"tokens": n, "tok_s": median([n / x["prefill_s"] for x in r]),
                                  "limit_tok_s": prefill_limit(n)}
        if name == "long":
            res["decode_b1_long"] = {"context": n, "tok_s": median([x["decode_tok_s"] for x in r]),
                                     "runs": [x["decode_tok_s"] for x in r], "limit_tok_s": decode_limit(n)}
    # 4. many concurrent streams
    r = [] if "streams" in skip else [
        run(engine, [prompt(a.stream_context - a.new_tokens, cfg.vocab_size, 1000 * i + j) for j in range(a.streams)],
            a.new_tokens) for i in range(a.runs)]
    if r:
        res["streams"] = {"streams": a.streams, "context": a.stream_context,
                          "aggregate_decode_tok_s": median([x["decode_tok_s"] for x in r]),
                          "runs": [x["decode_tok_s"] for x in r]}
    # 5. an agent turn: the history is cached, the new turn adds agent_new tokens
    if "agent" not in skip:
        agent_turn(engine, a, res)
    finish(a, cfg, dtype, engine, device, bandwidth, tflops, read_per_step, setup_s, memory, model, res)


def agent_turn(engine, a, res: dict) -> None:
    vocab = engine.runner.model.config.vocab_size
    history = prompt(a.agent_prefix, vocab, 7)
    run(engine, [history], 1)
    ttft = []
    for i in range(a.runs + 2):
        turn = history + prompt(a.agent_new + 1, vocab, 500 + i)[1:]
        x = run(engine, [turn], 2)
        ttft.append(x["ttft_s"][0])
    res["agent_turn"] = {"prefix": a.agent_prefix, "new": a.agent_new, "ttft_ms": median(ttft) * 1e3,
                         "runs_ms": [t * 1e3 for t in ttft], "prefix_cache_hit_rate": engine.blocks.stats.hit_rate}


def finish(a, cfg, dtype, engine, device, bandwidth, tflops, read_per_step, setup_s, memory, model, res) -> None:
    for key in ("decode_b1_ctx512", "decode_b1_long"):
        if key in res and res[key]["limit_tok_s"]:
            res[key]["fraction_of_limit"] = res[key]["tok_s"] / res[key]["limit_tok_s"]
    for key in ("prefill_8k", "prefill_long"):
        if key in res and res[key]["limit_tok_s"]:
            res[key]["fraction_of_peak"] = res[key]["tok_s"] / res[key]["limit_tok_s"]

    out = {
        "benchmark": "gpu_engine", "shape": a.shape if a.gguf is None else f"gguf:{a.gguf.name}",
        "weights_memory": memory, "params": cfg.n_params, "dtype": str(dtype).removeprefix("torch."),
        "kv_cache": engine.kind, "speculative": a.speculative, "cuda_graphs": engine.runner.graphs is not None,
        "dependent_launch": pdl.enabled(device), "overlap": not a.no_overlap, "runs": a.runs,
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                    "host_cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "measured_copy_gb_s": bandwidth, "measured_bf16_tflops": tflops, "weight_bytes_read_per_step": read_per_step,
        "kv_pool_tokens": engine.pool.num_tokens, "engine_setup_s": setup_s, "results": res,
    }
    if not a.no_hf:
        from decode import bench_hf as hf_bench

        p = prompt(512, cfg.vocab_size, 10)
        out["transformers_b1_ctx512"] = hf_bench(model, cfg, p, a.new_tokens, a.runs, device)
        out["versions"]["transformers"] = out["transformers_b1_ctx512"].pop("version")
        out["ratio_vs_transformers_decode"] = res["decode_b1_ctx512"]["tok_s"] / out["transformers_b1_ctx512"]["decode_tok_s"]
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
