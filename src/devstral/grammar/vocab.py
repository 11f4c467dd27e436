"""Our tokenizers as llguidance sees them: the bytes of every token id, and which ids are control tokens.

Built once per tokenizer (about 0.5 s for a 131k tekken vocabulary) and cached on it. Every kind of
tokenizer devstral loads is covered:
- tekken (mistral-common): mistral-common's own adapter (`mistral_common.guidance.tokenizer`);
- SentencePiece (mistral-common): `▁` is a space and `<0xNN>` pieces are single bytes;
- a GGUF's stored vocabulary: byte-level BPE strings (gpt2) or SentencePiece pieces (llama);
- tokenizer.json (Hugging Face): llguidance reads the file itself.

Control tokens are named `<...>` for llguidance (it recognises only that shape); grammars refer to
them by id (`<[9]>`), so the names matter only for llguidance's own messages.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from devstral.errors import DevstralError

_lock = threading.RLock()


def _cached(tokenizer: Any, attr: str, build):
    value = getattr(tokenizer, attr, None)
    if value is None:
        with _lock:
            value = getattr(tokenizer, attr, None)
            if value is None:
                value = build(tokenizer)
                setattr(tokenizer, attr, value)
    return value


def guidance_tokenizer(tokenizer: Any):
    """The llguidance LLTokenizer for one of our tokenizers (built on first use, then cached)."""
    return _cached(tokenizer, "_devstral_llg_tokenizer", _build)


def grammar_factory(tokenizer: Any):
    """mistral-common's GrammarFactory (its tool-call grammars) for a tekken >= v11 tokenizer, else None."""
    def build(tok: Any):
        from mistral_common.guidance.grammar_factory import GrammarFactory

        mistral = getattr(tok, "mistral", None)
        return GrammarFactory(mistral) if mistral is not None and GrammarFactory.is_supported(mistral) else False

    return _cached(tokenizer, "_devstral_grammar_factory", build) or None


def _build(tokenizer: Any):
    import llguidance as llg

    mistral = getattr(tokenizer, "mistral", None)
    if mistral is not None:
        factory = grammar_factory(tokenizer)
        if factory is not None:  # built with mistral-common's tekken adapter: share it
            return factory.llg_tokenizer
        raw = mistral.instruct_tokenizer.tokenizer
        from mistral_common.tokens.tokenizers.tekken import is_tekkenizer

        if is_tekkenizer(raw):
            from mistral_common.guidance.tokenizer import from_mistral_tokenizer

            return from_mistral_tokenizer(mistral)
        return llg.LLTokenizer(llg.TokenizerWrapper(_SentencePieceVocab(tokenizer, raw)))
    if hasattr(tokenizer, "tokens") and hasattr(tokenizer, "types"):  # formats/gguf_tokenizer.GGUFTokenizer
        return llg.LLTokenizer(llg.TokenizerWrapper(_GGUFVocab(tokenizer)))
    if hasattr(tokenizer, "_plain") and hasattr(tokenizer, "folder"):  # prompt/hf_tokenizer.HFTokenizer
        return llg.LLTokenizer(tokenizer._plain.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_id)
    raise DevstralError(f"structured output is not supported for tokenizers of type {type(tokenizer).__name__}")


class _Vocab:
    """What llguidance's TokenizerWrapper reads: eos/bos ids, the bytes of each id, the control ids,
    and a callable that tokenizes text (used for grammar literals)."""

    def __init__(self, tokenizer: Any, pieces: list[bytes], special: list[int]):
        self._tokenizer = tokenizer
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.special_token_ids = special
        names: set[bytes] = set()
        for i in special:  # llguidance wants control tokens as unique "<name>"
            name = re.sub(rb"^\[(.*)\]$", rb"<\1>", pieces[i])
            if not re.fullmatch(rb"<.*>", name, re.S) or name in names:
                name = b"<control_%d>" % i
            names.add(name)
            pieces[i] = name
        self.tokens = pieces

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


class _NoDummyPrefix:
    """SentencePiece encoders put a space in front of the text ("▁" + text). llguidance tokenizes
    pieces from the middle of the output (bytes a grammar forces), which must not gain that space:
    encode behind a sentinel character and drop the sentinel's ids (as mistral-common does for FIM)."""

    SENTINEL = "\u263a"

    def __init__(self, encode):
        self.encode = encode
        self.prefix = encode(self.SENTINEL)

    def __call__(self, text: str) -> list[int]:
        ids = self.encode(self.SENTINEL + text)
        if ids[:len(self.prefix)] == self.prefix:
            return ids[len(self.prefix):]
        return self.encode(text)


class _SentencePieceVocab(_Vocab):
    def __init__(self, tokenizer: Any, raw: Any):
        pieces, special = [], []
        for i in range(raw.n_words):
            piece = raw.id_to_piece(i)
            if raw.is_special(i) or i == raw._model.unk_id():
                special.append(i)
                pieces.append(piece.encode("utf-8"))
            else:
                pieces.append(_spm_piece_bytes(piece))
        super().__init__(tokenizer, pieces, special)
        self._encode = _NoDummyPrefix(lambda text: raw.encode(text, bos=False, eos=False))

    def __call__(self, text: str | bytes) -> list[int]:
        return self._encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)


class _GGUFVocab(_Vocab):
    def __init__(self, tokenizer: Any):
        from devstral.formats.gguf_tokenizer import (
            BYTE,
            CONTROL,
            UNKNOWN,
            UNUSED,
            USER_DEFINED,
            unicode_to_byte,
        )

        to_byte = unicode_to_byte()
        pieces, special = [], []
        for i, (tok, typ) in enumerate(zip(tokenizer.tokens, tokenizer.types, strict=True)):
            if typ in (CONTROL, UNKNOWN, UNUSED):
                special.append(i)
                pieces.append(tok.encode("utf-8"))
            elif typ == USER_DEFINED:
                pieces.append(tok.encode("utf-8"))
            elif tokenizer.model == "gpt2":
                pieces.append(bytes(to_byte.get(c, 0x3F) for c in tok))
            elif typ == BYTE:
                pieces.append(bytes([int(tok[3:5], 16)]))
            else:
                pieces.append(_spm_piece_bytes(tok))
        super().__init__(tokenizer, pieces, special)
        if tokenizer.model == "llama":
            self._encode = lambda text: tokenizer._encode_text_spm(text, False)  # no dummy prefix

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encode(text) if hasattr(self, "_encode") else self._tokenizer.encode(text)


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _spm_piece_bytes(piece: str) -> bytes:
    byte = _BYTE_PIECE.match(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")
