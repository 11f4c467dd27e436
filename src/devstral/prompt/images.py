"""Images in prompts: untrusted bytes -> a checked PIL image -> mistral-common's image tokens and pixels.

Decoding is ours, because it is where hostile input arrives: a size cap on the bytes, the formats
we accept (PNG, JPEG, WebP, GIF, BMP), a pixel cap read from the header before any pixel is decoded
(decompression bombs), and a full decode so a truncated file fails here and not in the model. What
follows is mistral-common's ImageEncoder: the resize rules and the [IMG] / [IMG_BREAK] / [IMG_END]
layout, so the ids equal mistral-common's.

A prompt with images is a `PromptIds`: the token ids (a list, so every text-only path takes it
unchanged) plus one `PromptImage` per image, saying where its tokens are and carrying its pixels and a
digest of them. The engine hashes the digests into its prefix-cache keys, so two images of the same
size (identical [IMG] ids) never share cached keys/values.

No network here: an http(s) URL is refused; the server's --allow-remote-images fetches it before the
request is encoded (server/remote_images.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devstral.errors import DevstralError

MAX_IMAGE_BYTES = 20 << 20  # per image, encoded
MAX_IMAGE_PIXELS = 40_000_000  # per image, decoded (a 8000 x 5000 screenshot); PIL's own bomb limit is 89M
MAX_IMAGES = 16  # per request
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+*-]+/[\w.+*-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


@dataclass
class PromptImage:
    """One image of a prompt: its tokens are ids[start:start + length]; `pixels` [C, H, W] float32
    is mistral-common's processed array; `digest` names its content."""

    start: int
    length: int
    pixels: np.ndarray
    digest: bytes
    image_token_offsets: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def num_embeddings(self) -> int:
        return len(self.image_token_offsets)


class PromptIds(list):
    """Token ids that carry the images their [IMG] tokens stand for (`.images`, in order)."""

    images: list[PromptImage]

    def __init__(self, ids=(), images: list[PromptImage] | None = None):
        super().__init__(ids)
        self.images = list(images or [])


TEXT_ONLY = "this model is text-only (it has no vision encoder)"


def why_no_images(tokenizer: Any) -> str:
    """Why a model whose tokenizer this is takes no images: the loader's reason (no projector beside a
    GGUF, a backend without images), else that it is text-only."""
    return getattr(tokenizer, "no_images_reason", None) or TEXT_ONLY


def images_of(ids: Any) -> list[PromptImage]:
    return list(getattr(ids, "images", None) or [])


def continue_prompt(before: list[int], turn: Any, drop: int = 0) -> list[int]:
    """`before` + `turn[drop:]`, its images (if any) moved to their new places."""
    from dataclasses import replace

    ids = [*before, *turn[drop:]]
    shift = len(before) - drop
    images = [replace(im, start=im.start + shift) for im in images_of(turn)]
    return PromptIds(ids, images) if images else ids


def keep_images(ids: Any) -> list[int]:
    """A copy of prompt ids that keeps their images (a plain list() would drop them)."""
    return PromptIds(ids, images_of(ids)) if images_of(ids) else list(ids)


# ---------------------------------------------------------------------------------------------------
# bytes -> checked image

