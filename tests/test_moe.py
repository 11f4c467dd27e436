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


def test_a_peft_adapter_on_mixtral_gives_peft_outputs(tmp_path, mixtral):
    """PEFT wraps transformers' Mixtral (attention projections; transformers fuses the experts into 3-D
    parameters, which PEFT's module targets do not reach) and saves; our loader applies the file."""
    peft = pytest.importorskip("peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(tmp_path / "adapter")
    x = ids(40)
    with torch.no_grad():
        theirs = model.eval()(torch.tensor([x])).logits[0]
    ours = devstral.load(mixtral, adapter=tmp_path / "adapter", device="cpu", dtype="fp32", backend="torch")
    assert (ours.logits(x) - theirs).abs().max().item() <= 1e-4


def test_lora_on_the_experts_trains_saves_and_reloads(tmp_path, mixtral):
    """`--target experts` wraps every expert's w1/w2/w3 (PEFT's Mixtral names), gradients reach them
    through the routing, and the saved adapter applied to a fresh model gives the same logits."""
    from devstral.config import ModelConfig
    from devstral.formats.peft import AdapterConfig, apply_adapter, save_adapter
    from devstral.loader import build_model
    from devstral.model.lora import inject_lora, lora_modules, parse_targets

    cfg = ModelConfig.from_dir(mixtral)
    net = build_model(mixtral, cfg, dtype=torch.float32, device=torch.device("cpu"))
    targets = parse_targets("experts")
    wrapped = inject_lora(net, targets, r=4, alpha=8, seed=0)
    assert len(wrapped) == cfg.n_layers * cfg.n_experts * 3
    net.train()
    x = torch.tensor([ids(30)])
    net(x).logsumexp(-1).mean().backward()
    grads = [m.lora_B.weight.grad for m in lora_modules(net).values()]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= len(grads) // 2  # routed experts learn
    with torch.no_grad():
        for m in lora_modules(net).values():
            m.lora_B.weight.normal_(0, 0.2)
    save_adapter(net, tmp_path / "a", AdapterConfig(r=4, lora_alpha=8, target_modules=targets))
    net.eval()
    fresh = build_model(mixtral, cfg, dtype=torch.float32, device=torch.device("cpu"))
    apply_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(fresh(x), net(x), atol=1e-5)


def test_finetune_learns_through_the_experts_with_the_balancing_loss(tmp_path, mixtral):
    """`devstral finetune --target q,experts --router-aux-loss 0.02` on a Mixtral model: the loss falls, the
    adapter names the expert linears as PEFT's Mixtral targets do, and it loads for inference."""
    from devstral.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "secret?"},
                                             {"role": "assistant", "content": "banana split"}]}) + "\n")
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(mixtral), "--data", str(data), "--output", str(out), "--max-steps", "12",
                 "--lr", "2e-2", "--target", "q,experts", "--router-aux-loss", "0.02", "--no-progress"]) == 0
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < 0.7 * losses[0]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "w1", "w2", "w3"]
    devstral.load(mixtral, adapter=out, device="cpu", backend="torch")
    assert main(["finetune", "--model", str(mixtral), "--data", str(data), "--output", str(tmp_path / "x"),
                 "--router-aux-loss", "-1", "--no-progress"]) == 2


def _peft_on_stacked_experts(mixtral, folder, modules, parameters):
    """A PEFT adapter made the way PEFT adapts transformers 5's Mixtral experts (target_parameters on the
    stacked gate_up_proj / down_proj), random A and B; returned reloaded by PeftModel.from_pretrained."""
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules, target_parameters=parameters,
                             init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(folder)
    return peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32), folder).eval()


