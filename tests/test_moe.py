"""Mixture-of-experts (Mixtral) layers in the one model definition, against transformers'
MixtralForCausalLM: logits, greedy generation, the router's balancing loss, both checkpoint layouts,
and the errors a broken MoE checkpoint gets."""

from __future__ import annotations

import json

import pytest
import torch

import devstral
from devstral.errors import DevstralError
from devstral.testing import make_tiny_checkpoint

transformers = pytest.importorskip("transformers")
MOE = dict(n_experts=4, n_experts_per_tok=2, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("mixtral") / "hf", seed=5, **MOE)


def ids(n: int) -> list[int]:
    return [1] + torch.randint(100, 3000, (n - 1,), generator=torch.Generator().manual_seed(n)).tolist()


def test_logits_equal_transformers_mixtral(mixtral):
    hf = transformers.AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    x = ids(80)
    with torch.no_grad():
        ref = hf(torch.tensor([x])).logits[0]
    ours = devstral.load(mixtral, device="cpu", dtype="fp32", backend="torch")
    got = ours.logits(x)
    assert (got - ref).abs().max().item() <= 1e-4
    # the routing is not trivial: several experts are used and the top-k differ across tokens
    moe = ours.model.model.layers[0].block_sparse_moe
    _, experts, _ = moe.route(torch.randn(64, MOE["dim"]))
    assert len(experts.unique()) == MOE["n_experts"]


def test_greedy_generation_through_the_paged_engine_equals_transformers(mixtral):
    hf = transformers.AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32).eval()
    x = ids(20)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([x]), max_new_tokens=12, do_sample=False, eos_token_id=None)[0, 20:].tolist()
    llm = devstral.load(mixtral, device="cpu", dtype="fp32", backend="torch", speculative="off")
    from devstral.engine.sampling import SamplingParams

    out = llm.generate(x, SamplingParams(temperature=0, max_tokens=12)).token_ids
    # ours stops at EOS, transformers was told not to: equal up to there
    assert out == ref[:len(out)] and (len(out) == 12 or ref[len(out)] == llm.tokenizer.eos_id)


def test_mistral_native_layout_loads_the_same_model(tmp_path, mixtral):
    native = make_tiny_checkpoint(tmp_path / "native", layout="mistral", seed=5, **MOE)
    params = json.loads((native / "params.json").read_text())
    assert params["moe"] == {"num_experts": 4, "num_experts_per_tok": 2}
    a = devstral.load(mixtral, device="cpu", dtype="fp32", backend="torch").logits(ids(30))
    b = devstral.load(native, device="cpu", dtype="fp32", backend="torch").logits(ids(30))
    assert torch.equal(a, b)


def test_the_balancing_loss_is_transformers_one():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from devstral.model.moe import load_balancing_loss

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(37, 8, generator=g) for _ in range(3)]
    ours = load_balancing_loss(logits, n_experts=8, top_k=2)
    theirs = load_balancing_loss_func(tuple(logits), num_experts=8, top_k=2)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_bad_moe_configs_and_checkpoints_get_one_line(tmp_path, mixtral):
    cfg = json.loads((mixtral / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in mixtral.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 5}))
    with pytest.raises(DevstralError, match=r"num_experts_per_tok \(5\) is more than num_local_experts \(4\)"):
        devstral.load(bad, device="cpu", backend="torch")
    (bad / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 3, "num_experts_per_tok": 2}))
    with pytest.raises(DevstralError, match=r"num_local_experts.*block_sparse_moe\.gate\.weight"):
        devstral.load(bad, device="cpu", backend="torch")


@pytest.mark.parametrize("ftype", ["F32", "Q8_0", "Q4_K_M"])
def test_exported_gguf_reads_back_and_agrees_with_llama_cpp(tmp_path, ftype, record_property):
    """Stacked expert tensors (ffn_{gate,up,down}_exps), the router (ffn_gate_inp, kept F32 as
    llama-quantize keeps it) and expert_count / expert_used_count: llama.cpp runs the file."""
    import numpy as np

    from devstral.formats.gguf import GGUFFile, export_gguf

    llama_cpp = pytest.importorskip("llama_cpp")
    ck = make_tiny_checkpoint(tmp_path / "hf", seed=7, inner_vocab=500, **MOE)
    path = export_gguf(ck, tmp_path / f"m-{ftype}.gguf", ftype)
    g = GGUFFile(path)
    assert g.metadata["llama.expert_count"] == 4 and g.metadata["llama.expert_used_count"] == 2
    assert g.info("blk.0.ffn_gate_exps.weight").shape == (4, MOE["hidden_dim"], MOE["dim"])
    assert g.info("blk.1.ffn_gate_inp.weight").qtype.name == "F32"
    ours = devstral.load(path, device="cpu", dtype="fp32", backend="torch")
    x = ours.tokenizer.encode("the quick brown fox " * 8, bos=True)
    mine = ours.logits(x).numpy()
    if ftype == "F32":
        ref = devstral.load(ck, device="cpu", dtype="fp32", backend="torch").logits(x).numpy()
        np.testing.assert_allclose(mine, ref, atol=1e-5)
    ll = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    ll.eval(x)
    theirs = np.asarray(ll.scores[:len(x)], dtype=np.float32)
    corr = float(np.corrcoef(mine.ravel(), theirs.ravel())[0, 1])
    top1 = float((mine.argmax(-1) == theirs.argmax(-1)).mean())
    record_property("corr", corr)
    record_property("top1", top1)
    assert corr >= 0.999 and top1 >= 0.95, (corr, top1)
