"""Ollama details with the real `ollama` client: think, context, keep_alive and /api/ps, HEAD /, the
chat template in /api/show, and pull/copy/create/delete over a local model store."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import httpx
import ollama
import pytest
import torch

from devstral.engine.sampling import SamplingParams
from devstral.engine.token_masks import banned_tokens
from devstral.formats.gguf_chat import builtin_template
from devstral.server.residency import keep_alive_seconds
from devstral.server.thinking import ThinkSplitter
from test_server_harness import _start, checkpoint, forced_output, live, reference_llm

GREEDY = {"temperature": 0, "num_predict": 8}


def client(server=None) -> ollama.Client:
    return ollama.Client(host=(server or live()).url)


def thinking_ids(thought: str, answer: str) -> list[int]:
    tok = reference_llm().tokenizer
    return [tok.special_id("[THINK]"), *tok.encode(thought), tok.special_id("[/THINK]"), *tok.encode(answer)]


def test_think_splits_thinking_from_the_answer():
    ask = [{"role": "user", "content": "2+2?"}]
    with forced_output(thinking_ids("add them up", "It is 4.")):
        r = client().chat(model="tiny", messages=ask, think=True, stream=False)
        parts = list(client().chat(model="tiny", messages=ask, think=True, stream=True))
        g = client().generate(model="tiny", prompt="2+2?", think=True, stream=False)
        gparts = list(client().generate(model="tiny", prompt="2+2?", think=True, stream=True))
    assert r.message.thinking == "add them up" and r.message.content == "It is 4."
    assert "".join(p.message.thinking or "" for p in parts) == "add them up"
    assert "".join(p.message.content or "" for p in parts) == "It is 4."
    assert g.thinking == "add them up" and g.response == "It is 4."
    assert "".join(p.thinking or "" for p in gparts) == "add them up"
    assert "".join(p.response or "" for p in gparts) == "It is 4."


def test_think_splitter_holds_markers_cut_across_pieces():
    s = ThinkSplitter()
    pieces = [s.feed(t) for t in ("Hi [TH", "INK]pla", "n[/THI", "NK] done [", "x")]
    thinking = "".join(p[0] for p in pieces) + s.flush()[0]
    s2 = ThinkSplitter()
    answer = "".join(s2.feed(t)[1] for t in ("Hi [TH", "INK]pla", "n[/THI", "NK] done [", "x")) + s2.flush()[1]
    assert thinking == "plan" and answer == "Hi  done [x"


def test_think_false_bans_the_think_token():
    """The mask on [THINK]: where the model would pick it, the best other token comes instead."""
    llm = reference_llm()
    ids = llm.encode_prompt("hello")
    greedy = int(llm.logits(ids)[-1].argmax())  # stand in for [THINK]: ban the token the model picks
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=1,
                                           constraint=banned_tokens(llm.config.vocab_size, [greedy])))
    logits = llm.logits(ids)[-1].clone()
    logits[greedy] = -torch.inf
    assert out.token_ids == [int(logits.argmax())]
    r = client().chat(model="tiny", messages=[{"role": "user", "content": "hi"}], think=False,
                      options={"num_predict": 3}, stream=False)
    assert r.done


def test_context_round_trips_into_the_chat_encoding_of_the_conversation():
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = reference_llm().tokenizer
    with forced_output(tok.encode("Sure thing.")):
        first = client().generate(model="tiny", prompt="Say yes", stream=False)
    assert first.response == "Sure thing."
    second = client().generate(model="tiny", prompt="Again", context=first.context, options=GREEDY, stream=False)
    prompt = second.context[:second.prompt_eval_count]
    mistral = MistralTokenizer.from_file(str(checkpoint() / "tekken.json"))
    conversation = [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "Sure thing."},
                    {"role": "user", "content": "Again"}]
    expected = mistral.encode_chat_completion(ChatCompletionRequest(messages=conversation)).tokens
    assert prompt == expected
    raw = client().generate(model="tiny", prompt=" more", raw=True, context=first.context, options=GREEDY,
                            stream=False)
    assert raw.context[:raw.prompt_eval_count] == [*first.context, *tok.encode(" more")]
    bad = httpx.post(live().url + "/api/generate", timeout=60,
                     json={"model": "tiny", "prompt": "x", "context": [10**9], "stream": False})
    assert bad.status_code == 400 and "context" in bad.json()["error"]


def test_keep_alive_zero_unloads_and_the_next_request_reloads():
    server = _start(parallel=2, max_queue=8)
    c = client(server)
    try:
        assert [m.model for m in c.ps().models] == ["tiny"]
        ref = reference_llm().generate(reference_llm().encode_prompt("abc"), SamplingParams(temperature=0,
                                                                                           max_tokens=6))
        c.generate(model="tiny", prompt="abc", raw=True, options={"temperature": 0, "num_predict": 6},
                   keep_alive=0, stream=False)
        deadline = time.monotonic() + 20
        while c.ps().models:
            assert time.monotonic() < deadline, "the model was not unloaded"
            time.sleep(0.05)
        assert all(p.device.type == "meta" for p in server.llm.model.parameters())  # the weights are gone
        again = c.generate(model="tiny", prompt="abc", raw=True, options={"temperature": 0, "num_predict": 6},
                           keep_alive="10m", stream=False)
        assert again.response == ref.text  # reloaded from the same files
        (entry,) = c.ps().models
        left = (entry.expires_at - datetime.now(timezone.utc)).total_seconds()
        assert 500 < left <= 600
        stop = c.generate(model="tiny", prompt="", keep_alive=0)  # `ollama stop`
        assert stop.done_reason == "unload"
        deadline = time.monotonic() + 20
        while c.ps().models:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        load = c.chat(model="tiny", messages=[], keep_alive=-1)
        assert load.done_reason == "load" and c.ps().models[0].expires_at.year > 2100
    finally:
        server.server.should_exit = True


def test_keep_alive_durations_parse_like_ollama():
    assert keep_alive_seconds("5m") == 300 and keep_alive_seconds("1h30m") == 5400
    assert keep_alive_seconds(0) == 0 and keep_alive_seconds("0") == 0 and keep_alive_seconds(2.5) == 2.5
    assert keep_alive_seconds(-1) is None and keep_alive_seconds("-1m") is None
    r = httpx.post(live().url + "/api/generate", json={"model": "tiny", "prompt": "x", "keep_alive": "soon"})
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]


def test_head_root_and_show_template():
    assert httpx.head(live().url + "/").status_code == 200
    show = client().show("tiny")
    assert show.template == builtin_template("v13")  # what our GGUF export writes for this tokenizer
    assert "tools" in show.template and {"completion", "tools", "insert"} <= set(show.capabilities)


def test_store_create_copy_show_delete():
    c = client()
    c.create(model="tiny-brief", from_="tiny", system="Answer in one word.", parameters={"temperature": 0.2})
    c.copy("tiny-brief", "tiny-copy")
    names = [m.model for m in c.list().models]
    assert names[0] == "tiny" and {"tiny-brief:latest", "tiny-copy:latest"} <= set(names)
    shown = c.show("tiny-copy")
    assert "0.2" in shown.parameters and shown.modelfile.startswith("FROM ")
    c.delete("tiny-copy")
    assert "tiny-copy:latest" not in [m.model for m in c.list().models]
    with pytest.raises(ollama.ResponseError) as e:
        c.delete("tiny-copy")
    assert e.value.status_code == 404
    legacy = httpx.post(live().url + "/api/create", timeout=60, json={
        "model": "tiny-mf", "stream": False,
        "modelfile": f'FROM {checkpoint()}\nSYSTEM """Be\nterse."""\nPARAMETER top_k 5\nPARAMETER stop "END"'})
    assert legacy.json() == {"status": "success"}
    with pytest.raises(ollama.ResponseError) as e:
        c.create(model="q", from_="tiny", quantize="q4_K_M")
    assert e.value.status_code == 400 and "quantize" in e.value.error
    c.delete("tiny-brief")
    c.delete("tiny-mf")


def test_a_stored_model_loads_by_name_with_its_system_prompt_and_parameters(tmp_path, monkeypatch):
    import devstral
    from devstral.store import ModelStore

    monkeypatch.setenv("DEVSTRAL_HOME", str(tmp_path))
    ModelStore().add("brief", checkpoint(), "path", system="Answer in one word.",
                     parameters={"temperature": 0.3, "top_k": 7, "stop": "END"})
    llm = devstral.load("brief", max_context=64)
    assert llm.tokenizer.default_system_prompt == "Answer in one word."
    assert (llm.default_sampling.temperature, llm.default_sampling.top_k, llm.default_sampling.stop) == \
        (0.3, 7, ["END"])


def test_pull_is_the_route_that_downloads(monkeypatch):
    """The hub is stubbed: what matters is that pull goes through formats/hub.py and names the result."""
    import devstral.formats.hub as hub

    asked = []

    def fake_download(spec: str):
        asked.append(spec)
        return checkpoint()

    monkeypatch.setattr(hub, "download", fake_download)
    statuses = [p.status for p in client().pull("mistralai/Tiny-Test", stream=True)]
    assert asked == ["mistralai/Tiny-Test"] and statuses[-1] == "success"
    assert "mistralai/Tiny-Test:latest" in [m.model for m in client().list().models]
    client().delete("mistralai/Tiny-Test")
