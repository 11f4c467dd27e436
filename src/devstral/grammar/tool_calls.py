"""Grammars that make the model call the declared tools, in the model's own tool-call format.

Formats (as mistral-common encodes them, and as prompt/tool_calls.py parses them):
  v13+     [TOOL_CALLS]name[ARGS]{json}            one per call
  v11      [TOOL_CALLS]name[CALL_ID]id[ARGS]{json}  the id is optional (mistral-common writes it when known)
  pre-v11  [TOOL_CALLS][{"name": ..., "arguments": {json}, "id": ...}, ...]

Names are pinned to the declared tools and arguments to each tool's parameter schema; a forced call
(`required`, a named tool) comes first, with no text or [THINK] section before it. Keywords of a
tool's schema that llguidance does not implement are ignored (as OpenAI does for non-strict tools)
unless the tool says `strict: true`, in which case they are an error.

For tekken tokenizers of v11 and later, mistral-common's GrammarFactory renders the calls (its
`fcall` lark fragment); the top level (when text, thinking or a JSON answer may come instead) is
ours, `_TEMPLATE`, so that `tool_choice: "required"` means a call right away. Other tokenizers (GGUF,
tokenizer.json, SentencePiece, pre-v11) get the same template with calls rendered here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from devstral.grammar.constraint import GrammarError
from devstral.grammar.json_output import styled
from devstral.grammar.vocab import grammar_factory

TOOL_CALLS, ARGS, CALL_ID, THINK, END_THINK = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]"
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
CALL_ID_RULE = "call_id: {call_id} /[a-zA-Z0-9]{{9}}/"

# Rendered by jinja2 with mistral-common's variables: mode ("required" | "auto"), fcall (the calls),
# json_schema_str (a JSON answer allowed instead of calls), begin_think_token / end_think_token.
# "required" (and a JSON answer) start at once, without a [THINK] section: a weak or unlucky model
# that opened one could think until max_tokens and never call. Under "auto" the model may think.
_TEMPLATE = """\
{%- set think = "think? " if begin_think_token else "" -%}
{% if json_schema_str != None -%}
start: fcalls | SAFE_WS? %json {{ json_schema_str }}
{% elif mode == "required" -%}
start: fcalls
{% else -%}
start: {{ think }}content? fcalls | {{ think }}content
{% endif -%}
fcalls: {{ fcall }}
content: (/(.|\\n)+/)+
{% if begin_think_token -%}
think: {{ begin_think_token }} (/(.|\\n)+/)* {{ end_think_token }}
{% endif -%}
SAFE_WS: /[ \\t\\r\\n]{1,8}/
"""


def call_format(tokenizer: Any) -> str:
    """"v13", "v11" or "json_list": how this model writes tool calls."""
    if tokenizer.special_id(TOOL_CALLS) is None:
        raise GrammarError("tools: this model's vocabulary has no [TOOL_CALLS] token, so its tool calls "
                           "cannot be constrained")
    version = getattr(tokenizer, "version", "")
    number = re.match(r"v(\d+)", version or "")
    if (number and int(number.group(1)) < 11) or tokenizer.special_id(ARGS) is None:
        return "json_list"
    if number and int(number.group(1)) == 11 and tokenizer.special_id(CALL_ID) is not None:
        return "v11"
    return "v13"


def tool_call_grammar(tokenizer: Any, tools: list[dict[str, Any]], *, required: bool, parallel: bool,
                      json_schema: dict[str, Any] | None = None) -> str:
    """llguidance grammar JSON: calls of `tools` (OpenAI-shaped), forced (`required`) or after
    optional text; with `json_schema`, a JSON answer matching it is the alternative to calls."""
    import llguidance as llg

    if not tools:
        raise GrammarError("tools: constraining tool calls needs at least one tool")
    fmt = call_format(tokenizer)
    answer = styled(json_schema) if json_schema is not None else None
    factory = grammar_factory(tokenizer)
    if factory is not None:
        lark = _lark_from_mistral_common(factory, tokenizer, tools, fmt, required, parallel, answer)
    else:
        lark = _lark_of_our_own(tokenizer, tools, fmt, required, parallel, answer)
    return llg.LLMatcher.grammar_from_lark(lark)


def _arguments_schema(function: dict[str, Any]) -> dict[str, Any]:
    params = function.get("parameters") or NO_ARGUMENTS
    return styled(params, lenient=not function.get("strict"))


def _lark_from_mistral_common(factory, tokenizer, tools, fmt, required, parallel, answer) -> str:
    from mistral_common.protocol.instruct.tool_calls import Function, Tool, ToolChoiceEnum

    # strict=True makes mistral-common pin each call's name and arguments schema to the tool's own
    mistral_tools = [Tool(function=Function(name=t["function"]["name"],
                                            description=t["function"].get("description") or "",
                                            parameters=_arguments_schema(t["function"]), strict=True))
                     for t in tools]
    lark = factory.get_lark_from_jinja(template=_TEMPLATE, mode=ToolChoiceEnum.required if required
                                       else ToolChoiceEnum.auto, tools=mistral_tools, json_schema=answer,
                                       parallel_tool_calls=parallel, json_only=False, force_tool_names=True)
    if fmt == "v11":  # mistral-common renders v13's name[ARGS]; v11 may put [CALL_ID]id between them
        args = f"<[{tokenizer.special_id(ARGS)}]>"
        anchor = f"{args} SAFE_WS? %json"
        if lark.count(anchor) != len(tools):
            raise RuntimeError("mistral-common's tool-call grammar changed shape: cannot add v11 call ids")
        lark = lark.replace(anchor, f"call_id? {anchor}") + "\n" + CALL_ID_RULE.format(
            call_id=f"<[{tokenizer.special_id(CALL_ID)}]>") + "\n"
    return lark


def _lark_of_our_own(tokenizer, tools, fmt, required, parallel, answer) -> str:
    from jinja2 import Template

    def token(name: str) -> str:
        return f"<[{tokenizer.special_id(name)}]>"

    extra = ""
    if fmt == "json_list":
        fcall = f"{token(TOOL_CALLS)} SAFE_WS? %json {json.dumps(_call_list_schema(tools, parallel), ensure_ascii=False)}"
    else:
        call_id = ""
        if tokenizer.special_id(CALL_ID) is not None and (fmt == "v11" or tokenizer.version == "jinja"):
            call_id, extra = "call_id? ", CALL_ID_RULE.format(call_id=token(CALL_ID)) + "\n"
        parts = [f'{token(TOOL_CALLS)} SAFE_WS? "{t["function"]["name"]}" {call_id}{token(ARGS)} SAFE_WS? '
                 f'%json {json.dumps(_arguments_schema(t["function"]), ensure_ascii=False)} SAFE_WS?' for t in tools]
        one = " | ".join(f"({p})" for p in parts) if len(parts) > 1 else parts[0]
        fcall = f"({one})+" if parallel else one
    has_think = tokenizer.special_id(THINK) is not None and tokenizer.special_id(END_THINK) is not None
    lark = Template(_TEMPLATE).render(
        mode="required" if required else "auto", fcall=fcall,
        json_schema_str=json.dumps(answer, ensure_ascii=False) if answer is not None else None,
        begin_think_token=token(THINK) if has_think else None, end_think_token=token(END_THINK) if has_think else None)
    return lark + "\n" + extra


def _call_list_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The pre-v11 JSON list of calls: [{"name", "arguments", "id"?}, ...], one entry per allowed tool.

    Each tool's `$defs`/`definitions` move to the root under a per-tool prefix, since `$ref`s
    resolve against the root of the schema they sit in."""
    defs: dict[str, Any] = {}
    variants = []
    for k, tool in enumerate(tools):
        params = _hoist_definitions(_arguments_schema(tool["function"]), f"t{k}_", defs)
        variants.append({"type": "object", "properties": {
            "name": {"const": tool["function"]["name"]}, "arguments": params,
            "id": {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}},
            "required": ["name", "arguments"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": variants[0] if len(variants) == 1 else {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return styled(schema)


def _hoist_definitions(schema: dict[str, Any], prefix: str, into: dict[str, Any]) -> dict[str, Any]:
    schema = dict(schema)
    own: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        own.update(schema.pop(key, None) or {})
    if not own:
        return schema

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items()}
            ref = out.get("$ref")
            if isinstance(ref, str):
                out["$ref"] = re.sub(r"^#/(?:\$defs|definitions)/", f"#/$defs/{prefix}", ref)
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, sub in own.items():
        into[prefix + name] = rewrite(sub)
    return rewrite(schema)
