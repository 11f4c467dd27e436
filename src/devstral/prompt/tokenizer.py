"""Tokenizers behind one protocol: mistral-common's (tekken, SPM), the one stored in a GGUF
(formats/gguf_tokenizer.py) and an HF tokenizer.json (prompt/hf_tokenizer.py).

Everything that turns text into ids, or ids into text, goes through a `Tokenizer`. Chat encoding is
`encode_chat`, which for mistral-common tokenizers is mistral-common's own request encoding
(prompt/chat.py) and for the other two renders the model's jinja chat template
(prompt/jinja_template.py) with user-typed control strings kept as text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from devstral.config import read_text
from devstral.errors import DevstralError


@runtime_checkable
class Tokenizer(Protocol):
    version: str  # mistral-common version ("v3", "v7", "v11", "v13", ...) or "jinja"
    bos_id: int
    eos_id: int
    vocab_size: int
    default_system_prompt: str | None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Plain text to ids. Control-token strings typed by a user stay plain text."""
        ...

    def decode(self, ids: Sequence[int], *, special: bool = False) -> str:
        """Ids to text; `special=True` renders control tokens such as [TOOL_CALLS] as their strings."""
        ...

    def is_special(self, token_id: int) -> bool: ...

    def special_id(self, token: str) -> int | None:
        """The id of a control token such as "[TOOL_CALLS]", or None when the vocabulary lacks it."""
        ...

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """OpenAI-shaped messages and tools to exactly the ids the model sees."""
        ...


_SPM_FILE = re.compile(r"^tokenizer\.model(\.v\d+m?\d*)?$")


def find_tokenizer_file(folder: Path) -> Path | None:
    """tekken.json first (what Devstral ships), then versioned SPM files, newest first."""
    tekken = sorted(folder.glob("tekken*.json"))
    if tekken:
        return tekken[0]
    spm = sorted((p for p in folder.iterdir() if _SPM_FILE.match(p.name)), key=lambda p: p.name, reverse=True)
    return spm[0] if spm else None


class MistralCommonTokenizer:
    """A mistral-common tokenizer (tekken or SentencePiece) read from a model folder."""

    def __init__(self, path: Path, *, default_system_prompt: str | None = None):
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

        try:
            self.mistral = MistralTokenizer.from_file(str(path))
        except Exception as e:  # mistral-common raises a mix of ValueError/AssertionError/JSON errors
            raise DevstralError(f"{path}: cannot load tokenizer: {e}") from None
        self.path = Path(path)
        self.raw = self.mistral.instruct_tokenizer.tokenizer
        self.version = self.raw.version.value
        self.bos_id, self.eos_id, self.vocab_size = self.raw.bos_id, self.raw.eos_id, self.raw.n_words
        self.default_system_prompt = default_system_prompt
        self._keep, self._ignore = SpecialTokenPolicy.KEEP, SpecialTokenPolicy.IGNORE
        self._sentencepiece = isinstance(self.raw, SentencePieceTokenizer)
        # Set by enable_images() once the model's vision encoder is loaded; until then images are refused.
        self.image_tokens = None
        self.no_images_reason: str | None = None

    def enable_images(self, vision) -> None:
        """Encode images for a model with this vision encoder (model/vision_config.VisionConfig), with
        mistral-common's ImageEncoder: the tokenizer file's image section when it has one (it must agree
        with the encoder's patch and merge sizes), else one made from the encoder's config."""
        from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs

        from devstral.prompt.images import ImageTokens

        instruct = self.mistral.instruct_tokenizer
        if not hasattr(instruct, "image_encoder"):
            raise DevstralError(f"{self.path}: tokenizer {self.version} cannot encode images")
        encoder = instruct.image_encoder
        if encoder is not None:
            ic = encoder.image_config
            if (ic.image_patch_size, ic.spatial_merge_size) != (vision.patch_size, vision.spatial_merge_size):
                raise DevstralError(f"{self.path}: image section (patch {ic.image_patch_size}, merge "
                                    f"{ic.spatial_merge_size}) disagrees with the vision encoder's {vision.source} "
                                    f"(patch {vision.patch_size}, merge {vision.spatial_merge_size})")
        else:
            ids = [self.special_id(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")]
            if None in ids:
                raise DevstralError(f"{self.path}: the vocabulary lacks the [IMG]/[IMG_BREAK]/[IMG_END] tokens "
                                    "that images need")
            encoder = ImageEncoder(ImageConfig(vision.patch_size, vision.image_size, vision.spatial_merge_size),
                                   SpecialImageIDs(*ids))
            instruct.image_encoder = encoder
        s = encoder.special_ids
        if s.img != vision.image_token_id:
            raise DevstralError(f"{vision.source}: image_token_index {vision.image_token_id} is not the tokenizer's "
                                f"[IMG] id {s.img}")
        self.image_tokens = ImageTokens(s.img, s.img_break, s.img_end)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self.raw.encode(text, bos=bos, eos=eos)

    def decode(self, ids: Sequence[int], *, special: bool = False) -> str:
        ids = list(ids)
        if not special or not self._sentencepiece:
            return self.raw.decode(ids, special_token_policy=self._keep if special else self._ignore)
        # mistral-common's KEEP policy renders a SentencePiece model's *text* as raw pieces too ("▁Hello",
        # "<0x0A>"). Keep only the control tokens as strings; decode each run of text between them the
        # way mistral-common decodes text (which is also how it encoded it: one segment at a time).
        parts: list[str] = []
        run: list[int] = []
        for token in ids:
            if self.raw.is_special(token):
                if run:
                    parts.append(self.raw.decode(run, special_token_policy=self._ignore))
                    run = []
                parts.append(self.raw.id_to_piece(token))
            else:
                run.append(token)
        if run:
            parts.append(self.raw.decode(run, special_token_policy=self._ignore))
        return "".join(parts)

    def is_special(self, token_id: int) -> bool:
        return self.raw.is_special(token_id)

    def special_id(self, token: str) -> int | None:
        try:
            return self.raw.get_special_token(token)
        except Exception:
            return None

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    **kw: Any) -> list[int]:
        """kw: `system_prompt` (a string overrides SYSTEM_PROMPT.txt, None disables it)."""
        from devstral.prompt.chat import encode_chat

        return encode_chat(self, messages, tools, **kw)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A model's tokenizer without its weights, from a model folder or a .gguf file.

    A .gguf file, or a folder of GGUF models without safetensors (the rule devstral.load follows),
    gives the GGUF's own tokenizer. A folder otherwise gives mistral-common's (tekken.json or
    tokenizer.model.v*), else the Hugging Face one (tokenizer.json + tokenizer_config.json).
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise DevstralError(f"{path}: not a model folder or .gguf file")
        from devstral.formats.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not path.is_dir():
        raise DevstralError(f"{path}: no such file or folder")
    if any(path.glob("*.gguf")) and not any(path.glob("*.safetensors")):
        from devstral.formats.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    system = path / "SYSTEM_PROMPT.txt"
    default_system = read_text(system) if system.is_file() else None
    found = find_tokenizer_file(path)
    if found is not None:
        return MistralCommonTokenizer(found, default_system_prompt=default_system)
    if (path / "tokenizer.json").is_file():
        from devstral.prompt.hf_tokenizer import HFTokenizer

        return HFTokenizer(path, default_system_prompt=default_system)
    raise DevstralError(f"{path}: no tokenizer found (expected tekken.json, tokenizer.model.v*, tokenizer.json "
                        "or a .gguf file)")
