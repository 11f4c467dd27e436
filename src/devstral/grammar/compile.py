"""Grammar text -> a checked, compiled grammar that makes one TokenConstraint per sequence.

Compiling checks everything that can be known before generation, so that a server answers 400
instead of starting a generation that cannot succeed: llguidance's own grammar errors (an
unsupported JSON Schema keyword, a regex it cannot compile, an unsatisfiable schema), then the first
mask (a grammar that allows no token at all), then an assistant prefix that the grammar must accept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from devstral.grammar.constraint import GrammarConstraint, GrammarError, compute_mask, short_error
from devstral.grammar.vocab import guidance_tokenizer

_UNIMPLEMENTED = re.compile(r"Unimplemented keys: (\[[^\]]*\])")


@dataclass
class CompiledGrammar:
    matcher: Any  # llguidance.LLMatcher at the start state (after any prefix); copied per sequence
    vocab_size: int
    first_mask: torch.Tensor

    def constraint(self) -> GrammarConstraint:
        """A fresh constraint at the start state: the `SamplingParams.constraint` factory."""
        return GrammarConstraint(self.matcher.deep_copy(), self.vocab_size, self.first_mask)


def compile_grammar(tokenizer: Any, grammar: str, *, field: str, prefix_ids: list[int] | None = None) -> CompiledGrammar:
    """`grammar`: llguidance's grammar JSON (from `llguidance.LLMatcher.grammar_from_*`). `field`
    names the request field the grammar came from, for error messages. `prefix_ids`: tokens already
    written (an assistant prefill) that the output continues."""
    import llguidance as llg

    tok = guidance_tokenizer(tokenizer)
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tok)
    if failed:
        raise GrammarError(f"{field}: {describe_error(messages[0] if messages else 'invalid grammar')}")
    matcher = llg.LLMatcher(tok, grammar, log_level=0)
    if matcher.is_error():
        raise GrammarError(f"{field}: {describe_error(matcher.get_error())}")
    if prefix_ids:
        taken = matcher.try_consume_tokens(list(prefix_ids))
        if taken != len(prefix_ids) or matcher.is_error():
            raise GrammarError(f"{field}: the assistant message to continue does not match it "
                               f"(rejected at its token {taken + 1} of {len(prefix_ids)})")
    try:
        first = compute_mask(matcher, tok.vocab_size)
    except GrammarError:
        raise GrammarError(f"{field}: no output can satisfy it (no token is allowed at the start)") from None
    return CompiledGrammar(matcher, tok.vocab_size, first)


def describe_error(message: str) -> str:
    """llguidance's error as one line, naming the JSON Schema keywords it does not implement."""
    text = short_error(message)
    unimplemented = _UNIMPLEMENTED.search(text)
    if unimplemented:
        try:
            keys = json.loads(unimplemented.group(1))
        except ValueError:
            keys = []
        if keys:
            names = ", ".join(repr(k) for k in keys)
            return (f"unsupported JSON Schema keyword{'s' if len(keys) > 1 else ''} {names}: structured output "
                    "cannot enforce it (remove it from the schema)")
    return re.sub(r"^(?:Error:\s*)+", "", text) or "invalid grammar"
