"""Embeddings against a transformers reference on the same tiny checkpoint, through the real openai and
ollama clients: mean-pooled, L2-normalized final hidden states."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import ollama
import openai
import pytest
import torch

from devstral.engine.embed import CHUNK, embed
from test_server_harness import _start, checkpoint, live, reference_llm

TEXTS = ["def add(a, b):\n    return a + b", "hello", "A longer sentence about fill-in-the-middle prompts."]


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModel.from_pretrained(checkpoint(), torch_dtype=torch.float32,
                                                  attn_implementation="eager").eval()


def reference(hf_model, ids_list: list[list[int]]) -> np.ndarray:
    """transformers' last_hidden_state, mean over the tokens, unit length: one input at a time."""
    out = []
    with torch.no_grad():
        for ids in ids_list:
            hidden = hf_model(torch.tensor([ids])).last_hidden_state[0]
            out.append(torch.nn.functional.normalize(hidden.mean(0), dim=-1).numpy())
    return np.stack(out)


def text_ids(text: str) -> list[int]:
    return reference_llm().encode_prompt(text)


def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=live().url + "/v1", api_key="unused", max_retries=0)


def test_openai_embeddings_equal_the_transformers_reference(hf_model):
    expected = reference(hf_model, [text_ids(t) for t in TEXTS])
    r = client().embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in r.data])
    assert [d.index for d in r.data] == [0, 1, 2]
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert r.usage.prompt_tokens == sum(len(text_ids(t)) for t in TEXTS)
    floats = client().embeddings.create(model="tiny", input=TEXTS[1], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, expected[1], atol=2e-5)
    ids = text_ids(TEXTS[0])[1:]  # token arrays are embedded exactly as given (no BOS added)
    r = client().embeddings.create(model="tiny", input=[ids, ids[:3]])
    np.testing.assert_allclose([d.embedding for d in r.data], reference(hf_model, [ids, ids[:3]]), atol=2e-5)


def test_base64_is_little_endian_float32():
    raw = httpx.post(live().url + "/v1/embeddings", timeout=60,
                     json={"input": "hello", "encoding_format": "base64"}).json()
    floats = httpx.post(live().url + "/v1/embeddings", timeout=60, json={"input": "hello"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.array(floats["data"][0]["embedding"], dtype=np.float32))


def test_ollama_embed_and_legacy_embeddings(hf_model):
    expected = reference(hf_model, [text_ids(t) for t in TEXTS])
    c = ollama.Client(host=live().url)
    r = c.embed(model="tiny", input=TEXTS)
    np.testing.assert_allclose(np.array(r.embeddings), expected, atol=2e-5)
    assert r.prompt_eval_count == sum(len(text_ids(t)) for t in TEXTS)
    one = c.embeddings(model="tiny", prompt=TEXTS[0])
    np.testing.assert_allclose(one.embedding, expected[0], atol=2e-5)


def test_batching_with_padding_and_chunked_long_inputs_change_nothing(hf_model):
    llm = reference_llm()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 2000, (n,), generator=g).tolist() for n in (5, 17, 1, 40, CHUNK + 37)]
    expected = reference(hf_model, seqs)
    batched = embed(llm, seqs, batch_tokens=64, chunk=16)  # 17, 40 and the long one go a chunk at a time
    np.testing.assert_allclose(batched.numpy(), expected, atol=2e-5)
    one_by_one = np.stack([embed(llm, [s], batch_tokens=10_000)[0].numpy() for s in seqs])
    np.testing.assert_allclose(one_by_one, expected, atol=2e-5)


def test_pooling_is_stated_in_models():
    card = client().models.list().data[0]
    assert card.meta["embedding"]["pooling"] == "mean" and card.meta["embedding"]["normalized"] == "l2"
    assert card.meta["embedding"]["dimensions"] == reference_llm().config.dim


def test_bad_embedding_requests():
    dim = reference_llm().config.dim
    with pytest.raises(openai.BadRequestError) as e:
        client().embeddings.create(model="tiny", input="x", dimensions=dim // 2)
    assert e.value.body["param"] == "dimensions"
    ok = client().embeddings.create(model="tiny", input="x", dimensions=dim)
    assert len(ok.data[0].embedding) == dim
    for bad in ([], "", [[]], [10**9]):
        r = httpx.post(live().url + "/v1/embeddings", json={"input": bad}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input", (bad, r.text)
    too_long = httpx.post(live().url + "/v1/embeddings", json={"input": "word " * 600}, timeout=60)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    cut = ollama.Client(host=live().url).embed(model="tiny", input="word " * 600)  # Ollama truncates by default
    assert cut.prompt_eval_count == live().llm.max_context
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=live().url).embed(model="tiny", input="word " * 600, truncate=False)
    assert e.value.status_code == 400


def test_an_oversized_batch_is_a_413():
    small = _start(parallel=1, max_queue=4, max_embedding_inputs=3, max_embedding_tokens=40)
    c = openai.OpenAI(base_url=small.url + "/v1", api_key="x", max_retries=0)
    assert len(c.embeddings.create(model="tiny", input=["a", "b", "c"]).data) == 3
    for big in (["a"] * 4, ["word " * 30, "word " * 30]):
        with pytest.raises(openai.APIStatusError) as e:
            c.embeddings.create(model="tiny", input=big)
        assert e.value.status_code == 413
    r = httpx.post(small.url + "/api/embed", json={"model": "tiny", "input": ["a"] * 4}, timeout=60)
    assert r.status_code == 413 and "3" in r.json()["error"]
    small.server.should_exit = True
