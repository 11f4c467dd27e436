"""A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) behind the Tokenizer protocol.

For models that ship no tekken.json or SentencePiece file. Text is tokenized by the `tokenizers`
library; chat goes through the folder's jinja chat template (prompt/jinja_template.ChatTemplate), as
transformers' apply_chat_template does: no BOS is added beyond what the template writes.

Plain `encode` keeps special-token strings as text (`encode_special_tokens`), so "[INST]" typed by a
user is never the control token; the template's own control tokens are parsed as special.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devstral.config import read_json, read_text
from devstral.errors import DevstralError
from devstral.prompt.jinja_template import ChatTemplate
from devstral.prompt.system_prompt import DEFAULT, with_system_prompt


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Named chat templates: chat_template.jinja (newer transformers) first, then tokenizer_config.json's
    `chat_template` (a string, or a list of {"name", "template"})."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return {"default": read_text(jinja_file)}
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        out = {}
        for n, item in enumerate(value):
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise DevstralError(f"{folder / 'tokenizer_config.json'}: chat_template[{n}] needs 'name' and "
                                    "'template' strings")
            out[item["name"]] = item["template"]
        return out
    return {}


class HFTokenizer:
    """Implements devstral.prompt.tokenizer.Tokenizer for tokenizer.json + tokenizer_config.json."""

    version = "jinja"

    def __init__(self, folder: Path, *, default_system_prompt: str | None = None):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.images = None  # set by enable_images() once a vision encoder is loaded
        self.no_images_reason: str | None = None
        tok_file, config_file = self.folder / "tokenizer.json", self.folder / "tokenizer_config.json"
        try:
            raw = tok_file.read_text(encoding="utf-8")
            self._special_parsing = Tokenizer.from_str(raw)
            self._plain = Tokenizer.from_str(raw)  # a second copy: the flag is per object, not per call
        except OSError as e:
            raise DevstralError(f"{tok_file}: {e.strerror}") from None
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise DevstralError(f"{tok_file}: cannot load tokenizer: {e}") from None
        self._plain.encode_special_tokens = True
        config: dict[str, Any] = {}
        if config_file.is_file():
            config = read_json(config_file)
            if not isinstance(config, dict):
                raise DevstralError(f"{config_file}: expected a JSON object")
        added = self._special_parsing.get_added_tokens_decoder()
        self._special_ids = {t.content: i for i, t in added.items() if t.special}
        self._special_set = frozenset(self._special_ids.values())
        self.vocab_size = self._special_parsing.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        self.bos_id = self._id_of(self.bos_token, "bos_token", config_file, required=False)
        self.eos_id = self._id_of(self.eos_token, "eos_token", config_file, required=True)
        self.default_system_prompt = default_system_prompt
        self._templates = {name: ChatTemplate(source, bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                              control_tokens=tuple(self._special_ids), parse_tool_arguments=True)
                           for name, source in read_chat_templates(self.folder, config).items()}

    def _id_of(self, token: str | None, field: str, config_file: Path, *, required: bool) -> int:
        """-1 stands for "no such token" where a model may lack one (BOS)."""
        if token is None:
            if required:
                raise DevstralError(f"{config_file}: {field} is missing")
            return -1
        tid = self._special_parsing.token_to_id(token)
        if tid is None:
            raise DevstralError(f"{config_file}: {field} {token!r} is not in tokenizer.json")
        return tid

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._plain.encode(text, add_special_tokens=False).ids if text else []
        return ([self.bos_id] if bos and self.bos_id >= 0 else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int], *, special: bool = False) -> str:
        ids = list(ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise DevstralError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._special_parsing.decode(ids, skip_special_tokens=not special)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_set

    def special_id(self, token: str) -> int | None:
        return self._special_ids.get(token)

    def template(self, tools: list[dict[str, Any]] | None = None) -> ChatTemplate:
        """The default template, or "tool_use" when tools are given and the folder has one (as transformers)."""
        if tools and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if len(self._templates) == 1:
            return next(iter(self._templates.values()))
        raise DevstralError(f"{self.folder}: no chat template (tokenizer_config.json has no 'chat_template' and "
                            "there is no chat_template.jinja)")

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
                    add_generation_prompt: bool = True) -> str:
        """The prompt text the template writes; an image part is shown as the image tokens the model sees
        (refused, in one line, when the model takes no images)."""
        from devstral.prompt.images import why_no_images
        from devstral.prompt.template_images import render_with_images

        def render(ms):
            return self.template(tools).render(ms, tools, add_generation_prompt=add_generation_prompt)

        return render_with_images(render, messages, self.images, why_no_images(self),
                                  lambda ids: self.decode(ids, special=True))

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
                    system_prompt: str | None | object = DEFAULT) -> list[int]:
        """`system_prompt`: DEFAULT uses `default_system_prompt`, a string overrides it, None sends none;
        a system message in `messages` always wins."""
        from devstral.prompt.images import why_no_images
        from devstral.prompt.template_images import encode_with_images

        messages = with_system_prompt(messages, self.default_system_prompt, system_prompt, name=self.folder.name)
        return encode_with_images(lambda ms, media: self.template(tools).encode(self._encode_piece, ms, tools,
                                                                                media=media),
                                  messages, self.images, why_no_images(self))

    def enable_images(self, vision) -> None:
        """Encode images for this vision encoder (a VisionConfig): each image_url part through
        mistral-common's ImageEncoder, placed where the chat template writes the part."""
        from devstral.prompt.template_images import TemplateImages

        self.images = TemplateImages.for_vision(vision, self.special_id, str(self.folder))

    @property
    def image_tokens(self):
        return self.images.tokens if self.images is not None else None

    def _encode_piece(self, text: str, parse_special: bool) -> list[int]:
        tk = self._special_parsing if parse_special else self._plain
        return tk.encode(text, add_special_tokens=False).ids
