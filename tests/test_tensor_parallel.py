"""Tensor parallelism over 2 processes (gloo on the CPU; NCCL on 2 GPUs for the gpu-marked twins).

The oracle is the same model in one process: logits within 1e-5 in fp32 (only the order of the
all-reduce's partial sums differs), and the same greedy tokens through the engine's paged cache,
batching and chunked prefill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch
from gguf import GGMLQuantizationType as QType

import devstral
from devstral.engine.sampling import SamplingParams
from devstral.errors import DevstralError
from devstral.parallel.sharding import Slice, check_divisible
from devstral.testing import make_tiny_checkpoint, tiny_config

GREEDY = SamplingParams(temperature=0)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(1000, 4000, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def greedy_all(llm, batch: list[list[int]], n: int) -> list[list[int]]:
    engine = llm.engine
    seqs = [engine.add(p, GREEDY, n, set()) for p in batch]
    while engine.has_work():
        engine.step()
    return [s.token_ids[s.num_prompt_tokens:] for s in seqs]


@pytest.fixture(scope="module")
def mistral_layout(tmp_path_factory):
    # Mistral's consolidated layout: q/k rows interleaved per head, so each rank's slice must be
    # permuted with its own head count.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tp_mistral"), layout="mistral", arch="mistral", seed=5)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within 1e-5, in units of the logits' scale when they exceed 1 (the tied GGUF model's reach ~50,
    where one float32 ulp is already 4e-6)."""
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


def check_pair(single, tp, *, parallel_seqs: int = 3, tokens: int = 12) -> None:
    ids = prompts(1, seed=7)[0] + prompts(1, seed=8)[0]
    assert close(single.logits(ids), tp.logits(ids))
    # through the paged cache, in chunks of 5 tokens (prefill chunks and the cache's reads)
    assert close(single.engine.teacher_forced_logits(ids, chunk=5), tp.engine.teacher_forced_logits(ids, chunk=5))
    batch = prompts(parallel_seqs, seed=3)
    assert greedy_all(tp, batch, tokens) == greedy_all(single, batch, tokens)


def test_tp2_matches_one_process_safetensors(mistral_layout):
    single = devstral.load(mistral_layout, device="cpu", kv_cache_dtype="fp32", parallel=3)
    tp = devstral.load(mistral_layout, device="cpu", kv_cache_dtype="fp32", parallel=3, tensor_parallel=2,
                       max_batched_tokens=24)
    try:
        assert tp.model.model.layers[0].self_attn.q_proj.weight.shape[0] == single.config.n_heads * 16 // 2
        assert tp.engine.pool.k.shape[3] == single.config.n_kv_heads // 2  # the pool holds the local kv heads
        check_pair(single, tp)
    finally:
        tp.close()


def test_tp2_matches_one_process_gguf_q8_0(tmp_path):
    from devstral.formats.gguf_write import export_gguf

    # tied embeddings: the vocab-parallel head shares the embedding's shard
    ck = make_tiny_checkpoint(tmp_path / "ck", arch="ministral3", seed=6, tie_embeddings=True)
    gguf = export_gguf(ck, tmp_path / "m.gguf", "Q8_0")
    single = devstral.load(gguf, device="cpu", backend="torch", kv_cache_dtype="fp32", parallel=2)
    tp = devstral.load(gguf, device="cpu", backend="torch", kv_cache_dtype="fp32", parallel=2, tensor_parallel=2)
    try:
        o_proj = tp.model.model.layers[0].self_attn.o_proj
        assert (o_proj.out_features, o_proj.in_features) == (64, 32)  # row-parallel, whole Q8_0 blocks
        check_pair(single, tp, parallel_seqs=2, tokens=8)
    finally:
        tp.close()


def test_heads_or_vocab_not_divisible_is_one_line():
    cfg = tiny_config(n_heads=4, n_kv_heads=2)
    with pytest.raises(DevstralError, match=r"^--tensor-parallel 3: m has 4 attention heads"):
        check_divisible(cfg, 3, source="m")
    with pytest.raises(DevstralError, match=r"has 2 kv heads"):
        check_divisible(cfg, 4, source="m")
    with pytest.raises(DevstralError, match=r"vocabulary"):
        check_divisible(tiny_config(vocab_size=4097, n_heads=4, n_kv_heads=4, hidden_dim=128), 2, source="m")
    with pytest.raises(DevstralError, match=r"mixture-of-experts"):
        check_divisible(tiny_config(n_experts=4, n_experts_per_tok=2), 2, source="m")


