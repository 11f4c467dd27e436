"""Prompt-lookup speculative decoding against plain decode on agent turns (issue 15), on a GPU.

Random weights cannot make real drafts, so the model is forced to emit each turn's recorded output
(benchmarks/workloads/speculative.json, built by speculative_workloads.py from this repository's files):
its forward runs in full, then the logits of the token at position p get +1e4 on the recorded token
p + 1. The drafts therefore meet exactly the acceptance the real model would see when it writes that
output, while every matmul, attention and the CUDA graphs cost what they cost. Same weights, same
engine, `--speculative off` then `lookup`; the outputs must be identical (and equal the recording).
Tokens come from the tekken vocabulary mistral-common ships (tekken_240911.json, 131k ids).

    python benchmarks/speculative.py --out $OUT/speculative_h200.json
    python benchmarks/speculative.py --shape tiny --device cpu --runs 1     # smoke test of the script

Per workload: decode tok/s (output tokens after the first, over the time after the first token) with
and without speculation, the ratio, drafted and accepted tokens, and time to first token. Median of --runs.
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

from decode import SHAPES, NullTokenizer, random_model  # noqa: E402
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
    drafted, accepted = engine.stats.drafted_tokens, engine.stats.accepted_tokens
    t0 = time.perf_counter()
    seq = engine.add(prompt, GREEDY, len(output), set())
    while seq.first_token_time is None:
        engine.step()
        if seq.finished and seq.first_token_time is None:  # a failed step: say why, do not spin
            raise RuntimeError(f"the turn failed: {seq.error}")
    t1 = time.perf_counter()
    while engine.has_work():
        engine.step()
    t2 = time.perf_counter()
    got = seq.token_ids[seq.num_prompt_tokens:]
    return {"identical": got == output, "ttft_s": t1 - t0, "decode_s": t2 - t1, "tokens": len(output),
            "drafted": engine.stats.drafted_tokens - drafted, "accepted": engine.stats.accepted_tokens - accepted}


def measure(model, cfg, device, mode: str, turns: dict, runs: int, max_context: int) -> dict:
    table = torch.zeros(max_context + 1, dtype=torch.long, device=device)
    force_outputs(model, table)
    llm = LLM(model, cfg, NullTokenizer(cfg.vocab_size),
              engine_config=EngineConfig(max_context=max_context, max_num_seqs=4, speculative=mode,
                                         prefix_caching=False))
    engine = llm.engine
    first = next(iter(turns.values()))[0]
    run_turn(engine, table, first[0][:256], first[1][:16])  # warm-up: compile, capture, replay once
    out = {}
    for name, items in turns.items():
        per_run = []
        for _ in range(runs):
            rs = [run_turn(engine, table, p, o) for p, o in items]
            tokens = sum(r["tokens"] - 1 for r in rs)
            per_run.append({"decode_tok_s": tokens / sum(r["decode_s"] for r in rs),
                            "ttft_ms": 1e3 * statistics.median(r["ttft_s"] for r in rs),
                            "identical": all(r["identical"] for r in rs),
                            "drafted": sum(r["drafted"] for r in rs), "accepted": sum(r["accepted"] for r in rs)})
        med = statistics.median(r["decode_tok_s"] for r in per_run)
        out[name] = {"decode_tok_s": med, "runs": [r["decode_tok_s"] for r in per_run],
                     "ttft_ms": statistics.median(r["ttft_ms"] for r in per_run),
                     "identical_to_recording": all(r["identical"] for r in per_run),
                     "drafted": per_run[-1]["drafted"], "accepted": per_run[-1]["accepted"]}
    del model.forward  # the instance override goes; the class's forward is back
    del engine, llm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="devstral-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workloads", type=Path, default=WORKLOADS)
    ap.add_argument("--max-output", type=int, default=None, help="cap each turn's output tokens (smoke tests)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig(**SHAPES[a.shape])
    tok = tekken()
    data = json.loads(a.workloads.read_text())
    turns = {}
    for name, items in data.items():
        enc = []
        for t in items:
            p = [i % cfg.vocab_size for i in tok.encode(t["prompt"], bos=True, eos=False)]
            o = [i % cfg.vocab_size for i in tok.encode(t["output"], bos=False, eos=False)][:a.max_output]
            enc.append((p, o))
        turns[name] = enc
    max_context = max(len(p) + len(o) for items in turns.values() for p, o in items) + 64
    model = random_model(cfg, device, dtype)
    results = {mode: measure(model, cfg, device, mode, turns, a.runs, max_context) for mode in ("off", "lookup")}
    summary = {}
    for name in turns:
        off, on = results["off"][name], results["lookup"][name]
        summary[name] = {"speedup": on["decode_tok_s"] / off["decode_tok_s"],
                         "acceptance": on["accepted"] / on["drafted"] if on["drafted"] else None,
                         "identical": off["identical_to_recording"] and on["identical_to_recording"],
                         "output_tokens": sum(len(o) for _, o in turns[name]),
                         "prompt_tokens": sum(len(p) for p, _ in turns[name])}
    out = {"benchmark": "speculative", "shape": a.shape, "dtype": str(dtype).removeprefix("torch."), "runs": a.runs,
           "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                       "host_cpus": os.cpu_count()},
           "versions": {"torch": torch.__version__, "python": platform.python_version()},
           "summary": summary, "results": results}
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
