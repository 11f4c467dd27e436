"""Prompt-lookup speculative decoding against plain decode on agent turns (issue 15), on a GPU.

Random weights cannot make real drafts, so the model is forced to emit each turn's recorded output
(benchmarks/workloads/speculative.json, built by speculative_workloads.py from this repository's files):
its forward runs in full, then the logits of the token at position p get +1e4 on the recorded token
p + 1. The drafts therefore meet exactly the acceptance the real model would see when it writes that
output, while every matmul, attention and the CUDA graphs (decode and verify) cost what they cost.
One engine (graphs captured once); each run replays every workload with `--speculative off` (the
baseline) and then `lookup`, so both see the same machine state; outputs must be identical (and equal
the recording). Tokens come from the tekken vocabulary mistral-common ships (tekken_240911.json).

    python benchmarks/speculative.py                  # H200: ~2 min; JSON to $OUT/speculative_h200.json
    python benchmarks/speculative.py --shape tiny --device cpu --runs 1 --max-output 24   # smoke test

Per workload: decode tok/s (output tokens after the first, over the time after the first token) with
and without speculation (median of --runs), the ratio, drafted and accepted tokens, tokens per forward
pass, time to first token; against the physical limit: the bandwidth roofline of plain decode (weight
bytes read per pass / measured copy bandwidth), which speculation beats by verifying several tokens
per weight read. Turns are capped (--max-turns, --max-output) to fit the time budget.
"""

from __future__ import annotations

import argparse
import gc
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

WORKLOADS = Path(__file__).parent / "workloads" / "speculative.json"
GREEDY = SamplingParams(temperature=0)
BONUS = 1e4