def decode_image(data: bytes, where: str):
    """Checked PIL image from encoded bytes; one-line DevstralError naming `where` otherwise."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise DevstralError(f"{where}: image of {len(data) / (1 << 20):.1f} MiB is larger than the "
                            f"{MAX_IMAGE_BYTES >> 20} MiB limit")
    if not data:
        raise DevstralError(f"{where}: the image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise DevstralError(f"{where}: not an image in a supported format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError:  # PIL's own cap (2 x 89M pixels), far above ours
        raise DevstralError(f"{where}: image larger than the {MAX_IMAGE_PIXELS:,} pixel limit; scale it down") from None
    except (OSError, ValueError) as e:
        raise DevstralError(f"{where}: cannot read the image ({_one_line(e)})") from None
    w, h = image.size
    if w <= 0 or h <= 0:
        raise DevstralError(f"{where}: the image has no pixels ({w}x{h})")
    if w * h > MAX_IMAGE_PIXELS:
        raise DevstralError(f"{where}: image of {w}x{h} pixels is larger than the {MAX_IMAGE_PIXELS:,} pixel "
                            "limit; scale it down")
    try:
        image.load()  # decode every pixel now: a truncated or corrupt file fails here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DevstralError(f"{where}: corrupt or truncated image ({_one_line(e)})") from None
    return image


def decode_data_url(url: str, where: str):
    m = _DATA_URL.match(url)
    if m is None or not m.group("b64"):
        raise DevstralError(f"{where}: a data URL must be 'data:image/...;base64,<data>'")
    return decode_image(decode_base64(url[m.end():], where), where)


def decode_base64(text: str, where: str) -> bytes:
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 8:
        raise DevstralError(f"{where}: image larger than the {MAX_IMAGE_BYTES >> 20} MiB limit")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise DevstralError(f"{where}: the image data is not valid base64") from None


def image_from_url(url: Any, where: str):
    """An OpenAI image_url's url: data URLs only (remote URLs are fetched, if allowed, by the server)."""
    if not isinstance(url, str) or not url:
        raise DevstralError(f"{where}: image_url.url must be a non-empty string")
    if url.startswith("data:"):
        return decode_data_url(url, where)
    if url.split(":", 1)[0].lower() in ("http", "https"):
        raise DevstralError(f"{where}: remote image URLs are not fetched (no network use unless asked): send a "
                            "data: URL, or start the server with --allow-remote-images")
    raise DevstralError(f"{where}: unsupported image URL scheme (expected a data: URL)")


def image_from_file(path: str | Path, where: str | None = None):
    path = Path(path).expanduser()
    where = where or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except OSError as e:
        raise DevstralError(f"{where}: {e.strerror or e}") from None
    return decode_image(data, where)


def image_part(image) -> dict[str, Any]:
    """An OpenAI content part holding a checked image (re-encoded losslessly as a PNG data URL)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}


def file_part(path: str | Path) -> dict[str, Any]:
    """The content part for an image file (`devstral run --image`, `/image` in chat)."""
    return image_part(image_from_file(path))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__


# ---------------------------------------------------------------------------------------------------
# ids + mistral-common's pixels -> PromptIds

@dataclass(frozen=True)
class ImageTokens:
    img: int
    img_break: int
    img_end: int


def attach_images(ids: list[int], pixels: list[np.ndarray], tokens: ImageTokens) -> list[int]:
    """PromptIds for ids that hold len(pixels) images, each a run of [IMG]/[IMG_BREAK] ending in [IMG_END]."""
    if not pixels:
        return ids
    images, i, n = [], 0, len(ids)
    marks = {tokens.img, tokens.img_break, tokens.img_end}
    while i < n and len(images) < len(pixels):
        if ids[i] == tokens.img:
            start = i
            while i < n and ids[i] in marks and ids[i] != tokens.img_end:
                i += 1
            if i == n:
                break
            span = np.asarray(ids[start:i + 1])
            offsets = np.flatnonzero(span == tokens.img)
            array = np.ascontiguousarray(pixels[len(images)], dtype=np.float32)
            digest = hashlib.blake2b(np.asarray(array.shape, dtype=np.int64).tobytes() + array.tobytes(),
                                     digest_size=16).digest()
            images.append(PromptImage(start, i + 1 - start, array, digest, offsets))
        i += 1
    if len(images) != len(pixels):
        raise RuntimeError(f"found {len(images)} image token runs for {len(pixels)} images")
    return PromptIds(ids, images)


def take_from_cache(cache, images: list[PromptImage], capacity: int) -> list:
    """The cached entries of these images (keyed by digest, all present), in order; marks them most
    recently used and drops the least recently used beyond `capacity` (never one of these images)."""
    out = []
    for im in images:
        cache.move_to_end(im.digest)
        out.append(cache[im.digest])
    while len(cache) > max(capacity, len(images)):
        cache.popitem(last=False)
    return out
