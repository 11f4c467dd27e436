"""The grouped MoE kernels' logic on CPU through Triton's interpreter, against the reference MoE path
(model/moe.py: a loop over experts with gathers; GGUF experts dequantized by the exact codecs, which
tests elsewhere hold bit-exact against gguf-py).

One subprocess (this file as a script, TRITON_INTERPRET=1) runs every case and saves inputs and
outputs; the tests compare. Cases: GGUF Q4_K_M's mix (Q4_K gate/up, Q6_K down), gate and up of
different types (two launches), Q8_0 at K that is not a multiple of 256; decode (one token: slots in
pair order; several: slots sorted by expert), partial row tiles, and prefill (sort + per expert
quantized linear at fp32; bf16 GGUF experts through the grouped GEMM of moe_grouped_gemm.py and, with
DEVSTRAL_MOE_GROUPED=dequant, dequantized into a scratch for torch's grouped GEMM; bf16 experts through
torch's grouped GEMM); a tiny Mixtral's logits with the stacked experts against the same model
unstacked. Split K, tile widths and both loops against dequantize + matmul, with float, int8 and (xq)
pre-quantized activations.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import interpreter_runs

pytest.importorskip("triton")

from devstral.quant import QType  # noqa: E402

E, TOP_K = 4, 2
MIXES = {"q4_k_m": (QType.Q4_K, QType.Q4_K, QType.Q6_K, 256, 256),  # gate, up, down types, dim, hidden
         "mixed_gate_up": (QType.Q4_K, QType.Q6_K, QType.Q8_0, 256, 256),
         "q8_0": (QType.Q8_0, QType.Q8_0, QType.Q8_0, 96, 160)}
TOKENS = (1, 5, 40)  # 2 and 10 pairs: routed GEMV; 80 pairs: the prefill path
# the interpreter is slow per program: the full set for Q4_K_M's mix, the rest where the path differs
CASES = {"q4_k_m": TOKENS, "mixed_gate_up": (1,), "q8_0": (1, 5)}
MOE = dict(n_experts=4, n_experts_per_tok=2, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16)

INTERPRETER_EARLY = True  # its subprocess starts when collection ends (interpreter_runs.py)


def _moe_module(dim: int, hidden: int, weights: dict):
    """A reference MoE layer over the given expert modules (router random)."""
    from devstral.config import ModelConfig
    from devstral.model.moe import MoE

    n_experts = len(next(iter(weights.values())))  # the GPU tests use more experts than this file's E
    cfg = ModelConfig(arch="mistral", dim=dim, hidden_dim=hidden, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=dim,
                      vocab_size=8, n_experts=n_experts, n_experts_per_tok=TOP_K)
    moe = MoE(cfg)
    for e, expert in enumerate(moe.experts):
        for name, mods in weights.items():
            setattr(expert, name, mods[e])
    return moe.eval().requires_grad_(False)


def _gguf_case(mix, g):
    """(reference MoE on CPU blocks, the same experts stacked from planar packs, router weight)."""
    from devstral.kernels.gguf_pack import pack
    from devstral.kernels.moe_experts import ExpertStack, stack_packed
    from devstral.quant.linear import QuantLinear
    from test_kernels_gguf_interpret import random_blocks

    tg, tu, td, dim, hidden = MIXES[mix]
    shapes = {"w1": (tg, hidden, dim), "w3": (tu, hidden, dim), "w2": (td, dim, hidden)}
    mods, packs = {}, {}
    for name, (qt, n, k) in shapes.items():
        raws = [random_blocks(qt, n, k, g) for _ in range(E)]
        mods[name] = [QuantLinear(r, qt, n, k, name=f"{name}[{e}]") for e, r in enumerate(raws)]
        packs[name] = stack_packed([pack(r, qt, n, k) for r in raws])
    moe = _moe_module(dim, hidden, mods)
    moe.gate.weight.copy_(torch.randn(E, dim, generator=g))
    return moe, ExpertStack(packs["w1"], packs["w3"], packs["w2"], E, hidden, dim)


def _run_cases(out_path: str) -> None:
    from devstral.kernels import moe_gemv
    from devstral.kernels.moe_experts import ExpertStack, stack_packed

    g = torch.Generator().manual_seed(0)
    res = {}
    with torch.no_grad():
        for mix in MIXES:
            moe, stack = _gguf_case(mix, g)
            dim = MIXES[mix][3]
            for t in CASES[mix]:
                x = torch.randn(t, dim, generator=g)
                ref = moe(x)
                _, experts, weights = moe.route(x)
                res[(mix, t)] = (stack.forward(x, experts, weights), ref)
            if mix in GROUPED_MIXES:
                # bf16 activations at a prefill size (the fp32 cases above take the per-expert loop)
                res[("grouped_gguf", mix)] = _grouped_prefill(moe, stack, dim, g)
            if mix != "q8_0":
                continue
            # one token through the narrowest row tiles (the launch sizes tiles for 132 SMs); above, on
            # CPU, tiles are the widest (BN 64: masked rows at these sizes)
            x = torch.randn(1, dim, generator=g)
            _, experts, weights = moe.route(x)
            h = moe_gemv.gate_up(x, stack.gate, stack.up, torch.empty(TOP_K, stack.hidden), experts, n=stack.hidden,
                                 top_k=TOP_K, sms=132)
            y = moe_gemv.down(h, stack.down, torch.empty(1, dim), experts, weights, n=dim, top_k=TOP_K, sms=132)
            res[(mix, "narrow")] = (y, moe(x))
        # a narrow tile over a long row: more sub-blocks per iteration, the last iteration masked
        from devstral.kernels.gguf_pack import pack
        from devstral.quant import dequantize
        from test_kernels_gguf_interpret import random_blocks

        n, k = 24, 768
        raws = [random_blocks(QType.Q6_K, n, k, g) for _ in range(E)]
        stack = stack_packed([pack(r, QType.Q6_K, n, k) for r in raws])
        h = torch.randn(4, k, generator=g)  # two tokens, top 2 each: pairs (0, 1) and (2, 3)
        ids = torch.tensor([[2, 0], [2, 3]])
        w = torch.rand(2, 2, generator=g)
        y = moe_gemv.down(h, stack, torch.empty(2, n), ids, w, n=n, top_k=2, sms=132)
        deq = [dequantize(r, QType.Q6_K, (n, k)) for r in raws]
        ref = torch.stack([sum(w[t, j] * (h[2 * t + j] @ deq[ids[t, j]].T) for j in range(2)) for t in range(2)])
        res["narrow_long_rows"] = (y, ref)
        res["router"] = _router_cases(g)
        # split K (2 tiles of K over 3 splits: one empty), two tile widths, gate and up fused (SwiGLU
        # after the splits meet) and apart, float and int8 activations, against dequantize
        res["splits"] = _split_cases(g)
        res["xq"] = _xq_cases(g)
        res["q5k_int8"] = _q5k_int8_cases(g)
        res["cat_stack"] = _cat_stack_cases(g)
        # bf16 experts: routed GEMV and torch's grouped GEMM, against the reference in fp32
        dim, hidden = 72, 40
        lin = {name: [torch.nn.Linear(*((dim, hidden) if name != "w2" else (hidden, dim)), bias=False)
                      for _ in range(E)] for name in ("w1", "w3", "w2")}
        for mods in lin.values():
            for m in mods:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.2)
        moe = _moe_module(dim, hidden, lin)
        moe.gate.weight.copy_(torch.randn(E, dim, generator=g))
        stacks = {n: torch.stack([m.weight.to(torch.bfloat16) for m in mods]) for n, mods in lin.items()}
        bf = ExpertStack(stacks["w1"], stacks["w3"], stacks["w2"], E, hidden, dim)
        for t in TOKENS:
            x = torch.randn(t, dim, generator=g).to(torch.bfloat16)
            _, experts, weights = moe.route(x.float())
            res[("bf16", t)] = (bf.forward(x, experts, weights).float(), moe(x.float()))
    # a tiny Mixtral end to end: the model's fuse() stacks the experts
    import devstral
    from devstral.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(os.path.dirname(out_path) + "/mixtral", seed=5, **MOE)
    llm = devstral.load(ckpt, device="cpu", dtype="fp32", backend="torch")
    prompts = {n: [1] + torch.randint(100, 3000, (n - 1,), generator=g).tolist() for n in (8, 47)}
    ref = {n: llm.logits(p) for n, p in prompts.items()}
    llm.model.fuse_projections()
    from devstral.model.moe import graph_safe

    # 8 tokens: 16 pairs, the routed GEMV (up to 64); 47: 94 pairs, sorted prefill
    res["model"] = ({n: llm.logits(p) for n, p in prompts.items()}, ref, graph_safe(llm.model))
    torch.save(res, out_path)


# gate, up and down of three types (Q4_K, Q6_K, Q8_0), each at K 256 and 256 rows an expert: every grouped
# kernel and dequantize specialization Q4_K_M's mix (Q4_K, Q4_K, Q6_K at the same shapes) would run, and Q8_0
GROUPED_MIXES = ("mixed_gate_up",)


def _grouped_prefill(moe, stack, dim: int, g) -> dict:
    """40 tokens (80 pairs) through each DEVSTRAL_MOE_GROUPED mode: the types of the grouped GEMM launches
    (moe_grouped_gemm.py) each made, the output, and whether the dequantize-into-scratch path's gate
    (torch's grouped GEMM) was open; and the reference MoE in fp32."""
    from devstral.kernels import moe_grouped_gemm

    xb = torch.randn(40, dim, generator=g).to(torch.bfloat16)
    _, experts, weights = moe.route(xb.float())
    real = moe_grouped_gemm.grouped_gemm
    launches = {"triton": [], "dequant": []}

    def spy(xs, counts, w, *args, **kwargs):
        launches[os.environ["DEVSTRAL_MOE_GROUPED"]].append(w.qtype.name)
        return real(xs, counts, w, *args, **kwargs)

    out = {"ref": moe(xb.float())}
    moe_grouped_gemm.grouped_gemm = spy
    try:
        for mode in launches:
            os.environ["DEVSTRAL_MOE_GROUPED"] = mode
            out[mode] = (stack.forward(xb, experts, weights).float(), launches[mode],
                         stack._grouped_ok(xb, experts.numel()))
    finally:
        moe_grouped_gemm.grouped_gemm = real
        os.environ.pop("DEVSTRAL_MOE_GROUPED")
    return out


ROUTER_CASES = [(1, 100, 8, 2), (3, 1000, 8, 2), (2, 1000, 5, 3), (4, 64, 16, 1)]  # tokens, D, E, top_k


def _router_cases(g) -> dict:
    """The one-launch router against MoE.route (matmul, softmax, top-k, renormalise): D in one tile and
    in masked splits, E not a power of two, k of 1..3."""
    from devstral.config import ModelConfig
    from devstral.kernels.moe_router import route
    from devstral.model.moe import MoE

    out = {}
    for t, d, e, k in ROUTER_CASES:
        cfg = ModelConfig(arch="mistral", dim=d, hidden_dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=d,
                          vocab_size=8, n_experts=e, n_experts_per_tok=k)
        moe = MoE(cfg).eval().requires_grad_(False)
        moe.gate.weight.copy_(torch.randn(e, d, generator=g))
        x = torch.randn(t, d, generator=g)
        out[(t, d, e, k)] = (route(x, moe.gate.weight, k), moe.route(x)[1:])
    return out


def _int8_exact(rows: int, k: int, g) -> torch.Tensor:
    """Activations the int8 row dot represents exactly: levels / 128 with 127 / 128 in every 16 (so each
    sub-block's absmax / 127 is 1 / 128): its results then differ from fp32 only by rounding."""
    x = torch.randint(-127, 128, (rows, k), generator=g).float()
    x[:, ::16] = 127.0
    return x / 128.0


def _experts(g, types: tuple, dim: int, hidden: int, ids: torch.Tensor, down: tuple[int, int] | None = None) -> dict:
    """E random experts of gate/up/down `types` stacked as the kernels read them, their exact dequantized
    weights, int8-exact activations for ids' tokens, router weights, and the gate/up references per pair.
    Gate and up are [hidden, dim]; down is [dim, hidden], or [N, K] = `down` (the kernels' cases take gate/up
    and down apart: each needs its K, but few rows, and the two shapes' K and rows are each other's)."""
    from devstral.kernels.gguf_pack import pack
    from devstral.kernels.moe_experts import stack_packed
    from devstral.quant import dequantize
    from test_kernels_gguf_interpret import random_blocks

    tokens = ids.shape[0]
    shapes = {"gate": (types[0], hidden, dim), "up": (types[1], hidden, dim), "down": (types[2], *(down or (dim, hidden)))}
    stacks, deq = {}, {}
    for name, (qt, n, k) in shapes.items():
        raws = [random_blocks(qt, n, k, g) for _ in range(E)]
        stacks[name] = stack_packed([pack(r, qt, n, k) for r in raws])
        deq[name] = [dequantize(r, qt, (n, k)) for r in raws]
    x = _int8_exact(tokens, dim, g)
    w = torch.rand(tokens, TOP_K, generator=g)
    pairs = [(t, int(ids[t, j])) for t in range(tokens) for j in range(TOP_K)]
    return {"stacks": stacks, "deq": deq, "x": x, "w": w, "pairs": pairs,
            "gate_ref": torch.stack([x[t] @ deq["gate"][e].T for t, e in pairs]),
            "up_ref": torch.stack([x[t] @ deq["up"][e].T for t, e in pairs])}


def _down_ref(h: torch.Tensor, c: dict, ids: torch.Tensor) -> torch.Tensor:
    """Each token's down projections of its pairs' rows of h, mixed by the router weights."""
    return torch.stack([sum(c["w"][t, j] * (h[t * TOP_K + j] @ c["deq"]["down"][ids[t, j]].T) for j in range(TOP_K))
                        for t in range(ids.shape[0])])


def _split_cases(g) -> dict:
    from devstral.kernels import moe_gemv

    # gate/up [64, 512]: K 512 is 2 tiles of 8 Q4_K sub-blocks (1 of 16), 64 rows divide every width below;
    # down [128, 256]: K 256 is 2 tiles of 8 Q6_K sub-blocks (1 of 16), 128 rows divide every width
    dim, hidden, down_n, down_k = 512, 64, 128, 256
    ids = torch.tensor([[3, 1], [1, 0]])
    c = _experts(g, (QType.Q4_K, QType.Q4_K, QType.Q6_K), dim, hidden, ids, down=(down_n, down_k))
    stacks, x, w, pairs, gate_ref, up_ref = c["stacks"], c["x"], c["w"], c["pairs"], c["gate_ref"], c["up_ref"]
    tokens = ids.shape[0]
    out = {}
    for cfg in ({"bn": 32, "split_k": 3, "num_warps": 4}, {"bn": 64, "split_k": 2, "num_warps": 4},
                {"bn": 64, "split_k": 3, "num_warps": 4, "int8": True},
                {"bn": 16, "split_k": 2, "num_warps": 4, "int8": True, "num_stages": 3},  # the pipelined loop
                {"bn": 8, "split_k": 2, "num_warps": 4, "int8": True, "ns": 16}):  # 16 sub-blocks a row and tile
        h = moe_gemv.gate_up(x, stacks["gate"], stacks["up"], torch.full((len(pairs), hidden), float("nan")), ids,
                             n=hidden, top_k=TOP_K, config=cfg)
        out[("gate_up", cfg["bn"], cfg.get("int8", False))] = (h, torch.nn.functional.silu(gate_ref) * up_ref)
    cfg = {"bn": 64, "split_k": 3, "num_warps": 4}
    gate = moe_gemv.gate_up(x, stacks["gate"], None, torch.full((len(pairs), hidden), float("nan")), ids,
                            n=hidden, top_k=TOP_K, config=cfg)
    out[("gate", 64, False)] = (gate, gate_ref)
    h = _int8_exact(len(pairs), down_k, g)
    down_ref = _down_ref(h, c, ids)
    for cfg in ({"bn": 64, "split_k": 3, "num_warps": 4}, {"bn": 128, "split_k": 1, "num_warps": 4},
                {"bn": 64, "split_k": 3, "num_warps": 4, "int8": True},
                {"bn": 32, "split_k": 2, "num_warps": 4, "num_stages": 2},  # the pipelined loop
                {"bn": 16, "split_k": 3, "num_warps": 4, "ns": 16, "num_stages": 3}):
        y = moe_gemv.down(h, stacks["down"], torch.full((tokens, down_n), float("nan")), ids, w, n=down_n,
                          top_k=TOP_K, config=cfg)
        out[("down", cfg["bn"], cfg.get("int8", False))] = (y, down_ref)
    return out


# xq (activations quantized once by gguf_xq.py): weight type -> (N, K). N masks the last row tile at
# every width below (24: two tiles of 16, one of 32); K cuts the last K-tile for Q4_K and Q5_K at 16
# sub-blocks a tile (512 values) and Q8_0 at 8 (256); Q6_K's tiles (128 or 256 values) divide any K it can have
XQ_SHAPES = {QType.Q4_K: (24, 768), QType.Q5_K: (24, 768), QType.Q6_K: (24, 512), QType.Q8_0: (24, 160)}
# each kind through both loops, at both sub-blocks per tile; split K with the SwiGLU after the splits meet
XQ_CONFIGS = {"gate_up": ({"bn": 16, "split_k": 2, "num_warps": 4, "int8": True, "xq": True, "ns": 16},
                          {"bn": 32, "split_k": 3, "num_warps": 4, "int8": True, "xq": True, "num_stages": 3}),
              "down": ({"bn": 32, "split_k": 2, "num_warps": 4, "int8": True, "xq": True},
                       {"bn": 16, "split_k": 3, "num_warps": 4, "int8": True, "xq": True, "ns": 16, "num_stages": 3})}


CAT_CONFIGS = ({"bn": 16, "split_k": 1, "num_warps": 4, "int8": True, "xq": True, "cat": True, "ns": 16},
               {"bn": 32, "split_k": 3, "num_warps": 4, "int8": True, "xq": True, "cat": True, "num_stages": 3})


def _xq_label(cfg: dict) -> str:
    return f"bn{cfg['bn']}_ns{cfg.get('ns', 8)}_stages{cfg.get('num_stages', 1)}"


def _xq_cases(g) -> dict:
    """gate_up (gate and up of one type, fused) and down with xq configs against dequantize + matmul, on
    activations the int8 levels represent exactly (as _split_cases' int8 cases)."""
    from devstral.kernels import moe_gemv
    from devstral.kernels.gguf_pack import pack
    from devstral.kernels.moe_experts import stack_packed
    from devstral.quant import dequantize
    from test_kernels_gguf_interpret import random_blocks

    tokens = 2
    ids = torch.tensor([[3, 1], [1, 0]])  # expert 1 for both tokens: one expert, two activation rows
    w = torch.rand(tokens, TOP_K, generator=g)
    pairs = [(t, int(ids[t, j])) for t in range(tokens) for j in range(TOP_K)]
    out = {}
    for qt, (n, k) in XQ_SHAPES.items():
        raws = {name: [random_blocks(qt, n, k, g) for _ in range(E)] for name in ("gate", "up", "down")}
        stacks = {name: stack_packed([pack(r, qt, n, k) for r in rs]) for name, rs in raws.items()}
        deq = {name: [dequantize(r, qt, (n, k)) for r in rs] for name, rs in raws.items()}
        x = _int8_exact(tokens, k, g)
        h_ref = torch.stack([torch.nn.functional.silu(x[t] @ deq["gate"][e].T) * (x[t] @ deq["up"][e].T)
                             for t, e in pairs])
        for cfg in XQ_CONFIGS["gate_up"]:
            h = moe_gemv.gate_up(x, stacks["gate"], stacks["up"], torch.full((len(pairs), n), float("nan")), ids,
                                 n=n, top_k=TOP_K, config=cfg)
            out[("gate_up", qt.name, _xq_label(cfg))] = (h, h_ref)
        # cat: [gate | up] rows, one weight a program (unsplit, and split with an empty split)
        cat_ref = torch.cat([torch.stack([x[t] @ deq[name][e].T for t, e in pairs]) for name in ("gate", "up")], 1)
        for cfg in CAT_CONFIGS:
            pre = moe_gemv.gate_up(x, stacks["gate"], stacks["up"], torch.full((len(pairs), 2 * n), float("nan")),
                                   ids, n=n, top_k=TOP_K, config=cfg)
            out[("cat", qt.name, _xq_label(cfg) + f"_split{cfg['split_k']}")] = (pre, cat_ref)
        h = _int8_exact(len(pairs), k, g)
        y_ref = torch.stack([sum(w[t, j] * (h[t * TOP_K + j] @ deq["down"][ids[t, j]].T) for j in range(TOP_K))
                             for t in range(tokens)])
        for cfg in XQ_CONFIGS["down"]:
            y = moe_gemv.down(h, stacks["down"], torch.full((tokens, n), float("nan")), ids, w, n=n, top_k=TOP_K,
                              config=cfg)
            out[("down", qt.name, _xq_label(cfg))] = (y, y_ref)
    return out


# (tokens, down's xq): each of gate_up's two cat configs (1 token: CAT_CONFIGS[0], unsplit, 16 sub-blocks;
# 3: CAT_CONFIGS[1], split, pipelined) once, and each way down applies the SwiGLU once (xq: in its
# quantization; not: a silu_mul launch). The two halves are independent launches, so the other two pairings
# would run no other code
CAT_STACK_CASES = ((1, True), (3, False))


def _cat_stack_cases(g) -> dict:
    """ExpertStack.decode where the measured constants say cat (moe_gemv.TUNED): gate_up writes [gate | up]
    rows and down applies the SwiGLU, in its xq quantization or, without xq, by a silu_mul launch; against
    the reference MoE (Q4_K_M's mix) at 1 and 3 tokens (CAT_STACK_CASES)."""
    from devstral.kernels import moe_gemv

    moe, stack = _gguf_case("q4_k_m", g)
    dim, hidden = MIXES["q4_k_m"][3:]
    out = {}
    for t, down_xq in CAT_STACK_CASES:
        x = torch.randn(t, dim, generator=g)
        _, experts, weights = moe.route(x)
        got = []
        for cat in (True, False):
            moe_gemv.TUNED.clear()
            moe_gemv.TUNED[f"gate_up|Q4_K|{t * TOP_K}|{hidden}|{dim}"] = {**CAT_CONFIGS[t == 3], "cat": cat}
            moe_gemv.TUNED[f"down|Q6_K|{t}|{dim}|{hidden}"] = {"bn": 64, "split_k": 2, "num_warps": 4,
                                                                "int8": down_xq, "xq": down_xq}
            got.append(stack.forward(x, experts, weights))
        out[(t, down_xq)] = (*got, moe(x))
    moe_gemv.TUNED.clear()
    return out


def _q5k_int8_cases(g) -> dict:
    """Q5_K experts (a Q5_K_M's gate/up, and down) through the int8-activation row dot quantizing in the
    threads (xq: _xq_cases): gate and up fused, 3 K-tiles split over 4 (one split empty), 16 sub-blocks a
    row and tile (a tile cut by K), against dequantize."""
    from devstral.kernels import moe_gemv

    # gate/up [64, 768]: K 768 is 3 tiles at 8 sub-blocks, 2 at 16 (the last cut); down [128, 256]
    dim, hidden, down_n, down_k = 768, 64, 128, 256
    ids = torch.tensor([[2, 0], [0, 3]])
    c = _experts(g, (QType.Q5_K,) * 3, dim, hidden, ids, down=(down_n, down_k))
    stacks, x, pairs = c["stacks"], c["x"], c["pairs"]
    out = {}
    for cfg in ({"bn": 64, "split_k": 4, "num_warps": 4, "int8": True},
                {"bn": 16, "split_k": 1, "num_warps": 4, "int8": True, "ns": 16}):
        h = torch.full((len(pairs), hidden), float("nan"))
        moe_gemv.gate_up(x, stacks["gate"], stacks["up"], h, ids, n=hidden, top_k=TOP_K, config=cfg)
        out[("gate_up", cfg["bn"])] = (h, torch.nn.functional.silu(c["gate_ref"]) * c["up_ref"])
    h = _int8_exact(len(pairs), down_k, g)
    cfg = {"bn": 64, "split_k": 3, "num_warps": 4, "int8": True}
    y = moe_gemv.down(h, stacks["down"], torch.full((ids.shape[0], down_n), float("nan")), ids, c["w"], n=down_n,
                      top_k=TOP_K, config=cfg)
    out[("down", 64)] = (y, _down_ref(h, c, ids))
    return out


@pytest.fixture(scope="module")
def results():
    return interpreter_runs.results(__file__, timeout=600)


def _rel(got, ref) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


# fp32 throughout; Q4_K's row dot (the streaming GEMV's) keeps >= 13 bits of each product (two nibbles
# per mantissa position class, gguf_gemv_wide._row_dot_q4k): ~2e-5 per matmul, as the dense GEMV's tests
# allow; the other types differ from the reference only in the summation order
TOLERANCE = {QType.Q4_K: 1e-4}


def _tolerance(*types) -> float:
    return max(TOLERANCE.get(t, 1e-5) for t in types)


@pytest.mark.parametrize(("mix", "tokens"), [(m, t) for m, ts in CASES.items() for t in ts] + [("q8_0", "narrow")])
def test_gguf_experts_match_the_reference_moe(results, mix, tokens):
    got, ref = results[(mix, tokens)]
    assert got.shape == ref.shape
    assert _rel(got, ref) < _tolerance(*MIXES[mix][:3])


@pytest.mark.parametrize("mix", GROUPED_MIXES)
def test_gguf_prefill_through_the_grouped_gemm_matches_the_reference_moe(results, mix):
    """80 pairs of bf16 activations through moe_grouped_gemm.py (DEVSTRAL_MOE_GROUPED=triton): one launch each for gate,
    up and down, the experts' tiles dequantized in registers; against the reference MoE in fp32 over the
    exactly decoded experts. Gate, up and down of three types (GROUPED_MIXES)."""
    r = results[("grouped_gguf", mix)]
    got, launches, _ = r["triton"]
    assert launches == [t.name for t in MIXES[mix][:3]]
    assert _rel(got, r["ref"]) < 2e-2  # bf16 activations, intermediate products and output


@pytest.mark.parametrize("mix", GROUPED_MIXES)
def test_gguf_prefill_through_the_dequantized_scratch_still_matches(results, mix):
    """DEVSTRAL_MOE_GROUPED=dequant (the default): gate, up and down dequantized one at a time into the
    scratch and run by torch's grouped GEMM, no grouped Triton launch; against the reference and the
    Triton path."""
    r = results[("grouped_gguf", mix)]
    got, launches, grouped = r["dequant"]
    assert grouped and not launches
    assert _rel(got, r["ref"]) < 2e-2  # bf16 activations, weights and intermediate products
    # the interpreter's grouped GEMM keeps the weights in fp32 (its bf16 dot is wrong in Triton 3.6): the
    # scratch's bf16 weights are the difference
    assert _rel(got, r["triton"][0]) < 2e-2


@pytest.mark.parametrize("case", [("gate_up", 32, False), ("gate_up", 64, False), ("gate_up", 64, True),
                                  ("gate_up", 16, True), ("gate_up", 8, True), ("gate", 64, False),
                                  ("down", 64, False), ("down", 128, False), ("down", 64, True), ("down", 32, False),
                                  ("down", 16, False)],
                         ids=lambda c: f"{c[0]}_bn{c[1]}" + ("_int8" if c[2] else ""))
def test_split_k_and_tile_widths_match_dequantize(results, case):
    got, ref = results["splits"][case]
    assert not got.isnan().any()  # every pair's (token's) rows written
    assert _rel(got, ref) < _tolerance(QType.Q6_K if case[0] == "down" else QType.Q4_K)


@pytest.mark.parametrize("case", [(kind, qt.name, _xq_label(cfg)) for kind, cfgs in XQ_CONFIGS.items()
                                  for qt in XQ_SHAPES for cfg in cfgs], ids="_".join)
def test_xq_activations_match_dequantize(results, case):
    """The routed GEMVs on activations quantized beforehand (gguf_xq.py): as close as the int8 cases."""
    got, ref = results["xq"][case]
    assert not got.isnan().any()  # every pair's (token's) rows written
    assert _rel(got, ref) < _tolerance(QType[case[1]])


@pytest.mark.parametrize("case", [("cat", qt.name, _xq_label(cfg) + f"_split{cfg['split_k']}") for qt in XQ_SHAPES
                                  for cfg in CAT_CONFIGS], ids="_".join)
def test_cat_gate_up_writes_gate_and_up_rows(results, case):
    """A cat config: each program streams one row tile of gate or up; the pair's row is [gate x | up x]."""
    got, ref = results["xq"][case]
    assert not got.isnan().any()  # both halves of every pair's row written
    assert _rel(got[:, :ref.shape[1] // 2], ref[:, :ref.shape[1] // 2]) < _tolerance(QType[case[1]])
    assert _rel(got[:, ref.shape[1] // 2:], ref[:, ref.shape[1] // 2:]) < _tolerance(QType[case[1]])


@pytest.mark.parametrize(("tokens", "down_xq"), CAT_STACK_CASES)
def test_cat_gate_up_then_down_with_the_swiglu_match_the_reference_moe(results, tokens, down_xq):
    """The SwiGLU moved out of gate_up: with xq, down's activation quantization applies it; without, a
    silu_mul launch. Against the reference MoE, within the int8 activations' error (~1%: gate_up is xq
    either way); against the same constants without cat (SwiGLU in gate_up's epilogue), to fp32 rounding."""
    got, glu_in_gate_up, ref = results["cat_stack"][(tokens, down_xq)]
    assert got.shape == ref.shape
    assert _rel(got, ref) < 2e-2
    assert _rel(got, glu_in_gate_up) < 1e-5


@pytest.mark.parametrize("case", [("gate_up", 64), ("gate_up", 16), ("down", 64)],
                         ids=lambda c: f"{c[0]}_bn{c[1]}")
def test_q5k_experts_with_int8_activations_match_dequantize(results, case):
    """Activations int8 represents exactly: the int8 row dot gives the fp32 product up to rounding."""
    got, ref = results["q5k_int8"][case]
    assert not got.isnan().any()
    assert _rel(got, ref) < 1e-5


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "t{}_d{}_e{}_k{}".format(*c))
def test_the_router_kernel_matches_route(results, case):
    (ids, weights), (ref_ids, ref_weights) = results["router"][case]
    assert ids.dtype == ref_ids.dtype and weights.dtype == ref_weights.dtype
    assert torch.equal(ids, ref_ids)  # random logits: no ties, so the order of the top k is defined
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


def test_narrow_tiles_over_long_rows(results):
    got, ref = results["narrow_long_rows"]
    assert _rel(got, ref) < 1e-5


@pytest.mark.parametrize("tokens", TOKENS)
def test_bf16_experts_match_the_reference_moe(results, tokens):
    got, ref = results[("bf16", tokens)]
    assert _rel(got, ref) < 2e-2  # bf16 weights, activations and (in prefill) intermediate products


def test_a_fused_mixtral_gives_the_reference_logits_and_is_graph_safe(results):
    got, ref, safe = results["model"]
    for n in ref:
        assert (got[n] - ref[n]).abs().max().item() < 1e-4, n
    assert safe


if __name__ == "__main__":
    _run_cases(sys.argv[1])


def test_plan_takes_the_committed_measurement_for_the_device(monkeypatch):
    """moe_gemv.plan: a benchmark's entry (TUNED) first, then the device's tuned table ("moe_experts", what
    benchmarks/moe_gpu.py measured), then the rule; none of it on a CPU."""
    from devstral.kernels import gguf_config, moe_gemv

    key = "gate_up|Q4_K|2|14336|4096"
    measured = {"bn": 32, "split_k": 2, "num_warps": 4, "int8": False, "ns": 16, "num_stages": 3}
    monkeypatch.setattr(gguf_config, "device_name", lambda device: "Test GPU")
    monkeypatch.setattr(gguf_config, "tuned_table", lambda name: {"moe_experts": {key: measured}})
    cuda = torch.device("cuda")
    assert moe_gemv.plan("gate_up", "Q4_K", 2, 14336, 4096, 2, 132, cuda) == measured
    monkeypatch.setitem(moe_gemv.TUNED, key, {"bn": 64, "split_k": 1, "num_warps": 4, "int8": False})
    assert moe_gemv.plan("gate_up", "Q4_K", 2, 14336, 4096, 2, 132, cuda)["bn"] == 64
    ruled = moe_gemv.plan("gate_up", "Q4_K", 4, 14336, 4096, 2, 132, torch.device("cpu"))
    assert "ns" not in ruled and ruled["bn"] == 64


def test_plan_keeps_a_measured_xq_entry_and_the_float_switch_drops_it(monkeypatch):
    """A tuned entry may carry xq (an int8 variant); DEVSTRAL_GGUF_FLOAT_GEMV turns it off with int8. Every
    candidate with xq is an int8 one."""
    from devstral.kernels import moe_gemv

    key = "down|Q6_K|1|4096|14336"
    entry = {"bn": 128, "split_k": 4, "num_warps": 4, "int8": True, "xq": True, "num_stages": 3}
    monkeypatch.setitem(moe_gemv.TUNED, key, entry)
    assert moe_gemv.plan("down", "Q6_K", 1, 4096, 14336, 2, 132) == entry
    assert all(c["int8"] for c in moe_gemv.candidates("down", "Q6_K") if c.get("xq"))
    monkeypatch.setenv("DEVSTRAL_GGUF_FLOAT_GEMV", "1")
    assert moe_gemv.plan("down", "Q6_K", 1, 4096, 14336, 2, 132) == {**entry, "int8": False, "xq": False}
    assert not any(c.get("xq") for c in moe_gemv.candidates("gate_up", "Q4_K"))
