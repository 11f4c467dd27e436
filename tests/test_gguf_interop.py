"""Exported GGUFs in llama.cpp (llama-cpp-python), and quantization quality (KLD) on a trained tiny model.

The tiny model is trained for a few steps on repetitive text (a plain torch loop) so its logits are
peaked, not flat: top-1 agreement is then a meaningful check. llama.cpp quantizes activations to
8 bits in its CPU matmuls, so logits agree closely but not exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import devstral
from devstral.formats.gguf import GGUFFile, export_gguf
from devstral.testing import make_tiny_checkpoint

llama_cpp = pytest.importorskip("llama_cpp")

TRAIN_TEXT = ("The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
              "Lists: [1, 2, 3] and dicts {'k': 'v'}. Ünïcödé 🙂!\n")
PROMPT = "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a"
SAMPLES = ["Hello world!", "  def foo(x):\n\treturn x**2  # ok\n\n", "Ünïcödé 日本語 🙂 123456", "don't I'll \r\n x"]


def _train(folder: Path, steps: int = 14) -> None:
    """A few AdamW steps on TRAIN_TEXT; overwrites the checkpoint's weights."""
    from safetensors.torch import load_file, save_file

    from devstral.config import ModelConfig
    from devstral.model.transformer import Transformer
    from devstral.prompt.tokenizer import load_tokenizer

    cfg = ModelConfig.from_dir(folder)
    ids = torch.tensor(load_tokenizer(folder).encode(TRAIN_TEXT * 12))
    torch.manual_seed(0)
    net = Transformer(cfg)
    net.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (4,))
        x = torch.stack([ids[s:s + 65] for s in starts])
        logits = net(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interop")
    ck = make_tiny_checkpoint(root / "ck", inner_vocab=500, dim=256, hidden_dim=256, n_layers=1, n_heads=4,
                              n_kv_heads=2, head_dim=64)
    _train(ck)
    files = {"ref": ck}
    for ftype in ("Q8_0", "Q4_K_M", "Q4_0"):
        files[ftype] = export_gguf(ck, root / f"tiny-{ftype}.gguf", ftype)
    return files


def _llama(path: Path, **kw):
    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False, **kw)


def test_llama_cpp_tokenizes_like_us(trained) -> None:
    ours = devstral.load(trained["Q8_0"], device="cpu", backend="torch").tokenizer
    ll = _llama(trained["Q8_0"], vocab_only=True)
    for text in SAMPLES:
        assert ll.tokenize(text.encode(), add_bos=False, special=False) == ours.encode(text), text
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Hi there"}]
    chat = ours.render_chat(messages)
    assert ll.tokenize(chat.encode(), add_bos=False, special=True) == ours.encode_chat(messages)
    # A control string typed by a user stays text (llama.cpp would parse it if given the rendered prompt).
    typed = [{"role": "user", "content": "Hi [INST]"}]
    user_ids = ll.tokenize(b"Hi [INST]", add_bos=False, special=False)
    inst = ll.tokenize(b"[INST]", add_bos=False, special=True)
    assert len(inst) == 1 and inst[0] not in user_ids
    assert ours.encode_chat(typed) == ll.tokenize(b"<s>[INST]", add_bos=False, special=True) + user_ids + \
        ll.tokenize(b"[/INST]", add_bos=False, special=True)
    assert ll.token_bos() == ours.bos_id and ll.token_eos() == ours.eos_id


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
def test_llama_cpp_logits_agree_with_ours(trained, ftype: str, record_property) -> None:
    llm = devstral.load(trained[ftype], device="cpu", backend="torch")
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    ours = llm.logits(ids).numpy()
    ll = _llama(trained[ftype], logits_all=True)
    ll.eval(ids)
    theirs = np.asarray(ll.scores[:len(ids)], dtype=np.float32)
    corr = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    max_delta = float(np.abs(ours - theirs).max())
    record_property("max_abs_delta", max_delta)
    top_prob = float(torch.softmax(torch.from_numpy(ours), -1).max(-1).values.mean())
    print(f"{ftype}: corr={corr:.6f} top1={top1:.3f} max|Δ|={max_delta:.4f} mean top prob={top_prob:.2f}")
    assert top_prob > 0.5  # peaked, not flat
    assert corr >= 0.999
    assert top1 >= 0.95


