"""JSON output grammars: `response_format` json_object / json_schema, Ollama's `format`.

Objects that list their properties get no others (`closed_objects`). JSON is written the way Mistral
models write tool arguments (Python's `json.dumps` defaults: ", " and ": " between items, no other
whitespace). Besides matching the models' training, a fixed layout keeps a weak or unlucky model
from emitting whitespace forever inside an otherwise valid object. A schema may override this with
llguidance's own "x-guidance" options.
"""

from __future__ import annotations

from typing import Any

from devstral.grammar.constraint import GrammarError

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def styled(schema: dict[str, Any], *, lenient: bool = False) -> dict[str, Any]:
    """`schema` closed (`closed_objects`) and carrying our JSON layout (and, with `lenient`,
    llguidance's permission to ignore the keywords it does not implement) in "x-guidance"; the
    schema's own options win."""
    own = schema.get("x-guidance") if isinstance(schema.get("x-guidance"), dict) else {}
    return {**closed_objects(schema), "x-guidance": {**JSON_STYLE, "lenient": lenient, **own}}


_VALUES = {"enum", "const", "default", "examples", "x-guidance"}  # data, not subschemas
_NAMED_SCHEMAS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
# An object with these says something about other properties, or may get more from elsewhere.
_OPENED_BY = {"additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref",
              "dependentSchemas", "if"}


def closed_objects(schema: Any, *, inside_all_of: bool = False) -> Any:
    """Objects that list their `properties` and say nothing about others get no others.

    JSON Schema allows extra properties by default; structured output does not (OpenAI's strict
    mode requires `additionalProperties: false`, and llama.cpp's and xgrammar's converters close
    objects the same way): a client that sends a pydantic model's schema wants those fields, and a
    model left free to invent keys can write them forever. Objects combined with others (`allOf`,
    `$ref`, ...) and the branches of an `allOf` stay open: each lists only part of the properties."""
    if isinstance(schema, list):
        return [closed_objects(s, inside_all_of=inside_all_of) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _VALUES:
            out[key] = value
        elif key in _NAMED_SCHEMAS and isinstance(value, dict):
            out[key] = {name: closed_objects(sub) for name, sub in value.items()}
        else:
            out[key] = closed_objects(value, inside_all_of=key == "allOf")
    if (isinstance(schema.get("properties"), dict) and not inside_all_of
            and not _OPENED_BY & schema.keys()):
        out["additionalProperties"] = False
    return out


def json_grammar(schema: dict[str, Any] | None, *, field: str) -> str:
    """llguidance grammar JSON for a document matching `schema` (None: any JSON object)."""
    import llguidance as llg

    if schema is None:
        schema = ANY_OBJECT
    if not isinstance(schema, dict):
        raise GrammarError(f"{field}: a JSON Schema must be an object, got {type(schema).__name__}")
    try:
        return llg.LLMatcher.grammar_from_json_schema(styled(schema))
    except ValueError as e:
        raise GrammarError(f"{field}: {' '.join(str(e).split())}") from None
