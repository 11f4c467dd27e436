"""Training data: formats, assistant-only labels token by token, bad lines, truncation, packing."""

from __future__ import annotations

import json

import pytest
import torch

from devstral.errors import DevstralError
from devstral.prompt.tokenizer import load_tokenizer
from devstral.train.batching import BatchPlan, collate, epoch_order, micro_batches
from devstral.train.data import IGNORE, encode_record, load_examples

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    {"role": "assistant", "content": "It is sunny."},
]


@pytest.fixture(scope="module")
def tok(tiny_hf):
    return load_tokenizer(tiny_hf)


def _runs(labels):
    runs, start = [], None
    for i, t in enumerate([*labels, IGNORE]):
        if t != IGNORE and start is None:
            start = i
        elif t == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_labels_cover_exactly_what_the_assistant_emits(tok):
    ids, labels = encode_record({"messages": CONVERSATION, "tools": TOOLS}, tok)
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels, strict=True))
    runs = _runs(labels)
    assert len(runs) == 2
    # Each learned run starts right where the serving prompt for that turn ends.
    assert runs[0][0] == len(tok.encode_chat(CONVERSATION[:1], TOOLS))
    assert runs[1][0] == len(tok.encode_chat(CONVERSATION[:3], TOOLS))
    assert ids[:runs[1][0]] == tok.encode_chat(CONVERSATION[:3], TOOLS)
    call = tok.decode(ids[runs[0][0]:runs[0][1]], special=True)
    assert call.startswith("[TOOL_CALLS]get_weather") and "Paris" in call and ids[runs[0][1] - 1] == tok.eos_id
    assert ids[runs[1][0]:runs[1][1]] == tok.encode("It is sunny.") + [tok.eos_id]
    assert runs[1][1] == len(ids)


def test_last_assistant_only(tok):
    ids, labels = encode_record({"messages": CONVERSATION, "tools": TOOLS}, tok, train_on="last-assistant")
    assert _runs(labels) == [(len(tok.encode_chat(CONVERSATION[:3], TOOLS)), len(ids))]


def test_prompt_completion_and_text_formats(tok):
    ids, labels = encode_record({"prompt": "Hi", "completion": "Hello there"}, tok)
    prompt = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[:len(prompt)] == prompt and all(t == IGNORE for t in labels[:len(prompt)])
    assert labels[len(prompt):] == tok.encode("Hello there") + [tok.eos_id]
    ids, labels = encode_record({"text": "plain words"}, tok)
    assert ids == tok.encode("plain words", bos=True, eos=True) and labels == [IGNORE, *ids[1:]]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bad_lines_name_the_line_or_are_skipped_and_counted(tok, tmp_path):
    good = {"prompt": "a", "completion": "b"}
    path = _write(tmp_path / "d.jsonl", [good, "{not json", {"foo": 1}, good])
    with pytest.raises(DevstralError, match=r"d\.jsonl:2: invalid JSON"):
        load_examples(path, tok, max_seq_len=512)
    examples, stats = load_examples(path, tok, max_seq_len=512, skip_invalid=True)
    assert len(examples) == 2 and stats.skipped["invalid"] == 2 and [e.line for e in examples] == [1, 4]


def test_unknown_tool_is_an_error_with_its_line(tok, tmp_path):
    bad = json.loads(json.dumps(CONVERSATION))
    bad[1]["tool_calls"][0]["function"]["name"] = "launch_rockets"
    path = _write(tmp_path / "t.jsonl", [{"messages": CONVERSATION, "tools": TOOLS}, {"messages": bad, "tools": TOOLS}])
    with pytest.raises(DevstralError, match=r"t\.jsonl:2: .*unknown tool 'launch_rockets'"):
        load_examples(path, tok, max_seq_len=512)