def test_our_loader_reads_back_what_we_wrote(trained) -> None:
    """Dequantized GGUF weights equal the checkpoint within each type's error; Q8_0 model ~ reference."""
    from safetensors.torch import load_file

    from devstral.formats.gguf_names import from_gguf_name, from_llama_cpp_layout, rotary_heads

    sd = load_file(trained["ref"] / "model.safetensors")
    g = GGUFFile(trained["Q8_0"])
    assert g.metadata["general.file_type"] == 7 and g.metadata["general.quantization_version"] == 2
    assert g.metadata["tokenizer.ggml.pre"] == "tekken" and g.metadata["tokenizer.chat_template"]
    for name in g.tensor_names:
        w = from_llama_cpp_layout(g.tensor(name), rotary_heads(name, 4, 2))
        ref = sd[from_gguf_name(name)]
        # Q8_0: error at most half a step (absmax/127) per 32-weight block
        tol = 0 if w.dim() == 1 else float(ref.abs().max()) / 127 * 0.51 + 1e-6
        assert float((w - ref).abs().max()) <= tol, name
    ref_llm = devstral.load(trained["ref"], device="cpu")
    q_llm = devstral.load(trained["Q8_0"], device="cpu", backend="torch")
    ids = ref_llm.tokenizer.encode(PROMPT, bos=True)
    a, b = ref_llm.logits(ids), q_llm.logits(ids)
    assert torch.corrcoef(torch.stack([a.ravel(), b.ravel()]))[0, 1] > 0.999


def test_eval_kld_command_json(trained, tmp_path, capsys) -> None:
    from devstral.cli import main

    data = tmp_path / "data.txt"
    data.write_text(TRAIN_TEXT * 6, encoding="utf-8")
    rc = main(["eval", "kld", "--reference", str(trained["ref"]), "--model", str(trained["Q4_0"]),
               "--data", str(data), "--ctx", "128", "--device", "cpu", "--json"])
    assert rc in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["kld_mean"] > 0 and out["n_tokens"] > 0
    assert {"99", "99.9"} <= set(out["kld_percentiles"]) and 0 < out["same_top_p"] <= 1 and out["ppl_ratio"] > 0
    rc = main(["eval", "kld", "--reference", str(trained["ref"]), "--model", str(trained["Q4_0"]),
               "--data", str(data), "--ctx", "100000", "--device", "cpu"])
    assert rc == 2
    assert "at least --ctx (100000) are needed" in capsys.readouterr().err


def test_kld_values(trained, tmp_path, capsys) -> None:
    from devstral.eval.kld import kld_between

    text = TRAIN_TEXT * 6 + "Some other words the model has not seen as often. " * 8
    ref = devstral.load(trained["ref"], device="cpu")
    kld = {}
    for ftype in ("Q8_0", "Q4_K_M", "Q4_0"):
        stats = kld_between(ref, devstral.load(trained[ftype], device="cpu", backend="torch"), text, ctx=128)
        kld[ftype] = stats.kld_mean
        assert stats.n_tokens > 0 and 0 <= stats.same_top_p <= 1
    print(json.dumps(kld))
    assert 0 < kld["Q8_0"] < kld["Q4_K_M"] < kld["Q4_0"]


def test_ministral3_yarn_and_temperature_match_llama_cpp(tmp_path) -> None:
    """Devstral Small 2's architecture (YaRN + llama-4 query temperature) exports as llama.cpp's mistral3;
    181 positions > the 64-token original context, so both scalings are active."""
    ck = make_tiny_checkpoint(tmp_path / "m3", arch="ministral3", wrap_mistral3=True, inner_vocab=500)
    path = export_gguf(ck, tmp_path / "m3.gguf", "F32")
    assert GGUFFile(path).metadata["general.architecture"] == "mistral3"
    ours = devstral.load(path, device="cpu", backend="torch")
    ids = ours.tokenizer.encode("hello world " * 20, bos=True)
    ref = devstral.load(ck, device="cpu").logits(ids).numpy()
    mine = ours.logits(ids).numpy()
    ll = _llama(path, logits_all=True)
    ll.eval(ids)
    theirs = np.asarray(ll.scores[:len(ids)], dtype=np.float32)
    np.testing.assert_allclose(mine, ref, atol=1e-5)
    assert float(np.abs(mine - theirs).max()) < 5e-3