def tekken():
    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    return Tekkenizer.from_file(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json")


def force_outputs(model, table: torch.Tensor) -> None:
    """Make the model emit table[p] after position p (the rest of its forward is untouched)."""
    forward = model.forward

    def forced(tokens, positions=None, *, select=None, **kw):
        logits = forward(tokens, positions, select=select, **kw)
        pos = positions[0] if select is None else positions[0, select]
        nxt = table[pos.clamp(max=table.numel() - 1)]
        bonus = torch.full((nxt.numel(), 1), BONUS, dtype=logits.dtype, device=logits.device)
        logits[0].scatter_add_(-1, nxt[:, None], bonus)
        return logits

    model.forward = forced


def run_turn(engine, table: torch.Tensor, prompt: list[int], output: list[int]) -> dict:
    full = torch.tensor(prompt + output, dtype=torch.long)
    table.zero_()
    table[:len(full) - 1].copy_(full[1:].to(table.device))
    drafted, accepted, steps = engine.stats.drafted_tokens, engine.stats.accepted_tokens, engine.stats.steps
    t0 = time.perf_counter()
    seq = engine.add(prompt, GREEDY, len(output), set())
    while seq.first_token_time is None:
        engine.step()
        if seq.finished and seq.first_token_time is None:  # a failed step: say why, do not spin
            raise RuntimeError(f"the turn failed: {seq.error}")
    t1, first_steps = time.perf_counter(), engine.stats.steps
    while engine.has_work():
        engine.step()
    t2 = time.perf_counter()
    got = seq.token_ids[seq.num_prompt_tokens:]
    return {"identical": got == output, "ttft_s": t1 - t0, "decode_s": t2 - t1, "tokens": len(output),
            "passes": engine.stats.steps - first_steps, "prefill_passes": first_steps - steps,
            "drafted": engine.stats.drafted_tokens - drafted, "accepted": engine.stats.accepted_tokens - accepted}


def summarize(rs: list[dict]) -> dict:
    tokens = sum(r["tokens"] - 1 for r in rs)
    return {"decode_tok_s": tokens / sum(r["decode_s"] for r in rs),
            "ttft_ms": 1e3 * statistics.median(r["ttft_s"] for r in rs),
            "identical": all(r["identical"] for r in rs), "passes": sum(r["passes"] for r in rs),
            "tokens_per_pass": tokens / max(1, sum(r["passes"] for r in rs)),
            "drafted": sum(r["drafted"] for r in rs), "accepted": sum(r["accepted"] for r in rs)}


def measure(model, cfg, device, turns: dict, runs: int, max_context: int) -> dict:
    """{mode: {workload: results}}: every run does each workload with speculation off, then on."""
    table = torch.zeros(max_context + 1, dtype=torch.long, device=device)
    force_outputs(model, table)
    llm = LLM(model, cfg, NullTokenizer(cfg.vocab_size),
              engine_config=EngineConfig(max_context=max_context, max_num_seqs=1, speculative="lookup",
                                         prefix_caching=False))
    engine = llm.engine
    first = next(iter(turns.values()))[0]
    for mode in ("off", "lookup"):  # warm-up: compile, replay the graphs once
        engine.scheduler.speculative = mode
        run_turn(engine, table, first[0][:256], first[1][:32])
    per_run = {"off": {n: [] for n in turns}, "lookup": {n: [] for n in turns}}
    for _ in range(runs):
        for name, items in turns.items():
            for mode in ("off", "lookup"):
                engine.scheduler.speculative = mode
                per_run[mode][name].append(summarize([run_turn(engine, table, p, o) for p, o in items]))
    out = {}
    for mode, by_name in per_run.items():
        out[mode] = {}
        for name, rs in by_name.items():
            out[mode][name] = {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
                               "runs": [r["decode_tok_s"] for r in rs],
                               "ttft_ms": statistics.median(r["ttft_ms"] for r in rs),
                               "identical_to_recording": all(r["identical"] for r in rs),
                               "tokens_per_pass": statistics.median(r["tokens_per_pass"] for r in rs),
                               "drafted": rs[-1]["drafted"], "accepted": rs[-1]["accepted"]}
    out["graph_row_buckets"] = engine.runner.row_buckets
    out["step_costs_ms"] = {r: 1e3 * t for r, t in sorted(engine.step_costs.seconds.items())}
    del model.forward  # the instance override goes; the class's forward is back
    del engine, llm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="devstral-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workloads", type=Path, default=WORKLOADS)
    ap.add_argument("--max-turns", type=int, default=3, help="turns per workload (time budget)")
    ap.add_argument("--max-output", type=int, default=256, help="cap each turn's output tokens (time budget)")
    ap.add_argument("--out", type=Path, help="default: $OUT/speculative_<gpu>.json, else benchmarks/results/")
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig(**SHAPES[a.shape])
    tok = tekken()
    data = json.loads(a.workloads.read_text())
    turns = {}
    for name, items in data.items():
        enc = []
        for t in items[:a.max_turns]:
            p = [i % cfg.vocab_size for i in tok.encode(t["prompt"], bos=True, eos=False)]
            o = [i % cfg.vocab_size for i in tok.encode(t["output"], bos=False, eos=False)][:a.max_output]
            enc.append((p, o))
        turns[name] = enc
    max_context = max(len(p) + len(o) for items in turns.values() for p, o in items) + 64
    model = random_model(cfg, device, dtype)
    # bytes a decode pass reads: every weight but the embedding table (one row of it)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    bandwidth = measure_bandwidth(device)
    roofline = bandwidth * 1e9 / weight_bytes if bandwidth else None
    results = measure(model, cfg, device, turns, a.runs, max_context)
    summary = {}
    for name in turns:
        off, on = results["off"][name], results["lookup"][name]
        summary[name] = {"speedup": on["decode_tok_s"] / off["decode_tok_s"],
                         "decode_tok_s_off": off["decode_tok_s"], "decode_tok_s_lookup": on["decode_tok_s"],
                         "tokens_per_pass": on["tokens_per_pass"],
                         "acceptance": on["accepted"] / on["drafted"] if on["drafted"] else None,
                         "identical": off["identical_to_recording"] and on["identical_to_recording"],
                         "off_share_of_roofline": off["decode_tok_s"] / roofline if roofline else None,
                         "lookup_over_roofline": on["decode_tok_s"] / roofline if roofline else None,
                         "output_tokens": sum(len(o) for _, o in turns[name]),
                         "prompt_tokens": sum(len(p) for p, _ in turns[name])}
    import triton

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    out = {"benchmark": "speculative", "shape": a.shape, "dtype": str(dtype).removeprefix("torch."), "runs": a.runs,
           "max_turns": a.max_turns, "max_output": a.max_output,
           "machine": {"device": gpu, "host_cpus": os.cpu_count(),
                       "sms": torch.cuda.get_device_properties(device).multi_processor_count
                       if device.type == "cuda" else None},
           "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                        "python": platform.python_version()},
           "limits": {"weight_bytes_per_pass": weight_bytes, "measured_copy_gb_s": bandwidth,
                      "roofline_plain_decode_tok_s": roofline},
           "summary": summary, "results": results, "wall_s": time.perf_counter() - started}
    text = json.dumps(out, indent=2)
    print(text)
    path = a.out
    if path is None:
        tag = "h200" if "H200" in gpu else gpu.lower().replace(" ", "_")
        base = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
        path = base / f"speculative_{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
