"""The tokenizer stored in a GGUF file, tokenizing as llama.cpp does.

Two vocabularies occur in Devstral GGUFs:
- `gpt2` (byte-level BPE with merges; what a tekken vocabulary becomes). Pre-tokenization uses the
  regex of `tokenizer.ggml.pre`, and, like llama.cpp's tekken mode, a pre-token that is itself in
  the vocabulary is taken whole before any merge ("ignore merges"). The BPE itself runs in the
  `tokenizers` library.
- `llama` (SentencePiece with scores): llama.cpp's algorithm, reimplemented here: merge the adjacent
  pair whose concatenation is the highest-scoring token, then fall back to <0xXX> byte tokens.

Control-token strings in plain text stay text (`encode`); `encode_special` turns them into their ids,
as llama.cpp's `parse_special` does. Chat goes through prompt/jinja_template.ChatTemplate, which gives
`encode_special` only the control tokens the template itself wrote: one typed by a user stays text.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from devstral.errors import DevstralError
from devstral.prompt.jinja_template import ChatTemplate
from devstral.prompt.system_prompt import DEFAULT, with_system_prompt

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes by `tokenizer.ggml.pre` name.
PRE_TOKENIZER_PATTERNS = {
    "tekken": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
              r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "default": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}
_IGNORE_MERGES = {"tekken"}


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the strings a gpt2 GGUF vocab uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def bytes_to_token_text(raw: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in raw)


class GGUFTokenizer:
    """Implements devstral.prompt.tokenizer.Tokenizer for a GGUF's stored vocabulary."""

    version = "jinja"

    def __init__(self, md: dict[str, Any], *, source: str):
        self.source = source
        self.model = md.get("tokenizer.ggml.model")
        tokens = md.get("tokenizer.ggml.tokens")
        if self.model not in ("gpt2", "llama"):
            raise DevstralError(f"{source}: unsupported tokenizer.ggml.model {self.model!r} (expected gpt2 or llama)")
        if not isinstance(tokens, list) or not tokens:
            raise DevstralError(f"{source}: tokenizer.ggml.tokens is missing or empty")
        self.tokens: list[str] = tokens
        self.vocab_size = len(tokens)
        types = md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise DevstralError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for "
                                f"{len(tokens)} tokens")
        self.types: list[int] = types
        self.bos_id = int(md.get("tokenizer.ggml.bos_token_id", 1))
        self.eos_id = int(md.get("tokenizer.ggml.eos_token_id", 2))
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", True))
        self.chat_template: str | None = md.get("tokenizer.chat_template")
        self.default_system_prompt: str | None = None
        self._template: ChatTemplate | None = None
        # Set by enable_images() once a vision projector (mmproj) is loaded; until then images are refused.
        self.images = None
        self.no_images_reason: str | None = None
        self._special_ids = {t: i for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)}
        specials = sorted(self._special_ids, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        if self.model == "gpt2":
            self._init_bpe(md)
        else:
            self._init_spm(md)

    # ------------------------------------------------------------------ BPE (gpt2)
    def _init_bpe(self, md: dict[str, Any]) -> None:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        pre = md.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZER_PATTERNS:
            raise DevstralError(f"{self.source}: unsupported tokenizer.ggml.pre {pre!r} "
                                f"(supported: {', '.join(PRE_TOKENIZER_PATTERNS)})")
        merges = md.get("tokenizer.ggml.merges")
        if not isinstance(merges, list):
            raise DevstralError(f"{self.source}: a gpt2 tokenizer needs tokenizer.ggml.merges")
        vocab: dict[str, int] = {}
        for i, (tok, typ) in enumerate(zip(self.tokens, self.types, strict=True)):
            if typ not in (CONTROL, USER_DEFINED, UNUSED) and tok not in vocab:
                vocab[tok] = i
        pairs = []
        for n, m in enumerate(merges):
            left, sep, right = m.partition(" ")
            if not sep:
                raise DevstralError(f"{self.source}: tokenizer.ggml.merges[{n}] {m!r} is not 'left right'")
            pairs.append((left, right))
        try:
            bpe = models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES)
        except Exception as e:
            raise DevstralError(f"{self.source}: invalid BPE vocabulary: {e}") from None
        tk = Tokenizer(bpe)
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERNS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tk.decoder = decoders.ByteLevel()
        self._bpe = tk

    def _encode_text_bpe(self, text: str) -> list[int]:
        return self._bpe.encode(text, add_special_tokens=False).ids if text else []

    # ------------------------------------------------------------------ SentencePiece (llama)
    def _init_spm(self, md: dict[str, Any]) -> None:
        scores = md.get("tokenizer.ggml.scores") or [0.0] * len(self.tokens)
        if len(scores) != len(self.tokens):
            raise DevstralError(f"{self.source}: tokenizer.ggml.scores has {len(scores)} entries for "
                                f"{len(self.tokens)} tokens")
        self._scores = scores
        self._piece_id: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            self._piece_id.setdefault(t, i)
        self._byte_id = {}
        for i, (t, typ) in enumerate(zip(self.tokens, self.types, strict=True)):
            if typ == BYTE and len(t) == 6 and t.startswith("<0x"):
                self._byte_id[int(t[3:5], 16)] = i
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
        self.unk_id = int(md.get("tokenizer.ggml.unknown_token_id", 0))

    def _encode_text_spm(self, text: str, prefix_space: bool) -> list[int]:
        if not text:
            return []
        text = (" " + text if prefix_space and self.add_space_prefix else text).replace(" ", "\u2581")
        symbols = list(text)
        n = len(symbols)
        prev, nxt = list(range(-1, n - 1)), list(range(1, n + 1))
        alive = [True] * n
        history: dict[str, tuple[str, str]] = {}
        heap: list[tuple[float, int, int, str, str]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right >= n:
                return
            merged = symbols[left] + symbols[right]
            tid = self._piece_id.get(merged)
            if tid is None:
                return
            heapq.heappush(heap, (-self._scores[tid], left, right, symbols[left], symbols[right]))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, ltext, rtext = heapq.heappop(heap)
            # stale entry: one side has changed since this pair was queued
            if not (alive[left] and alive[right] and symbols[left] == ltext and symbols[right] == rtext
                    and nxt[left] == right):
                continue
            history[ltext + rtext] = (ltext, rtext)
            symbols[left] = ltext + rtext
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] < n:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        out: list[int] = []
        i = 0
        while i < n:
            self._resegment(symbols[i], history, out)
            i = nxt[i]
        return out

    def _resegment(self, piece: str, history: dict[str, tuple[str, str]], out: list[int]) -> None:
        tid = self._piece_id.get(piece)
        if tid is not None:
            out.append(tid)
            return
        if piece in history:
            left, right = history[piece]
            self._resegment(left, history, out)
            self._resegment(right, history, out)
            return
        for b in piece.encode("utf-8"):
            out.append(self._byte_id.get(b, self.unk_id))

    # ------------------------------------------------------------------ protocol
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode_text_bpe(text) if self.model == "gpt2" else self._encode_text_spm(text, True)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_special(self, text: str) -> list[int]:
        """Text in which control-token strings ("[INST]", "<s>") become their ids, as llama.cpp's
        tokenizer does with parse_special."""
        if self._special_re is None:
            return self.encode(text)
        out: list[int] = []
        prev_special = True
        for k, chunk in enumerate(self._special_re.split(text)):
            if k % 2:
                out.append(self._special_ids[chunk])
                prev_special = True
            elif chunk:
                out += (self._encode_text_bpe(chunk) if self.model == "gpt2"
                        else self._encode_text_spm(chunk, prev_special))
                prev_special = False
        return out

    def decode(self, ids: Sequence[int], *, special: bool = False) -> str:
        buf = bytearray()
        to_byte = unicode_to_byte()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise DevstralError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            typ, tok = self.types[i], self.tokens[i]
            if typ in (CONTROL, UNKNOWN, UNUSED):
                if special:
                    buf += tok.encode("utf-8")
                continue
            if self.model == "gpt2":
                if typ == USER_DEFINED:
                    buf += tok.encode("utf-8")
                else:
                    buf += bytes(to_byte.get(c, 0x3F) for c in tok)
            elif typ == BYTE:
                buf += bytes([int(tok[3:5], 16)])
            else:
                buf += tok.replace("\u2581", " ").encode("utf-8")
        text = buf.decode("utf-8", errors="replace")
        if self.model == "llama" and self.add_space_prefix and text.startswith(" ") and ids and \
                self.types[ids[0]] == NORMAL:
            text = text[1:]
        return text

    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and self.types[token_id] in (CONTROL, UNKNOWN, UNUSED)

    def special_id(self, token: str) -> int | None:
        return self._special_ids.get(token)

    # ------------------------------------------------------------------ chat
    def template(self) -> ChatTemplate:
        """The GGUF's `tokenizer.chat_template`, compiled once; every control token of the vocabulary
        is one the template may write and a user may not."""
        if self._template is None:
            if not self.chat_template:
                raise DevstralError(f"{self.source}: the GGUF has no tokenizer.chat_template")
            self._template = ChatTemplate(self.chat_template, bos_token=self.tokens[self.bos_id],
                                          eos_token=self.tokens[self.eos_id], control_tokens=tuple(self._special_ids),
                                          parse_tool_arguments=True)
        return self._template

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
                    add_generation_prompt: bool = True) -> str:
        """The prompt text the template writes; an image part is shown as the image tokens the model sees
        (refused, in one line, when the model takes no images)."""
        from devstral.prompt.images import why_no_images
        from devstral.prompt.template_images import render_with_images

        def render(ms):
            return self.template().render(ms, tools, add_generation_prompt=add_generation_prompt)

        return render_with_images(render, messages, self.images, why_no_images(self),
                                  lambda ids: self.decode(ids, special=True))

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
                    system_prompt: str | None | object = DEFAULT) -> list[int]:
        """`system_prompt`: DEFAULT uses `default_system_prompt`, a string overrides it, None sends none;
        a system message in `messages` always wins. A BOS is added when the GGUF asks for one
        (tokenizer.ggml.add_bos_token) and the template did not write it."""
        from devstral.prompt.images import why_no_images
        from devstral.prompt.template_images import encode_with_images

        messages = with_system_prompt(messages, self.default_system_prompt, system_prompt)
        bos = self.bos_id if self.add_bos else None
        return encode_with_images(
            lambda ms, media: self.template().encode(self._encode_piece, ms, tools, bos_id=bos, media=media),
            messages, self.images, why_no_images(self))

    # ------------------------------------------------------------------ images
    def enable_images(self, vision) -> None:
        """Encode images for this vision encoder (a VisionConfig, from an mmproj GGUF): each image_url
        part through mistral-common's ImageEncoder, placed where the chat template writes the part."""
        from devstral.prompt.template_images import TemplateImages

        self.images = TemplateImages.for_vision(vision, self.special_id, self.source)

    @property
    def image_tokens(self):
        return self.images.tokens if self.images is not None else None

    def _encode_piece(self, text: str, parse_special: bool) -> list[int]:
        return self.encode_special(text) if parse_special else self.encode(text)


def load_gguf_tokenizer(path: str | Path) -> GGUFTokenizer:
    """The tokenizer of a .gguf file (or of the one model in a folder), read from its header alone:
    no tensor data is touched, however large the model."""
    from devstral.formats.gguf_read import parse_header, resolve_gguf_path

    first = resolve_gguf_path(Path(path))
    return GGUFTokenizer(parse_header(first).metadata, source=str(first))