def test_empty_data_and_no_assistant_tokens(tok, tmp_path):
    with pytest.raises(DevstralError, match="empty"):
        load_examples(_write(tmp_path / "e.jsonl", []), tok, max_seq_len=512)
    path = _write(tmp_path / "long.jsonl", [{"prompt": "word " * 50, "completion": "x"}])
    with pytest.raises(DevstralError, match="no example has assistant tokens"):
        load_examples(path, tok, max_seq_len=20)


def test_truncation_and_dropping_are_counted(tok, tmp_path):
    path = _write(tmp_path / "l.jsonl", [{"prompt": "q", "completion": "word " * 40}, {"prompt": "q", "completion": "ok"}])
    examples, stats = load_examples(path, tok, max_seq_len=16)
    assert stats.truncated == 1 and max(len(e.ids) for e in examples) == 16
    examples, stats = load_examples(path, tok, max_seq_len=16, truncate=False)
    assert len(examples) == 1 and stats.skipped["too long"] == 1


def test_epoch_order_is_seeded_per_epoch():
    assert epoch_order(50, 3, 0) == epoch_order(50, 3, 0)
    assert epoch_order(50, 3, 0) != epoch_order(50, 3, 1)
    assert sorted(epoch_order(50, 3, 1)) == list(range(50))


def test_packed_rows_equal_separate_sequences(tiny_hf, tok, tmp_path):
    """Block-diagonal masks + per-example positions: packed loss == sum of the examples' own losses."""
    from devstral.config import ModelConfig
    from devstral.loader import build_model
    from devstral.train.loss import summed_loss

    rows = [{"prompt": f"question {i}", "completion": "answer " * (i + 1)} for i in range(5)]
    examples, _ = load_examples(_write(tmp_path / "p.jsonl", rows), tok, max_seq_len=64)
    plan = BatchPlan(batch_size=2, max_seq_len=64, packing=True)
    batches = micro_batches(examples, plan, list(range(5)))
    assert sum(len(mb) for mb in batches) < 5  # fewer rows than examples: some rows hold several
    net = build_model(tiny_hf, ModelConfig.from_dir(tiny_hf), dtype=torch.float32, device=torch.device("cpu"))
    packed_total, packed_n = 0.0, 0
    for mb in batches:
        b = collate(examples, mb, plan)
        assert b.attn_mask is None and len(b.documents.lengths) >= len(mb)  # varlen: no [T, T] mask
        loss, n = summed_loss(net, b)
        packed_total, packed_n = packed_total + float(loss), packed_n + n
    single = BatchPlan(batch_size=1, max_seq_len=64)
    sep_total, sep_n = 0.0, 0
    for i in range(5):
        b = collate(examples, [[i]], single)
        assert b.documents.lengths == (b.tokens.shape[1],) and b.positions[0, 0] == 0
        loss, n = summed_loss(net, b)
        sep_total, sep_n = sep_total + float(loss), sep_n + n
    assert packed_n == sep_n
    assert abs(packed_total - sep_total) < 1e-3 * sep_total


def test_several_encoding_processes_give_the_examples_of_one(tok, tmp_path):
    # the worker pool splits the file into chunks; order, line numbers, errors and counts must not change
    rows = [{"prompt": f"question {i} " * (i % 7 + 1), "completion": f"answer {i}"} for i in range(40)]
    rows += [{"text": "def f():\n    return 1\n"}, {"messages": [{"role": "user", "content": "only a question"}]}]
    path = _write(tmp_path / "d.jsonl", rows)
    with path.open("a") as f:
        f.write("{not json\n")
    one, s1 = load_examples(path, tok, max_seq_len=24, skip_invalid=True, workers=1)
    three, s3 = load_examples(path, tok, max_seq_len=24, skip_invalid=True, workers=3)
    assert [(e.line, e.ids, e.labels) for e in one] == [(e.line, e.ids, e.labels) for e in three]
    assert s1 == s3, (s1, s3)
    assert s1.skipped["invalid"] == 2 and s1.truncated > 0
    with pytest.raises(DevstralError, match=rf"d\.jsonl:{len(rows)}: "):  # the first bad line, in file order
        load_examples(path, tok, max_seq_len=24, workers=3)