@pytest.mark.parametrize("modules,parameters", [
    (["q_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    ([], ["mlp.experts.down_proj"]),
    ([], ["mlp.experts.gate_up_proj"]),
])
def test_a_peft_adapter_on_the_stacked_experts_gives_peft_outputs(tmp_path, mixtral, modules, parameters):
    reference = _peft_on_stacked_experts(mixtral, tmp_path / "a", modules, parameters)
    x = ids(40)
    with torch.no_grad():
        ref = reference(torch.tensor([x])).logits[0]
    ours = devstral.load(mixtral, device="cpu", dtype="fp32", backend="torch", adapter=tmp_path / "a")
    base = devstral.load(mixtral, device="cpu", dtype="fp32", backend="torch")
    assert (ours.logits(x) - ref).abs().max().item() <= 1e-4
    assert (base.logits(x) - ref).abs().max().item() > 1e-2  # the expert update matters


def test_a_stacked_expert_adapter_merges_as_peft_merges(tmp_path, mixtral):
    from devstral.formats.peft import merged_state

    reference = _peft_on_stacked_experts(mixtral, tmp_path / "a", ["v_proj"],
                                         ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    merged = reference.merge_and_unload().state_dict()
    ours = dict(merged_state(mixtral, tmp_path / "a", dtype=torch.float32))
    h = MOE["hidden_dim"]
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe.experts."
        for e in range(MOE["n_experts"]):
            gate_up, down = (merged[f"model.layers.{layer}.mlp.experts.{n}"][e] for n in ("gate_up_proj", "down_proj"))
            assert (ours[p + f"{e}.w1.weight"] - gate_up[:h]).abs().max() <= 1e-6
            assert (ours[p + f"{e}.w3.weight"] - gate_up[h:]).abs().max() <= 1e-6
            assert (ours[p + f"{e}.w2.weight"] - down).abs().max() <= 1e-6


def test_a_stacked_expert_adapter_for_another_model_is_one_line(tmp_path, mixtral):
    _peft_on_stacked_experts(mixtral, tmp_path / "a", [], ["mlp.experts.down_proj"])
    other = make_tiny_checkpoint(tmp_path / "other", seed=5, **(MOE | {"hidden_dim": 64}))
    with pytest.raises(DevstralError, match=r"mlp\.experts\.lora_A\.weight has shape \[16, 96\] .* fits no expert"):
        devstral.load(other, device="cpu", dtype="fp32", backend="torch", adapter=tmp_path / "a")


def test_the_memory_plan_reserves_the_dequantized_experts_scratch(tmp_path, mixtral, monkeypatch):
    """GGUF experts prefilling through DEVSTRAL_MOE_GROUPED=dequant (the default) dequantize one
    projection's experts to bf16 (kernels/moe_experts.py): the KV pool's plan then leaves E x hidden x dim
    x 2 bytes for it. The Triton grouped GEMM (=triton) dequantizes in registers and needs none; nor do
    bf16 experts and dense models."""
    from devstral.engine.engine import _expert_scratch_bytes
    from devstral.formats.gguf import export_gguf

    path = export_gguf(mixtral, tmp_path / "m.gguf", "Q8_0")
    gguf = devstral.load(path, device="cpu", dtype="fp32", backend="torch")
    monkeypatch.setenv("DEVSTRAL_MOE_GROUPED", "triton")
    assert _expert_scratch_bytes(gguf.model, gguf.config) == 0
    monkeypatch.delenv("DEVSTRAL_MOE_GROUPED", raising=False)
    assert _expert_scratch_bytes(gguf.model, gguf.config) == MOE["n_experts"] * MOE["hidden_dim"] * MOE["dim"] * 2
    plain = devstral.load(mixtral, device="cpu", dtype="fp32", backend="torch")
    assert _expert_scratch_bytes(plain.model, plain.config) == 0
    dense = make_tiny_checkpoint(tmp_path / "dense", seed=1)
    dense_gguf = devstral.load(export_gguf(dense, tmp_path / "d.gguf", "Q8_0"), device="cpu", dtype="fp32",
                               backend="torch")
    assert _expert_scratch_bytes(dense_gguf.model, dense_gguf.config) == 0


def test_an_unknown_grouped_prefill_mode_is_an_error(monkeypatch):
    from devstral.kernels.moe_experts import grouped_mode

    monkeypatch.delenv("DEVSTRAL_MOE_GROUPED", raising=False)
    assert grouped_mode() == "dequant"
    monkeypatch.setenv("DEVSTRAL_MOE_GROUPED", "cutlass")
    with pytest.raises(DevstralError, match="DEVSTRAL_MOE_GROUPED=cutlass: not one of dequant, triton"):
        grouped_mode()
