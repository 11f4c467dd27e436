"""JSON output grammars: `response_format` json_object / json_schema, Ollama's `format`.

JSON is written the way Mistral models write tool arguments (Python's `json.dumps` defaults: ", "
and ": " between items, no other whitespace). Besides matching the models' training, a fixed layout
keeps a weak or unlucky model from emitting whitespace forever inside an otherwise valid object. A
schema may override this with llguidance's own "x-guidance" options.
"""

from __future__ import annotations

from typing import Any

from devstral.grammar.constraint import GrammarError

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def styled(schema: dict[str, Any], *, lenient: bool = False) -> dict[str, Any]:
    """`schema` carrying our JSON layout (and, with `lenient`, llguidance's permission to ignore the
    keywords it does not implement) in "x-guidance"; the schema's own options win."""
    own = schema.get("x-guidance") if isinstance(schema.get("x-guidance"), dict) else {}
    return {**schema, "x-guidance": {**JSON_STYLE, "lenient": lenient, **own}}


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
