"""Fill-in-the-middle: the code before and after the cursor -> the ids a Mistral code model completes.

Mistral's FIM layout (mistral-common's `encode_fim`, what Codestral and Devstral were trained on)
puts the suffix first and ends on the prefix, so the model's continuation *is* the middle:

    BOS [SUFFIX] suffix [PREFIX] prefix        -> the model writes the missing middle

([MIDDLE] exists in the vocabulary but Mistral's encoders never emit it.) A mistral-common
tokenizer encodes through mistral-common itself; a GGUF or tokenizer.json one builds the same ids
from its own [SUFFIX]/[PREFIX] control tokens. Text is always encoded as text: a "[PREFIX]" typed
in the code stays characters, never a control token.

`infill_ids` adds what editor plugins send to llama.cpp's /infill: other files as extra context
(plain text before the prefix, as llama.cpp does for models without repo-level FIM tokens) and a
token budget that keeps the code nearest the cursor when everything does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from devstral.errors import DevstralError

SUFFIX, PREFIX = "[SUFFIX]", "[PREFIX]"
# mistral-common's trick for encoding a suffix without the leading space a SentencePiece
# tokenizer would add: encode this character in front, then drop its tokens.
_LEAD = "☺"


def supports_fim(tokenizer) -> bool:
    """Whether the vocabulary has the FIM control tokens (every Mistral tokenizer since v2 does)."""
    return tokenizer.special_id(SUFFIX) is not None and tokenizer.special_id(PREFIX) is not None


def _check(tokenizer) -> None:
    if not supports_fim(tokenizer):
        raise DevstralError("this model's tokenizer has no [PREFIX]/[SUFFIX] tokens: it cannot fill in the middle")


def encode_fim(tokenizer, prefix: str, suffix: str | None = None) -> list[int]:
    """Exactly mistral-common's `encode_fim(FIMRequest(prompt=prefix, suffix=suffix))` ids."""
    _check(tokenizer)
    mistral = getattr(tokenizer, "mistral", None)
    if mistral is not None:  # a mistral-common tokenizer: its own request encoding
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.fim.request import FIMRequest

        try:
            return list(mistral.encode_fim(FIMRequest(prompt=prefix, suffix=suffix or None)).tokens)
        except MistralCommonException as e:
            raise DevstralError(f"fill-in-the-middle: {e}") from None
    return [tokenizer.bos_id, tokenizer.special_id(SUFFIX), *_suffix_ids(tokenizer, suffix or ""),
            tokenizer.special_id(PREFIX), *tokenizer.encode(prefix)]


def _suffix_ids(tokenizer, suffix: str) -> list[int]:
    """The suffix's ids as mistral-common makes them: `encode(LEAD + suffix)` without LEAD's tokens."""
    if not suffix:
        return []
    lead = tokenizer.encode(_LEAD)
    ids = tokenizer.encode(_LEAD + suffix)
    if ids[:len(lead)] == lead:
        return ids[len(lead):]
    return tokenizer.encode(suffix)  # LEAD merged with the suffix's first bytes: plain encoding


@dataclass
class InfillPrompt:
    ids: list[int]
    truncated: bool  # parts far from the cursor were cut to fit the budget
    n_prefix: int  # prefix tokens kept (extra context + prefix + prompt)
    n_suffix: int


def extra_context(files: list[tuple[str, str]]) -> str:
    """Other files as plain text before the prefix: a header line with the file name, then its text."""
    parts = []
    for name, text in files:
        body = text if text.endswith("\n") or not text else text + "\n"
        parts.append(f"{name}\n{body}" if name else body)
    return "\n".join(parts) + ("\n" if parts else "")


def infill_ids(tokenizer, prefix: str, suffix: str, *, extra: list[tuple[str, str]] | None = None,
               budget: int | None = None) -> InfillPrompt:
    """llama.cpp's /infill prompt in Mistral's FIM layout.

    Extra files come first in the prefix, so they are the first thing dropped when the prompt is
    over `budget` tokens. The suffix keeps its start (nearest the cursor) and at least a quarter
    of the budget if it needs it; the prefix keeps its end.
    """
    _check(tokenizer)
    text_before = extra_context(extra or []) + prefix
    ids = encode_fim(tokenizer, text_before, suffix)
    prefix_id = tokenizer.special_id(PREFIX)
    split = len(ids) - 1 - ids[::-1].index(prefix_id)  # the [PREFIX] that the encoder placed
    head, suffix_ids, prefix_ids = ids[:2], ids[2:split], ids[split + 1:]
    if budget is None or len(ids) <= budget:
        return InfillPrompt(ids, False, len(prefix_ids), len(suffix_ids))
    room = budget - len(head) - 1
    if room < 1:
        raise DevstralError(f"the context is too small for a fill-in-the-middle prompt ({budget} tokens)")
    keep_suffix = min(len(suffix_ids), max(room // 4, room - len(prefix_ids)))
    keep_prefix = min(len(prefix_ids), room - keep_suffix)
    kept = [*head, *suffix_ids[:keep_suffix], prefix_id, *prefix_ids[len(prefix_ids) - keep_prefix:]]
    return InfillPrompt(kept, True, keep_prefix, keep_suffix)