def test_more_ranks_than_gpus_is_one_line(monkeypatch):
    from devstral.parallel.launch import rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DevstralError, match=r"^--tensor-parallel 4 needs 4 GPUs but 2 are visible"):
        rank_device("cuda", 0, 4)


def test_cli_refuses_before_spawning(mistral_layout):
    r = subprocess.run([sys.executable, "-m", "devstral", "run", "--model", str(mistral_layout), "--raw", "-n", "1",
                        "--device", "cpu", "--tensor-parallel", "3", "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --tensor-parallel 3:")


def test_gguf_row_split_inside_a_block_is_one_line():
    from devstral.formats.gguf_model import _column_blocks

    raw = torch.zeros(8, 2 * 144, dtype=torch.uint8)  # Q4_K rows of 512 weights: two 256-weight blocks
    with pytest.raises(DevstralError, match=r"blk.0.attn_output.weight \(Q4_K, 256-weight blocks\).*inside a block"):
        _column_blocks(raw, QType.Q4_K, Slice(1, 128, 256), "blk.0.attn_output.weight", 4)
    assert _column_blocks(raw, QType.Q4_K, Slice(1, 256, 512), "x", 2).shape == (8, 144)


def test_a_rank_that_dies_stops_the_group_and_is_named(mistral_layout, tmp_path):
    script = tmp_path / "serve_forever.py"
    script.write_text(textwrap.dedent(f"""
        import sys, devstral
        from devstral.engine.sampling import SamplingParams
        llm = devstral.load({str(mistral_layout)!r}, device="cpu", tensor_parallel=2, speculative="off")
        print("ready", flush=True)
        while True:  # rank 0 keeps stepping the engine (inside collectives) when rank 1 dies
            llm.generate([1, 1000, 1001], SamplingParams(temperature=0, max_tokens=50))
    """))
    env = {**os.environ, "DEVSTRAL_TP_TIMEOUT": "60"}
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
    try:
        assert p.stdout.readline().strip() == "ready"
        workers = psutil.Process(p.pid).children()
        assert len(workers) == 1
        time.sleep(0.3)
        os.kill(workers[0].pid, signal.SIGKILL)
        _, err = p.communicate(timeout=30)  # nothing hangs
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert "error: tensor-parallel rank 1 was killed by signal 9" in err


# ---------------------------------------------------------------- the same checks over NCCL (2 GPUs)
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA GPUs")


@pytest.mark.gpu
@two_gpus
def test_tp2_nccl_matches_one_gpu_fp32(mistral_layout):
    single = devstral.load(mistral_layout, device="cuda", dtype="fp32", kv_cache_dtype="fp32", parallel=3)
    tp = devstral.load(mistral_layout, device="cuda", dtype="fp32", kv_cache_dtype="fp32", parallel=3,
                       tensor_parallel=2)
    try:
        assert tp.engine.runner.graphs is not None  # decode steps replay CUDA graphs holding the all-reduces
        check_pair(single, tp)
    finally:
        tp.close()


@pytest.mark.gpu
@two_gpus
def test_tp2_nccl_bf16_greedy_through_graphs(mistral_layout):
    single = devstral.load(mistral_layout, device="cuda", dtype="bf16", parallel=2)
    tp = devstral.load(mistral_layout, device="cuda", dtype="bf16", parallel=2, tensor_parallel=2)
    try:
        ids = prompts(1, seed=11)[0]
        a, b = single.logits(ids), tp.logits(ids)
        # bf16: the split sums round differently; bounded by bf16's own error at these magnitudes
        assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item()
        batch = prompts(2, seed=12)
        out_tp, out_single = greedy_all(tp, batch, 8), greedy_all(single, batch, 8)
        agree = sum(x == y for a_, b_ in zip(out_tp, out_single, strict=True) for x, y in zip(a_, b_, strict=True))
        assert agree >= 12  # near-ties may flip late tokens in bf16
    finally:
        tp.close()
