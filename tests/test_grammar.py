"""Structured-output grammars (llguidance) checked against references: mistral-common's own encoding
of tool calls, jsonschema validation of what the masks let through, mistral-common's byte pieces."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from devstral.formats.gguf_tokenizer import GGUFTokenizer
from devstral.formats.gguf_vocab import spm_vocab, tekken_vocab
from devstral.grammar.compile import compile_grammar
from devstral.grammar.constraint import GrammarConstraint, GrammarError, compute_mask
from devstral.grammar.json_output import json_grammar
from devstral.grammar.tool_calls import call_format, tool_call_grammar
from devstral.grammar.vocab import _GGUFVocab
from devstral.prompt.chat import encode_chat
from devstral.prompt.tokenizer import MistralCommonTokenizer
from devstral.testing import mistral_common_data, write_tekken

TOOLS = [
    {"type": "function", "function": {"name": "run", "parameters": {
        "type": "object", "properties": {"cmd": {"type": "string"}, "timeout": {"type": "integer"}},
        "required": ["cmd"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "read", "parameters": {"type": "object", "properties": {}}}},
]
CALLS = [{"id": "abc123XYZ", "type": "function", "function": {"name": "run", "arguments": '{"cmd": "ls -la"}'}},
         {"id": "def456UVW", "type": "function", "function": {"name": "read", "arguments": "{}"}}]
ASK = [{"role": "user", "content": "hi"}]
SPM_V3 = "mistral_instruct_tokenizer_240323.model.v3"
BOUNDED = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                                          "required": ["kind"], "additionalProperties": False}]}},
    "required": ["name", "age", "tags", "pet"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, MistralCommonTokenizer]:
    folder = tmp_path_factory.mktemp("grammar_tok")
    out = {}
    for version in ("v13", "v11", "v7"):
        write_tekken(folder / f"tekken_{version}.json", version=version)
        out[f"tekken_{version}"] = MistralCommonTokenizer(folder / f"tekken_{version}.json")
    out["spm_v3"] = MistralCommonTokenizer(mistral_common_data() / SPM_V3)
    return out


def assistant_ids(tok, calls) -> list[int]:
    """The ids mistral-common writes for an assistant turn of `calls` (without its EOS)."""
    prompt = encode_chat(tok, ASK, TOOLS, system_prompt=None)
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in calls]
    full = encode_chat(tok, [*ASK, {"role": "assistant", "content": None, "tool_calls": calls}, *results], TOOLS,
                       system_prompt=None)
    assert full[:len(prompt)] == prompt
    rest = full[len(prompt):]
    return rest[:rest.index(tok.eos_id)]


def accepts(compiled, ids: list[int]) -> bool:
    m = compiled.matcher.deep_copy()
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


@pytest.mark.parametrize(("name", "fmt"), [("tekken_v13", "v13"), ("tekken_v11", "v11"), ("tekken_v7", "json_list"),
                                           ("spm_v3", "json_list")])
def test_tool_call_grammar_accepts_mistral_commons_own_encoding(tokenizers, name, fmt):
    tok = tokenizers[name]
    assert call_format(tok) == fmt
    both = compile_grammar(tok, tool_call_grammar(tok, TOOLS, required=True, parallel=True), field="tools")
    assert accepts(both, assistant_ids(tok, CALLS))  # v11 with [CALL_ID]s, pre-v11 as a JSON list
    single = compile_grammar(tok, tool_call_grammar(tok, TOOLS, required=True, parallel=False), field="tools")
    assert accepts(single, assistant_ids(tok, CALLS[:1]))
    assert not accepts(single, assistant_ids(tok, CALLS))  # parallel_tool_calls=false: one call


@pytest.mark.parametrize("name", ["tekken_v13", "tekken_v11", "tekken_v7"])
def test_tool_calls_are_pinned_to_declared_names_and_argument_schemas(tokenizers, name):
    tok = tokenizers[name]
    compiled = compile_grammar(tok, tool_call_grammar(tok, TOOLS, required=True, parallel=True), field="tools")

    def call(fn: str, args: str) -> list[int]:
        return assistant_ids(tok, [{"id": "abc123XYZ", "type": "function", "function": {"name": fn, "arguments": args}}])

    assert accepts(compiled, call("run", '{"cmd": "pwd", "timeout": 5}'))
    assert not accepts(compiled, call("rm_everything", "{}"))  # not a declared tool
    assert not accepts(compiled, call("run", '{"cmd": 5}'))  # wrong type
    assert not accepts(compiled, call("run", '{"timeout": 5}'))  # "cmd" is required
    assert not accepts(compiled, call("run", '{"cmd": "a", "sudo": true}'))  # additionalProperties: false
    named = compile_grammar(tok, tool_call_grammar(tok, TOOLS[1:], required=True, parallel=True), field="tools")
    assert accepts(named, call("read", "{}")) and not accepts(named, call("run", '{"cmd": "pwd"}'))


def test_required_starts_with_a_call_and_auto_allows_text_first(tokenizers):
    tok = tokenizers["tekken_v13"]
    required = compile_grammar(tok, tool_call_grammar(tok, TOOLS, required=True, parallel=True), field="tools")
    first = set(required.first_mask.nonzero().flatten().tolist())
    assert first == {tok.special_id("[TOOL_CALLS]")}
    auto = compile_grammar(tok, tool_call_grammar(tok, TOOLS, required=False, parallel=True), field="tools")
    text = tok.encode("Let me look.")
    assert accepts(auto, text)  # text alone is an answer
    assert accepts(auto, text + assistant_ids(tok, CALLS))
    assert not accepts(required, text + assistant_ids(tok, CALLS))


def test_json_answer_or_calls_under_auto(tokenizers):
    tok = tokenizers["tekken_v13"]
    both = compile_grammar(tok, tool_call_grammar(tok, TOOLS, required=False, parallel=True, json_schema=BOUNDED),
                           field="tools")
    doc = {"name": "Rex", "age": 3, "tags": ["a"], "pet": {"kind": "dog"}}
    assert accepts(both, tok.encode(json.dumps(doc)))
    assert accepts(both, assistant_ids(tok, CALLS))
    assert not accepts(both, tok.encode("plain text"))


def walk(compiled, tok, seed: int, steps: int = 400) -> str | None:
    """Sample uniformly among the allowed tokens (a random model); the text if it ended, else None."""
    g = torch.Generator().manual_seed(seed)
    constraint, out = compiled.constraint(), []
    for _ in range(steps):
        allowed = constraint.allowed_tokens()
        token = int(torch.rand(allowed.shape[0], generator=g).masked_fill(~allowed, -1).argmax())
        if token == tok.eos_id:
            return tok.decode(out)
        constraint.accept(token)
        out.append(token)
        if constraint.is_finished():
            return tok.decode(out)
    return None


@pytest.mark.parametrize("name", ["tekken_v13", "spm_v3"])
def test_random_walks_under_a_json_schema_always_validate(tokenizers, name):
    tok = tokenizers[name]
    compiled = compile_grammar(tok, json_grammar(BOUNDED, field="response_format"), field="response_format")
    texts = [walk(compiled, tok, seed) for seed in range(12)]
    assert all(t is not None for t in texts)  # a bounded schema always ends
    for text in texts:
        jsonschema.validate(json.loads(text), BOUNDED)


def test_walked_tool_calls_parse_and_match_their_schemas(tokenizers):
    from devstral.prompt.tool_calls import parse_tool_calls

    tok = tokenizers["tekken_v13"]
    bounded = [{"type": "function", "function": {"name": "run", "parameters": {
        "type": "object", "properties": {"cmd": {"type": "string", "maxLength": 8}}, "required": ["cmd"],
        "additionalProperties": False}}}]
    compiled = compile_grammar(tok, tool_call_grammar(tok, bounded, required=True, parallel=False), field="tools")
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        constraint, out = compiled.constraint(), []
        while not constraint.is_finished():
            allowed = constraint.allowed_tokens()
            token = int(torch.rand(allowed.shape[0], generator=g).masked_fill(~allowed, -1).argmax())
            if token == tok.eos_id:
                break
            constraint.accept(token)
            out.append(token)
        content, calls = parse_tool_calls(tok.decode(out, special=True), "v13")
        (call,) = calls
        assert call["function"]["name"] == "run" and "malformed" not in call
        jsonschema.validate(json.loads(call["function"]["arguments"]), bounded[0]["function"]["parameters"])


def test_prefetched_masks_equal_masks_computed_in_place(tokenizers):
    tok = tokenizers["tekken_v13"]
    compiled = compile_grammar(tok, json_grammar(BOUNDED, field="f"), field="f")
    ids = tok.encode(json.dumps({"name": "Rex", "age": 3, "tags": ["a", "b"], "pet": None}))
    constraint, reference = compiled.constraint(), compiled.matcher.deep_copy()
    for token in ids:
        assert torch.equal(constraint.allowed_tokens(), compute_mask(reference, compiled.vocab_size))
        constraint.accept(token)
        assert reference.consume_token(token)
    assert constraint.is_finished() == reference.is_stopped()
    assert isinstance(constraint, GrammarConstraint)


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, ["'uniqueItems'"]),
    ({"if": {"type": "string"}, "then": {"maxLength": 2}}, ["'if'", "'then'"]),
    ({"type": "string", "pattern": "^(?=a)b$"}, ["look-around"]),
    ({"type": "string", "minLength": 5, "maxLength": 2}, ["minLength"]),
    ({"enum": []}, ["response_format"]),
])
def test_schemas_that_cannot_be_enforced_are_refused_by_name(tokenizers, schema, words):
    tok = tokenizers["tekken_v13"]
    with pytest.raises(GrammarError) as err:
        compile_grammar(tok, json_grammar(schema, field="response_format"), field="response_format")
    message = str(err.value)
    assert message.startswith("response_format: ") and "\n" not in message
    assert all(w in message for w in words), message


def test_tool_schemas_ignore_unsupported_keywords_unless_strict(tokenizers):
    tok = tokenizers["tekken_v13"]
    params = {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}
    loose = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    compile_grammar(tok, tool_call_grammar(tok, loose, required=True, parallel=True), field="tools")
    strict = [{"type": "function", "function": {"name": "f", "parameters": params, "strict": True}}]
    with pytest.raises(GrammarError, match="uniqueItems"):
        compile_grammar(tok, tool_call_grammar(tok, strict, required=True, parallel=True), field="tools")


def test_an_assistant_prefix_is_continued_or_refused(tokenizers):
    tok = tokenizers["tekken_v13"]
    grammar = json_grammar(BOUNDED, field="f")
    compiled = compile_grammar(tok, grammar, field="f", prefix_ids=tok.encode('{"name": "Rex", "age": '))
    allowed = compiled.first_mask.nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t])[0].isdigit() for t in allowed)
    with pytest.raises(GrammarError, match="continue"):
        compile_grammar(tok, grammar, field="f", prefix_ids=tok.encode("Sure! "))


@pytest.mark.parametrize("kind", ["tekken", "spm"])
def test_gguf_vocabulary_bytes_equal_mistral_commons_pieces(tmp_path, kind):
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    if kind == "tekken":
        path = tmp_path / "tekken.json"
        write_tekken(path, version="v13")
        vocab = tekken_vocab(path)
    else:
        path = mistral_common_data() / SPM_V3
        vocab = spm_vocab(path)
    md = {"tokenizer.ggml.model": vocab.model, "tokenizer.ggml.tokens": vocab.tokens,
          "tokenizer.ggml.token_type": vocab.token_types, "tokenizer.ggml.bos_token_id": vocab.bos_id,
          "tokenizer.ggml.eos_token_id": vocab.eos_id, "tokenizer.ggml.merges": vocab.merges,
          "tokenizer.ggml.pre": vocab.pre, "tokenizer.ggml.scores": vocab.scores}
    gguf = GGUFTokenizer({k: v for k, v in md.items() if v is not None}, source="test")
    raw = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    ours = _GGUFVocab(gguf)
    special = set(ours.special_token_ids)
    assert special == {i for i in range(raw.n_words) if raw.is_special(i)} | ({0} if kind == "spm" else set())
    for i in range(raw.n_words):
        if i in special:
            continue
        if kind == "tekken":
            expected = raw.id_to_byte_piece(i, SpecialTokenPolicy.RAISE)
        else:  # SentencePiece: the text of the piece, byte pieces as their byte
            piece = raw.id_to_piece(i)
            expected = bytes([int(piece[3:5], 16)]) if piece.startswith("<0x") else piece.replace("▁", " ").encode()
        assert ours.tokens[i] == expected, i
    # JSON under the GGUF vocabulary validates, and a tool-call grammar over it takes mistral-common's
    # encoding of a call
    compiled = compile_grammar(gguf, json_grammar(BOUNDED, field="f"), field="f")
    for seed in range(4):
        jsonschema.validate(json.loads(walk(compiled, gguf, seed)), BOUNDED)
    if kind == "tekken":
        mc = MistralCommonTokenizer(path)
        compiled = compile_grammar(gguf, tool_call_grammar(gguf, TOOLS, required=True, parallel=True), field="t")
        assert accepts(compiled, assistant_ids(mc, CALLS))


def test_a_tokenizer_without_tool_call_tokens_is_a_clear_error(tmp_path):
    path = tmp_path / "tekken.json"
    write_tekken(path, version="v13")
    tok = MistralCommonTokenizer(path)

    class NoToolTokens:
        version, eos_id, bos_id = "jinja", tok.eos_id, tok.bos_id

        def special_id(self, name: str):
            return None

    with pytest.raises(GrammarError, match=r"\[TOOL_CALLS\]"):
        tool_call_grammar(NoToolTokens(), TOOLS, required=True, parallel=True)



def test_objects_listing_their_properties_are_closed_and_nothing_else_changes():
    from devstral.grammar.json_output import closed_objects

    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"a": {"type": "string"}}},  # a field named "properties"
        "free": {"type": "object"},
        "open": {"type": "object", "properties": {"b": {}}, "additionalProperties": True},
        "c": {"const": {"properties": {"x": 1}}},
        "mixed": {"allOf": [{"properties": {"d": {"type": "integer"}}}, {"properties": {"e": {}}}]}},
        "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert set(closed["properties"]) == set(schema["properties"])  # no property was invented
    assert "additionalProperties" not in closed["properties"]["free"]  # no properties listed: any object
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["properties"]["c"] == schema["properties"]["c"]  # data, not a schema
    assert closed["properties"]["mixed"] == schema["properties"]["mixed"]  # allOf parts each list a part
    assert closed["$defs"]["Node"]["additionalProperties"] is False
    jsonschema.Draft202012Validator.check_schema(closed)
    ok = {"properties": {"a": "x"}, "free": {"anything": 1}, "open": {"b": 1, "extra": 2},
          "c": {"properties": {"x": 1}}, "mixed": {"d": 1, "e": 2}}
    jsonschema.validate(ok, closed)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**ok, "invented": 1}, closed)


def test_all_of_ands_the_masks_and_ends_with_the_grammar(tokenizers):
    from devstral.engine.constraints import all_of
    from devstral.engine.token_masks import banned_tokens

    tok = tokenizers["tekken_v13"]
    compiled = compile_grammar(tok, json_grammar({"enum": ["ab", "ac"]}, field="f"), field="f")
    quote_a = tok.encode('"a')
    banned = quote_a[:1]  # forbid the grammar's own first choice
    both = all_of(compiled.constraint, banned_tokens(tok.vocab_size, banned))()
    grammar_only = compiled.constraint()
    mask = both.allowed_tokens()
    assert torch.equal(mask, grammar_only.allowed_tokens() & ~torch.isin(torch.arange(mask.shape[0]),
                                                                          torch.tensor(banned)))
    factory = compiled.constraint
    assert all_of(None, factory) is factory and all_of(None, None) is None
    for token in tok.encode('"ab"'):
        assert not both.is_finished()
        both.accept(token)
    assert both.is_finished()


def test_tokenizer_json_vocabulary_takes_calls_and_json(tmp_path):
    """An HF tokenizer.json folder (llguidance reads the file itself) holding the tekken vocabulary."""
    from devstral.formats.gguf_chat import builtin_template
    from devstral.prompt.hf_tokenizer import HFTokenizer
    from test_prompt_jinja_tokenizers import write_tokenizer_json

    write_tekken(tmp_path / "tekken.json", version="v13")
    (tmp_path / "hf").mkdir()
    write_tokenizer_json(tmp_path / "tekken.json", tmp_path / "hf", builtin_template("v13"))
    hf = HFTokenizer(tmp_path / "hf")
    compiled = compile_grammar(hf, tool_call_grammar(hf, TOOLS, required=True, parallel=True), field="t")
    assert accepts(compiled, assistant_ids(MistralCommonTokenizer(tmp_path / "tekken.json"), CALLS))
    compiled = compile_grammar(hf, json_grammar(BOUNDED, field="f"), field="f")
    for seed in range(3):
        jsonschema.validate(json.loads(walk(compiled, hf, seed)), BOUNDED)
