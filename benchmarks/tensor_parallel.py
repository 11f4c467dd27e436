"""Devstral 2 (123B shape) over 2 GPUs: tensor-parallel decode/prefill, and FSDP2 QLoRA at seq 2048.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/tensor_parallel.py --out $OUT/tp.json
    python -m torch.distributed.run --nproc-per-node 2 benchmarks/tensor_parallel.py --shape tiny \
        --device cpu --out /tmp/tp.json                              # smoke test (gloo)

Random weights at the shape (decode.py's SHAPES["devstral-2"]), built on each GPU as that rank's shard
only, never as a whole model: linear weights are drawn in bf16 one at a time and turned into fp8 e4m3
(kernels/fp8_linear.py, one scale per output channel) at once, so a rank holds ~62 GB for 123B.

* inference (TP=2, the engine as `devstral run --tensor-parallel 2` runs it: paged KV, CUDA graphs):
  batch-1 decode tok/s against the 2-GPU roofline (each rank reads its shard per token; the roofline
  is measured copy bandwidth / the bytes one rank reads), prefill tok/s, and the all-reduce share of
  step time (the step's all-reduces and gather, timed alone at the step's shapes, / the step time).
* FSDP2 QLoRA (parallel/fsdp.py): the base in NF4 (built per layer from random bf16), LoRA r=16 on all
  linears, gradient checkpointing, one sequence of 2048 tokens per rank and step: tok/s and each
  rank's peak memory.
Everything on rank 0 goes into one JSON file. Target: the whole run in under 8 minutes on 2 H200s.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import SHAPES, NullTokenizer, measure_bandwidth  # noqa: E402
from devstral.config import ModelConfig  # noqa: E402
from devstral.engine.engine import EngineConfig  # noqa: E402
from devstral.engine.sampling import SamplingParams  # noqa: E402
from devstral.model.rope import Rotary  # noqa: E402
from devstral.model.transformer import Transformer  # noqa: E402
from devstral.parallel.group import TPGroup  # noqa: E402
from devstral.parallel.launch import join_launched  # noqa: E402
from devstral.parallel.layers import parallelize  # noqa: E402
from devstral.parallel.lockstep import TensorParallelLLM, follow  # noqa: E402
from devstral.parallel.sharding import local_config  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shard_shapes(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config whose Transformer has exactly one rank's parameter shapes."""
    return dataclasses.replace(local_config(cfg, world), vocab_size=cfg.vocab_size // world)


def random_shard(cfg: ModelConfig, tp: TPGroup, *, linear: str, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """This rank's shard of a random model; linear weights as `linear` ("fp8", "nf4" or "dense")."""
    dev = tp.device
    with torch.device("meta"):
        model = Transformer(shard_shapes(cfg, tp.world))
    g = torch.Generator(device=dev).manual_seed(seed + tp.rank)
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf in LINEARS:
            w = torch.empty(module.out_features, module.in_features, dtype=dtype, device=dev).normal_(0, 0.02,
                                                                                                        generator=g)
            if linear == "fp8":
                from devstral.kernels.fp8_linear import FP8Linear

                new = FP8Linear(w, name=name)
            elif linear == "nf4":
                from devstral.model.nf4 import NF4Linear

                new = NF4Linear(w, double_quant=True)
            else:
                new = torch.nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
                new.weight = torch.nn.Parameter(w, requires_grad=False)
            del w
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    for name, p in list(model.named_parameters()):
        t = (torch.ones(p.shape, dtype=dtype, device=dev) if "norm" in name
             else torch.empty(p.shape, dtype=dtype, device=dev).normal_(0, 0.02, generator=g))
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, torch.nn.Parameter(t, requires_grad=False))
    model.config = cfg  # the whole model's sizes: parallelize() and the engine read the local ones from it
    model.rotary = Rotary(cfg).to(dev)
    return model.eval().requires_grad_(False)


def collective_time(tp: TPGroup, shape: tuple[int, ...], dtype: torch.dtype, count: int, reps: int = 5) -> float:
    """Seconds for `count` all-reduces of `shape` (a step's worth), median of reps (all ranks call it)."""
    x = torch.randn(*shape, dtype=dtype, device=tp.device)
    for _ in range(3):
        tp.all_reduce(x)
    sync(tp.device)
    times = []
    for _ in range(reps):
        dist.barrier(group=tp.group)
        t0 = time.perf_counter()
        for _ in range(count):
            tp.all_reduce(x)
        sync(tp.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gather_time(tp: TPGroup, shape: tuple[int, ...], dtype: torch.dtype, reps: int = 5) -> float:
    x = torch.randn(*shape, dtype=dtype, device=tp.device)
    tp.gather_last_dim(x)
    sync(tp.device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        tp.gather_last_dim(x)
        sync(tp.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_inference(cfg: ModelConfig, tp: TPGroup, args, dtype: torch.dtype) -> dict | None:
    t0 = time.perf_counter()
    linear = "fp8" if tp.device.type == "cuda" and not args.bf16 else "dense"
    model = parallelize(random_shard(cfg, tp, linear=linear, dtype=dtype), tp)
    build_s = time.perf_counter() - t0
    shard_bytes = sum(b.numel() * b.element_size() for b in model.buffers()) + sum(
        p.numel() * p.element_size() for p in model.parameters())
    embed_bytes = model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    read_per_token = shard_bytes - embed_bytes  # a decode step reads every weight but the embedding table
    # all ranks: the collectives of one step, timed alone (2 per layer + embedding; the logits gather)
    n_reduce = 2 * cfg.n_layers + 1
    ar_decode = collective_time(tp, (1, 1, cfg.dim), dtype, n_reduce)
    ar_prefill = collective_time(tp, (1, args.prefill_len, cfg.dim), dtype, n_reduce, reps=3)
    gather = gather_time(tp, (1, 1, cfg.vocab_size // tp.world), torch.float32 if dtype == torch.float32 else dtype)
    bandwidth = measure_bandwidth(tp.device)
    bws = [torch.zeros(1, dtype=torch.float64, device=tp.device) for _ in range(tp.world)]
    dist.all_gather(bws, torch.tensor([bandwidth or 0.0], dtype=torch.float64, device=tp.device), group=tp.group)
    if not tp.is_leader:
        follow(model, cfg, tp)
        return None
    ec = EngineConfig(max_context=args.prefill_len + args.new_tokens + 64, max_num_seqs=1, speculative="off",
                      gpu_memory_fraction=0.92, max_num_batched_tokens=max(8192, args.prefill_len))
    llm = TensorParallelLLM(model, cfg, NullTokenizer(cfg.vocab_size), tp=tp, engine_config=ec)
    g = torch.Generator().manual_seed(1)
    greedy = SamplingParams(temperature=0)
    prompt = [1] + torch.randint(1000, cfg.vocab_size, (args.prompt_len - 1,), generator=g).tolist()
    long_prompt = [1] + torch.randint(1000, cfg.vocab_size, (args.prefill_len - 1,), generator=g).tolist()
    llm.generate(prompt[:16], greedy.updated(max_tokens=4))  # build the engine, capture the graphs
    decode, prefill = [], []
    for _ in range(args.runs):
        c = llm.generate(prompt, greedy.updated(max_tokens=args.new_tokens))
        decode.append(c.timings["decode_tok_s"])
        c = llm.generate(long_prompt, greedy.updated(max_tokens=1))
        prefill.append(c.timings["prefill_tok_s"])
    dec = statistics.median(decode)
    pre = statistics.median(prefill)
    slowest_bw = min(float(b) for b in bws) if bandwidth else None
    roofline = slowest_bw * 1e9 / read_per_token if slowest_bw else None
    step_decode = 1.0 / dec
    llm.close()  # the followers return from follow()
    return {
        "weights": linear, "build_s": build_s, "shard_gb_per_gpu": shard_bytes / 1e9,
        "bytes_read_per_token_per_gpu_gb": read_per_token / 1e9,
        "copy_bandwidth_gb_s_per_gpu": [float(b) for b in bws],
        "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens,
        "decode_tok_s": dec, "decode_runs": decode,
        "decode_roofline_tok_s": roofline, "decode_of_roofline": dec / roofline if roofline else None,
        "prefill_tokens": args.prefill_len, "prefill_tok_s": pre, "prefill_runs": prefill,
        "allreduce_decode_step_s": ar_decode + gather, "decode_step_s": step_decode,
        "allreduce_share_decode": (ar_decode + gather) / step_decode,
        "allreduce_prefill_step_s": ar_prefill,
        "allreduce_share_prefill": ar_prefill / (args.prefill_len / pre),
        "collectives_per_step": {"all_reduce": n_reduce, "all_gather_logits": 1},
    }


def bench_fsdp(cfg: ModelConfig, tp: TPGroup, args, dtype: torch.dtype) -> dict:
    from devstral.model.lora import inject_lora, trainable_parameters
    from devstral.parallel import fsdp
    from devstral.train.batching import Batch
    from devstral.train.loss import summed_loss

    dev = tp.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    base = random_shard(cfg, _whole(tp), linear="nf4", dtype=dtype, seed=100)  # every rank: the whole NF4 base
    build_s = time.perf_counter() - t0
    inject_lora(base, list(LINEARS), 16, 16.0, dtype=torch.float32, seed=0)
    base.gradient_checkpointing = True
    for p in trainable_parameters(base):
        p.requires_grad_(True)
    fsdp.shard(base, tp)
    params = trainable_parameters(base)
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(2 + tp.rank)
    seq = args.train_seq
    times, losses = [], []
    base.train()
    for step in range(args.train_steps + 1):
        tokens = torch.randint(1000, cfg.vocab_size, (1, seq), generator=g)
        batch = Batch(tokens, tokens.clone(), torch.arange(seq)[None], None).to(dev)
        sync(dev)
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, n = summed_loss(base, batch)
        (loss / n).backward()
        fsdp.grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        if step:  # the first step compiles kernels and warms the allocator
            times.append(time.perf_counter() - t)
        losses.append(float(loss) / n)
    peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    peaks = [torch.zeros(1, dtype=torch.float64, device=dev) for _ in range(tp.world)]
    dist.all_gather(peaks, torch.tensor([peak or 0.0], dtype=torch.float64, device=dev), group=tp.group)
    step_s = statistics.median(times)
    return {"base": "nf4 (double quant), replicated", "lora_r": 16, "targets": list(LINEARS),
            "grad_checkpointing": True, "seq_len": seq, "sequences_per_step": tp.world, "build_s": build_s,
            "step_s": step_s, "tok_s": seq * tp.world / step_s, "losses": losses,
            "peak_memory_gb_per_gpu": [float(p) for p in peaks] if peak is not None else None}


def _whole(tp: TPGroup) -> TPGroup:
    """The same process as a group of one (random_shard then builds the whole model)."""
    return dataclasses.replace(tp, rank=0, world=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="devstral-2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, help="fewer layers than the shape (same widths)")
    ap.add_argument("--bf16", action="store_true", help="bf16 linears instead of fp8 (use with --layers)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--train-seq", type=int, default=2048)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--skip", choices=("inference", "fsdp"), action="append", default=[])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    cfg = ModelConfig(**SHAPES[args.shape])
    if args.layers:
        cfg = dataclasses.replace(cfg, n_layers=args.layers)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = join_launched(args.device, world)
    dtype = torch.bfloat16 if tp.device.type == "cuda" else torch.float32
    t_start = time.perf_counter()
    result = {"benchmark": "tensor_parallel", "shape": args.shape, "config": cfg.as_dict(), "params": cfg.n_params,
              "world": tp.world, "backend": dist.get_backend(tp.group),
              "machine": {"device": torch.cuda.get_device_name(tp.device) if tp.device.type == "cuda"
                          else platform.processor() or platform.machine(), "gpus": tp.world},
              "versions": {"torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version()))
                           if tp.device.type == "cuda" else None, "python": platform.python_version()},
              "env": {"NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE")}}
    if "inference" not in args.skip:
        out = bench_inference(cfg, tp, args, dtype)
        if out is not None:
            result["inference_tp"] = out
        gc.collect()  # the shard, its KV pool and graphs: gone before the NF4 base is built
        if tp.device.type == "cuda":
            torch.cuda.empty_cache()
    if "fsdp" not in args.skip:
        result["fsdp_qlora"] = bench_fsdp(cfg, tp, args, dtype)
    result["wall_s"] = time.perf_counter() - t_start
    if tp.is_leader:
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n", encoding="utf-8")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
