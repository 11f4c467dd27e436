"""Fill-in-the-middle and several choices per request against the live server, with the real openai and
ollama clients; expected outputs come from the engine on the FIM ids mistral-common encodes."""

from __future__ import annotations

import json

import httpx
import ollama
import openai

from devstral.engine.sampling import SamplingParams
from devstral.prompt.fim import infill_ids
from devstral.server.fim_routes import _split_indent
from test_server_harness import forced_output, live, reference_llm

PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return c\n"


def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=live().url + "/v1", api_key="unused", max_retries=0)


def reference(ids: list[int], n: int, **kw):
    return reference_llm().generate(ids, SamplingParams(temperature=0, max_tokens=n, **kw))


def fim_ids(prefix: str = PREFIX, suffix: str | None = SUFFIX) -> list[int]:
    from mistral_common.protocol.fim.request import FIMRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from test_server_harness import checkpoint

    mistral = MistralTokenizer.from_file(str(checkpoint() / "tekken.json"))
    return mistral.encode_fim(FIMRequest(prompt=prefix, suffix=suffix)).tokens


def test_mistral_fim_route_generates_after_the_mistral_common_prompt():
    ref = reference(fim_ids(), 12)
    body = {"model": "tiny", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 12, "temperature": 0}
    r = httpx.post(live().url + "/v1/fim/completions", json=body, timeout=60).json()
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"]["content"] == ref.text
    assert r["choices"][0]["finish_reason"] == ref.finish_reason
    assert r["usage"]["prompt_tokens"] == len(fim_ids()) and r["usage"]["completion_tokens"] == len(ref.token_ids)
    with httpx.stream("POST", live().url + "/v1/fim/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] == ref.finish_reason and chunks[-1]["usage"]


def test_min_tokens_larger_than_max_tokens_is_a_400():
    r = httpx.post(live().url + "/v1/fim/completions", timeout=60,
                   json={"prompt": "a", "max_tokens": 2, "min_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"


def test_openai_completions_suffix_is_fill_in_the_middle():
    ref = reference(fim_ids(), 10)
    r = client().completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=10, temperature=0)
    assert r.choices[0].text == ref.text and r.usage.prompt_tokens == len(fim_ids())
    empty = client().completions.create(model="tiny", prompt=PREFIX, suffix="", max_tokens=1, temperature=0)
    assert empty.usage.prompt_tokens == len(fim_ids(PREFIX, None))  # end of file: FIM with nothing after


def test_typed_fim_markers_in_a_raw_prompt_stay_text():
    text = "[PREFIX]x = 1[SUFFIX]"
    raw = reference_llm().tokenizer.raw.encode(text, bos=True, eos=False)  # mistral-common's plain encoding
    r = client().completions.create(model="tiny", prompt=text, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == len(raw)
    assert reference_llm().tokenizer.special_id("[PREFIX]") not in raw


def test_ollama_generate_suffix():
    ref = reference(fim_ids(), 10)
    r = ollama.Client(host=live().url).generate(model="tiny", prompt=PREFIX, suffix=SUFFIX, stream=False,
                                                options={"temperature": 0, "num_predict": 10})
    assert r.response == ref.text and r.prompt_eval_count == len(fim_ids())


def test_infill_in_llama_cpp_shape_with_extra_files():
    extra = [{"filename": "utils.py", "text": "def helper():\n    return 1\n"}]
    ids = infill_ids(reference_llm().tokenizer, PREFIX + "a +", SUFFIX,
                     extra=[("utils.py", extra[0]["text"])]).ids
    ref = reference(ids, 8)
    body = {"input_prefix": PREFIX, "prompt": "a +", "input_suffix": SUFFIX, "input_extra": extra, "n_predict": 8,
            "temperature": 0}
    r = httpx.post(live().url + "/infill", json=body, timeout=60).json()
    assert r["content"] == ref.text and r["tokens_evaluated"] == len(ids) and r["stop"] is True
    assert r["tokens_predicted"] == len(ref.token_ids) and r["truncated"] is False
    assert r["timings"]["predicted_n"] == len(ref.token_ids)
    with httpx.stream("POST", live().url + "/infill", json={**body, "stream": True}, timeout=60) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert "".join(c["content"] for c in chunks) == ref.text and chunks[-1]["stop"] is True


def test_infill_cuts_a_prompt_that_does_not_fit_next_to_the_cursor():
    prefix = "".join(f"v{i} = {i}\n" for i in range(400))
    r = httpx.post(live().url + "/infill", timeout=60,
                   json={"input_prefix": prefix, "input_suffix": "print(v1)\n" * 100, "n_predict": 4})
    out = r.json()
    assert r.status_code == 200 and out["truncated"] is True
    assert out["tokens_evaluated"] + 4 <= live().llm.max_context


def test_infill_n_indent_ends_at_a_less_indented_line():
    tok = reference_llm().tokenizer
    with forced_output(tok.encode("x\n        y = 1\n    z = 2\n")):
        r = httpx.post(live().url + "/infill", timeout=60,
                       json={"input_prefix": "    ", "input_suffix": "", "n_indent": 8, "n_predict": 40})
    assert r.json()["content"] == "x\n        y = 1"


def test_split_indent_holds_a_line_until_its_indentation_is_known():
    assert _split_indent("a\n   ", 4) == (False, "a", "\n   ")
    assert _split_indent("a\n\n    b\n  c", 4) == (True, "a\n\n    b", "")
    assert _split_indent("a\n    b", 4) == (False, "a\n    b", "")


# ---------------------------------------------------------------- n > 1 and prompt lists
def test_completions_n_and_prompt_lists_are_one_job_per_choice():
    kw = dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.0, repeat_penalty=1.0)
    prompts = ["first prompt", "second one"]
    r = client().completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, seed=11, temperature=0.9,
                                    top_p=0.9, extra_body={"top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    expected = [reference_llm().generate(p, SamplingParams(max_tokens=6, seed=11 + j, **kw)).text
                for p in prompts for j in range(2)]  # choice i * n + j: prompt i, seed + j
    assert [c.text for c in r.choices] == expected
    stream = client().completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, seed=11, temperature=0.9,
                                         top_p=0.9, stream=True, stream_options={"include_usage": True},
                                         extra_body={"top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0})
    texts, usage = [""] * 4, None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert texts == expected and usage.completion_tokens == r.usage.completion_tokens


def test_chat_n_returns_n_choices_streamed_and_not():
    ask = [{"role": "user", "content": "Say something"}]
    kw = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.0, repeat_penalty=1.0)
    expected = [reference_llm().chat(ask, sampling=SamplingParams(max_tokens=5, seed=3 + j, **kw)).message["content"]
                for j in range(3)]
    extra = {"top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0}
    r = client().chat.completions.create(model="tiny", messages=ask, n=3, max_tokens=5, seed=3, temperature=0.8,
                                         top_p=0.95, extra_body=extra)
    assert [c.message.content for c in r.choices] == expected and [c.index for c in r.choices] == [0, 1, 2]
    texts, roles = [""] * 3, set()
    for chunk in client().chat.completions.create(model="tiny", messages=ask, n=3, max_tokens=5, seed=3,
                                                  temperature=0.8, top_p=0.95, extra_body=extra, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.delta.role:
                roles.add(c.index)
    assert texts == expected and roles == {0, 1, 2}


def test_too_many_choices_is_a_400():
    try:
        client().completions.create(model="tiny", prompt=["a"] * 5, n=4, max_tokens=1)
    except openai.BadRequestError as e:
        assert e.body["param"] == "n"
    else:
        raise AssertionError("expected a 400")
