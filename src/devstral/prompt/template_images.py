"""Images through a jinja chat template (a GGUF's or tokenizer.json's): llama.cpp's media-marker way, with
mistral-common's image encoding.

A chat template only writes text, and templates differ in what they do with an image part (ours drop
it, Mistral's write "[IMG]"). So, as llama.cpp's server does with its media marker, each image_url
part becomes a text part holding a marker before the template runs; the template places it like any
text, and ChatTemplate.encode swaps it for the image's ids. Those ids and pixels come from
mistral-common's ImageEncoder (its resize rules and [IMG]/[IMG_BREAK]/[IMG_END] layout), so a GGUF
model sees an image exactly as the same model's tekken.json would lay it out, and the text on either
side is encoded as its own run, as mistral-common encodes the chunks around an image.

The marker holds a random nonce and private-use characters: text a user typed cannot be taken for it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from devstral.errors import DevstralError
from devstral.prompt.images import ImageTokens, attach_images


@dataclass
class TemplateImages:
    """The image encoder a template tokenizer uses once the model's vision encoder is loaded."""

    encoder: Any  # mistral_common's ImageEncoder
    tokens: ImageTokens

    @classmethod
    def for_vision(cls, vision, special_id, source: str) -> TemplateImages:
        """From a VisionConfig and the vocabulary's `special_id(token) -> id | None`."""
        from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs

        ids = [special_id(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")]
        if None in ids:
            raise DevstralError(f"{source}: the vocabulary lacks the [IMG]/[IMG_BREAK]/[IMG_END] tokens that "
                                "images need")
        if ids[0] != vision.image_token_id:
            raise DevstralError(f"{vision.source}: image token {vision.image_token_id} is not the vocabulary's "
                                f"[IMG] id {ids[0]}")
        config = ImageConfig(vision.patch_size, vision.image_size, vision.spatial_merge_size)
        return cls(ImageEncoder(config, SpecialImageIDs(*ids)), ImageTokens(*ids))


def _with_markers(messages: list[dict[str, Any]], images: TemplateImages | None, refusal: str | None):
    """(messages with each image_url part swapped for a marker text part, {marker: the image's ids},
    the images' pixels in order). `refusal`: why this model takes no images (an image part is then a
    one-line error naming it), None when `images` is set."""
    from mistral_common.protocol.instruct.chunk import ImageChunk

    from devstral.prompt.chat import message_images

    nonce = secrets.token_hex(6)
    out, media, pixels = [], {}, []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            out.append(message)
            continue
        found = message_images(i, message, None if images is not None else refusal, len(pixels))
        if not found:
            out.append(message)
            continue
        parts = list(message["content"])
        for (_, k), image in found.items():
            encoded = images.encoder(ImageChunk(image=image))
            marker = f"\ue002{nonce}:{len(pixels)}\ue003"
            media[marker] = list(encoded.tokens)
            pixels.append(encoded.image)
            parts[k] = {"type": "text", "text": marker}
        out.append({**message, "content": parts})
    return out, media, pixels


def encode_with_images(encode_template, messages: list[dict[str, Any]], images: TemplateImages | None,
                       refusal: str | None) -> list[int]:
    """`encode_template(messages, media)` -> ids, with the messages' image_url parts as markers and the
    ids as PromptIds carrying the images."""
    out, media, pixels = _with_markers(messages, images, refusal)
    ids = encode_template(out, media or None)
    return attach_images(ids, pixels, images.tokens) if pixels else ids


def render_with_images(render_template, messages: list[dict[str, Any]], images: TemplateImages | None,
                       refusal: str | None, image_text) -> str:
    """The prompt text `render_template(messages)` writes, each image part shown as the tokens the model
    sees for it (`image_text(ids)`: "[IMG][IMG]...[IMG_BREAK]...[IMG_END]"), where the template put it."""
    out, media, _ = _with_markers(messages, images, refusal)
    text = render_template(out)
    for marker, ids in media.items():
        if text.count(marker) != 1:
            raise DevstralError("the chat template does not write each image part where the message has it; it "
                                "cannot be used with images")
        text = text.replace(marker, image_text(ids))
    return text
