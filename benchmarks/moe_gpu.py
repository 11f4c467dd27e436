"""Mixtral-8x7B-shape Q4_K_M GGUF (random weights): our engine against llama.cpp on the same file, in one run
(issue 21: target >= 1.5x llama.cpp decode).

    python benchmarks/moe_gpu.py --llama-bench /tmp/llamacpp/bin/llama-bench          # on the GPU machine
    python benchmarks/moe_gpu.py --shape tiny --device cpu --runs 1                  # smoke test of the script

1. The GGUF (skipped when --gguf already exists): random bytes made on the GPU are valid blocks of
   every type used, with only the fp16 super-block scales set (small, so activations stay finite); each
   tensor gets the type llama.cpp's Q4_K_M mix gives it for an 8-expert model (quant/recipes.choose_type,
   tested against llama_model_quantize in tests/test_moe_quant.py): experts Q4_K with ffn_down_exps Q6_K
   in the layers that get more bits, attn_k/attn_v Q8_0, attn_output Q5_K, output Q6_K, router F32.
   Nothing is quantized in Python: the 26 GB file is written at disk speed.
2. llama.cpp: `llama-bench -ngl 99 -fa 1` prefill at --prompts tokens and decode of --new-tokens from an
   empty cache; its median over -r runs (samples_ts). It runs first, in its own process, so the two never
   share GPU memory.
3. The routed-expert kernels alone at the shape (moe_gpu_parts.py): gate+up (Q4_K) and down (Q4_K,
   Q6_K) at 1, 2, 4 and 8 tokens, per call us, GB/s and % of copy for every candidate launch config;
   the fastest per size goes into moe_gemv.TUNED for step 4 and into the JSON's "tuned": copy that to the
   device's table (kernels/tuned/<device>.json, key "moe_experts"), which moe_gemv.plan reads in every run.
   The dense streaming GEMV over the same bytes as one token's gate+up is the yardstick; the router
   kernel is timed against MoE.route's six launches, both inside a CUDA graph.
4. Ours on the same file (weights kept quantized, experts stacked, decode in CUDA graphs): decode of
   --new-tokens after a 16-token prompt (as tg128 starts from an empty cache), prefill of each --prompts
   length; medians of --runs. Then one decode step taken apart (profiler): launches and GPU time per
   kind of kernel, the bytes each part reads, GPU busy time against the step's wall time.
Physical limits: decode reads every tensor but the token embedding once per token, of the experts only
the top-k chosen (k/E of the expert bytes), at the copy bandwidth measured in the same run; prefill at
2 FLOPs per active weight per token (+ causal attention) at the bf16 matmul rate measured in the same run.
Results go to $OUT/moe_gpu.json when $OUT is set, else benchmarks/results/moe_gpu_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compile_watch import compiles  # noqa: E402
from decode import NullTokenizer, measure_bandwidth  # noqa: E402
from gpu_engine import matmul_tflops, prompt, run  # noqa: E402
from moe_gpu_parts import expert_kernels, router  # noqa: E402
from step_profile import step_breakdown  # noqa: E402

SHAPES = {  # Mixtral 8x7B (its config.json), and a tiny one for the smoke test
    "mixtral-8x7b": dict(dim=4096, hidden=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=32000,
                         experts=8, top_k=2),
    "tiny": dict(dim=256, hidden=512, layers=2, heads=4, kv_heads=2, head_dim=64, vocab=2048, experts=8, top_k=2),
}
# super-block scale per type: weights of about 0.02-0.05, so random activations stay finite through the layers
SCALE = {"Q4_K": 1e-4, "Q5_K": 5e-5, "Q6_K": 1e-5, "Q8_0": 2e-4}
F16_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}


def random_blocks(qtype, shape: tuple[int, ...], gen: torch.Generator) -> np.ndarray:
    """Random valid blocks for a tensor of `shape` (rows last), as the file's bytes [.., bytes per row]."""
    from devstral.quant.layout import block_info

    block, nbytes = block_info(qtype)
    n = int(np.prod(shape))
    blocks = torch.randint(0, 256, (n // block, nbytes), dtype=torch.uint8, device=gen.device, generator=gen)
    scale = torch.full((blocks.shape[0],), SCALE[qtype.name], dtype=torch.float16, device=gen.device)
    for off in F16_OFFSETS[qtype.name]:
        blocks[:, off:off + 2] = scale.view(torch.uint8).view(-1, 2)
    return blocks.reshape(*shape[:-1], shape[-1] // block * nbytes).cpu().numpy()


def make_gguf(path: Path, s: dict, device: torch.device) -> dict:
    """Write the random Q4_K_M GGUF; returns the types chosen for each tensor kind."""
    import gguf

    from devstral.quant.recipes import choose_type

    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("mixtral-8x7b-shape-random-Q4_K_M")
    w.add_block_count(s["layers"])
    w.add_context_length(32768)
    w.add_embedding_length(s["dim"])
    w.add_feed_forward_length(s["hidden"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_dimension_count(s["head_dim"])
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(s["experts"])
    w.add_expert_used_count(s["top_k"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    v = s["vocab"]
    toks = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))] + [f"<t{i}>" for i in range(259, v)]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * v)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (v - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    gen = torch.Generator(device=device).manual_seed(0)
    types: dict[str, list[str]] = {}
    d, h, e, hd = s["dim"], s["hidden"], s["experts"], s["head_dim"]

    def add(name: str, shape: tuple[int, ...]):
        qt = choose_type(name, shape, "Q4_K_M", s["layers"], [], n_experts=e)
        if qt.name == "F32":
            data = (torch.randn(shape, generator=gen, device=device) * 0.02 if "gate_inp" in name
                    else torch.ones(shape, device=device))
            w.add_tensor(name, data.float().cpu().numpy())
        else:
            w.add_tensor(name, random_blocks(qt, shape, gen), raw_dtype=qt)
        kind = types.setdefault(name.split(".", 2)[-1] if name.startswith("blk.") else name, [])
        if qt.name not in kind:  # (ffn_down_exps: Q6_K in the layers that get more bits, Q4_K elsewhere)
            kind.append(qt.name)

    add("token_embd.weight", (v, d))
    for i in range(s["layers"]):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (d,))
        add(p + "ffn_norm.weight", (d,))
        add(p + "attn_q.weight", (s["heads"] * hd, d))
        add(p + "attn_k.weight", (s["kv_heads"] * hd, d))
        add(p + "attn_v.weight", (s["kv_heads"] * hd, d))
        add(p + "attn_output.weight", (d, s["heads"] * hd))
        add(p + "ffn_gate_inp.weight", (e, d))
        add(p + "ffn_gate_exps.weight", (e, h, d))
        add(p + "ffn_up_exps.weight", (e, h, d))
        add(p + "ffn_down_exps.weight", (e, d, h))
    add("output_norm.weight", (d,))
    add("output.weight", (v, d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return types


def read_bytes(path: Path, top_k: int, experts: int) -> tuple[int, int]:
    """(bytes a decode step reads, all tensor bytes): chosen experts only, no embedding table."""
    from devstral.formats.gguf_read import GGUFFile

    g = GGUFFile(path)
    read = total = 0
    for name in g.tensor_names:
        n = int(g.info(name).nbytes)
        total += n
        if name == "token_embd.weight":
            continue
        read += n * top_k // experts if "_exps." in name else n
    return read, total


def llama_bench(binary: Path, gguf_path: Path, prompts: list[int], new_tokens: int, runs: int) -> dict:
    cmd = [str(binary), "-m", str(gguf_path), "-ngl", "99", "-fa", "1", "-r", str(runs), "-o", "json",
           "-p", ",".join(map(str, prompts)), "-n", str(new_tokens)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-2000:], "cmd": " ".join(cmd)}
    rows = json.loads(proc.stdout)
    out: dict = {"cmd": " ".join(cmd), "wall_s": time.perf_counter() - t, "build": rows[0].get("build_commit"),
                 "gpu": rows[0].get("gpu_info"), "type": rows[0].get("model_type")}
    for r in rows:
        samples = r.get("samples_ts") or [r.get("avg_ts")]
        key = f"decode_{r['n_gen']}" if r.get("n_gen") else f"prefill_{r['n_prompt']}"
        out[key] = {"tok_s": statistics.median(samples), "runs": samples, "stddev": r.get("stddev_ts")}
    return out


def ours(gguf_path: Path, device: torch.device, prompts: list[int], new_tokens: int, runs: int, s: dict,
         overlap: bool = True) -> dict:
    from devstral.engine.engine import EngineConfig
    from devstral.engine.generate import LLM
    from devstral.formats.gguf_model import load_gguf_model
    from devstral.model.moe import graph_safe

    t = time.perf_counter()
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model, cfg, _ = load_gguf_model(gguf_path, device=device)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    ec = EngineConfig(max_context=max(prompts) + new_tokens + 64, max_num_seqs=4, speculative="off",
                      prefix_caching=False, overlap=overlap)
    llm = LLM(model, cfg, NullTokenizer(cfg.vocab_size), engine_config=ec)
    engine = llm.engine
    res: dict = {"load_s": load_s, "engine_setup_s": time.perf_counter() - t,
                 "gpu_bytes": (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else None,
                 "experts_stacked": graph_safe(model), "cuda_graphs": engine.runner.graphs is not None,
                 "overlap": overlap}
    # warm-up: kernels compiled, for the timed runs' 16-token prompt too (32 pairs: the routed GEMV at
    # prefill rows, a launch config of its own)
    run(engine, [prompt(64, cfg.vocab_size, 0)], 8)
    run(engine, [prompt(16, cfg.vocab_size, 1)], 8)
    with compiles() as seen:
        r = [run(engine, [prompt(16, cfg.vocab_size, 10 + i)], new_tokens) for i in range(runs)]
    res[f"decode_{new_tokens}"] = {"tok_s": statistics.median(x["decode_tok_s"] for x in r),
                                   "runs": [x["decode_tok_s"] for x in r], "compiled_while_timed": seen}
    if device.type == "cuda":
        res["decode_step"] = _recorded(step_breakdown, engine, run, prompt(16, cfg.vocab_size, 7), s["layers"],
                                       gguf_path, s["top_k"], s["experts"])
    for n in prompts:
        run(engine, [prompt(n, cfg.vocab_size, 50 + n)], 1)  # warm-up at this size (prefill kernels, scratch)
        r, compiled = [], []
        for i in range(runs):
            with compiles() as seen:
                r.append(run(engine, [prompt(n, cfg.vocab_size, 100 + n + i)], 1))
            compiled += [f"run {i}: {line}" for line in seen]
        res[f"prefill_{n}"] = {"tok_s": statistics.median(n / x["prefill_s"] for x in r),
                               "runs": [n / x["prefill_s"] for x in r], "compiled_while_timed": compiled}
    res["_cfg"] = cfg
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-8x7b")
    ap.add_argument("--gguf", type=Path, help="the GGUF to measure (written there when absent); default "
                    "/tmp/<shape>-Q4_K_M.gguf")
    ap.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench (build-llamacpp-cuda.sh); "
                    "without it only ours is measured")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", default="512,2048", help="prefill lengths, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-kernels", action="store_true", help="skip timing the expert kernels alone (and so "
                    "the end-to-end run uses moe_gemv.plan()'s launch configs)")
    ap.add_argument("--no-overlap", action="store_true", help="EngineConfig(overlap=False): read each decode "
                    "step's tokens before launching the next (the default on CUDA overlaps them)")
    ap.add_argument("--kernel-tokens", default="1,2,4,8", help="token counts the expert kernels are tuned at")
    a = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device(a.device)
    s = SHAPES[a.shape]
    prompts = [int(p) for p in a.prompts.split(",")]
    if a.shape == "tiny":
        prompts, a.new_tokens = [min(p, 256) for p in prompts], min(a.new_tokens, 16)
    path = a.gguf or Path(f"/tmp/{a.shape}-Q4_K_M.gguf")
    out: dict = {"benchmark": "moe_gpu", "shape": a.shape, **s, "file": str(path), "runs": a.runs,
                 "new_tokens": a.new_tokens, "prompts": prompts,
                 "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                             "host_cpus": os.cpu_count()},
                 "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    try:
        import triton

        out["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    target = a.out or (Path(os.environ["OUT"]) / "moe_gpu.json" if os.environ.get("OUT") else
                       Path(__file__).parent / "results" / f"moe_gpu_{_slug(out['machine']['device'])}.json")

    def save() -> None:  # after every phase: a run cut short still leaves what it measured
        out["wall_s"] = time.perf_counter() - t_start
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(out, indent=2, default=str) + "\n")

    t = time.perf_counter()
    if not path.exists():
        out["tensor_types"] = make_gguf(path, s, device)
        out["gguf_written_s"] = time.perf_counter() - t
    read, total = read_bytes(path, s["top_k"], s["experts"])
    out.update(file_tensor_bytes=total, bytes_read_per_token=read)
    out["measured_copy_gb_s"], out["measured_bf16_tflops"] = measure_bandwidth(device), matmul_tflops(device)
    save()
    if a.llama_bench:
        out["llamacpp"] = llama_bench(a.llama_bench, path, prompts, a.new_tokens, a.runs)
        save()
    if device.type == "cuda" and not a.no_kernels:
        out["expert_kernels"] = _recorded(expert_kernels, s, device, out["measured_copy_gb_s"], 25,
                                           tuple(int(v) for v in a.kernel_tokens.split(",")))
        out["router"] = _recorded(router, s, device, s["layers"])
        torch.cuda.empty_cache()  # the kernels' random weights, before the model loads
        save()
    res = ours(path, device, prompts, a.new_tokens, a.runs, s, not a.no_overlap)
    cfg = res.pop("_cfg")
    out["ours"] = res
    limits(out, s, cfg, prompts)
    peer = out.get("llamacpp", {})
    for key in [f"decode_{a.new_tokens}", *(f"prefill_{n}" for n in prompts)]:
        if key in peer and key in res:
            res[key]["vs_llamacpp"] = res[key]["tok_s"] / peer[key]["tok_s"]
    save()
    print(json.dumps(out, indent=2, default=str))


def limits(out: dict, s: dict, cfg, prompts: list[int]) -> None:
    """Each figure's fraction of the physical limit measured in this run."""
    res = out["ours"]
    bw, tf = out["measured_copy_gb_s"], out["measured_bf16_tflops"]
    if bw:
        limit = bw * 1e9 / out["bytes_read_per_token"]
        out["decode_limit_tok_s"] = limit
        for side in (res, out.get("llamacpp", {})):
            key = f"decode_{out['new_tokens']}"
            if key in side:
                side[key]["fraction_of_limit"] = side[key]["tok_s"] / limit
    if tf:
        d, h, e, k = s["dim"], s["hidden"], s["experts"], s["top_k"]
        attn_w = d * (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"] + s["heads"] * s["head_dim"] * d
        active = s["layers"] * (attn_w + 3 * d * h * k + d * e) + s["vocab"] * d
        for n in prompts:
            attn = 4 * n * n / 2 * s["heads"] * s["head_dim"] * s["layers"]  # causal: half the square
            limit = tf * 1e12 / (2 * active + attn / n)
            for side in (res, out.get("llamacpp", {})):
                if f"prefill_{n}" in side:
                    side[f"prefill_{n}"]["fraction_of_peak"] = side[f"prefill_{n}"]["tok_s"] / limit
            out[f"prefill_{n}_limit_tok_s"] = limit


def _recorded(fn, *args):
    """fn(*args), or its error in the JSON: a part that fails (the profiler under CUDA graphs, say) must
    not cost the run the figures the other parts measure."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- recorded and printed, not hidden
        import traceback

        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:2000]}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


if __name__ == "__main__":
    main()
