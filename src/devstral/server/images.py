"""Images in server requests: the checks that name the request field, Ollama's base64 `images`, and the
one place the server fetches an image from the network (only with --allow-remote-images).

Decoding and the limits themselves are prompt/images.py's. Images are decoded here, so an error names
the field as the client sent it (the prompt encoder's message indices count an added system prompt),
and again by the prompt encoder: cheap next to the vision encoder, and one path for every caller.
"""

from __future__ import annotations

import base64
from typing import Any

from devstral.errors import DevstralError
from devstral.prompt.images import (
    MAX_IMAGE_BYTES,
    MAX_IMAGES,
    decode_base64,
    decode_image,
    image_from_url,
    why_no_images,
)
from devstral.server.errors import APIError

_REMOTE = ("http://", "https://")
FETCH_TIMEOUT_S = 15.0


def takes_images(llm: Any) -> bool:
    return getattr(llm, "vision", None) is not None


def check_content_parts(messages: list[dict[str, Any]], llm: Any, *, allow_remote: bool) -> bool:
    """400 for parts we do not take: unknown types, images for a text-only model, remote URLs without
    the flag. Returns whether any part is a remote URL to fetch."""
    remote, count = False, 0
    for i, message in enumerate(messages):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"messages.{i}.content.{j}"
            if kind == "text":
                continue
            if kind != "image_url":
                raise APIError(400, f"{where}: {kind!r} parts are not supported (text and image_url are)",
                               param=where)
            count += 1
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            remote = _check_url(url, where, llm, allow_remote=allow_remote, count=count) or remote
    return remote


def _check_url(url: Any, where: str, llm: Any, *, allow_remote: bool, count: int) -> bool:
    """400 naming `where` for an image this server does not take (the `count`th of the request);
    whether it is a remote URL to fetch. A data URL is decoded here, so the error names the field as the
    client sent it."""
    if not takes_images(llm):
        raise APIError(400, f"{where}: {why_no_images(getattr(llm, 'tokenizer', None))}", param=where)
    if count > MAX_IMAGES:
        raise APIError(400, f"{where}: more than {MAX_IMAGES} images in one request", param=where)
    if isinstance(url, str) and url.lower().startswith(_REMOTE):
        if not allow_remote:
            raise APIError(400, f"{where}: remote image URLs are off (fetching is network use): send a "
                                "data: URL, or start the server with --allow-remote-images", param=where)
        return True
    try:
        image_from_url(url, where)
    except DevstralError as e:
        raise APIError(400, str(e), param=where) from None
    return False


def image_url_checker(llm: Any, *, allow_remote: bool):
    """For an API that names its fields its own way (the Responses API's `input.I.content.J`): a function
    (url, where) -> the URL to put in an image_url part, checked as check_content_parts checks a chat
    request's, a remote one (with --allow-remote-images) fetched into a data URL. Call it off the event loop."""
    import httpx

    count = 0

    def check(url: Any, where: str) -> str:
        nonlocal count
        count += 1
        if not _check_url(url, where, llm, allow_remote=allow_remote, count=count):
            return url
        try:
            data = _fetch(httpx, url)
        except (httpx.HTTPError, ValueError) as e:
            raise APIError(400, f"{where}: cannot fetch the image: {' '.join(str(e).split())[:160]}",
                           param=where) from None
        return "data:image/*;base64," + base64.b64encode(data).decode()

    return check


def fetch_remote_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every http(s) image URL replaced by a data URL of what it points to. Runs off the
    event loop; a failed fetch is a 400 naming the part."""
    import httpx

    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            url = part.get("image_url") if part.get("type") == "image_url" else None
            url = url.get("url") if isinstance(url, dict) else url
            if isinstance(url, str) and url.lower().startswith(_REMOTE):
                where = f"messages.{i}.content.{j}"
                try:
                    data = _fetch(httpx, url)
                except (httpx.HTTPError, ValueError) as e:
                    raise APIError(400, f"{where}: cannot fetch the image: {' '.join(str(e).split())[:160]}",
                                   param=where) from None
                part = {"type": "image_url", "image_url": {"url": "data:image/*;base64," + base64.b64encode(data).decode()}}
            parts.append(part)
        out.append({**message, "content": parts})
    return out


def _fetch(httpx, url: str) -> bytes:
    with httpx.stream("GET", url, timeout=FETCH_TIMEOUT_S, follow_redirects=True) as r:
        r.raise_for_status()
        data = bytearray()
        for chunk in r.iter_bytes():
            data += chunk
            if len(data) > MAX_IMAGE_BYTES:
                raise ValueError(f"larger than the {MAX_IMAGE_BYTES >> 20} MiB limit")
    return bytes(data)


def ollama_image_parts(images: list[str] | None, llm: Any, where: str) -> list[dict[str, Any]]:
    """Ollama's base64 `images` as OpenAI image_url parts, each checked here so an error names it."""
    if not images:
        return []
    if not takes_images(llm):
        raise APIError(400, f"{where}: {why_no_images(getattr(llm, 'tokenizer', None))}", param=where)
    if len(images) > MAX_IMAGES:
        raise APIError(400, f"{where}: more than {MAX_IMAGES} images in one request", param=where)
    parts = []
    for k, text in enumerate(images):
        at = f"{where}.{k}"
        if not isinstance(text, str):
            raise APIError(400, f"{at}: an image must be a base64 string", param=at)
        payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
        try:
            decode_image(decode_base64(payload, at), at)
        except DevstralError as e:
            raise APIError(400, str(e), param=at) from None
        parts.append({"type": "image_url", "image_url": {"url": "data:image/*;base64," + "".join(payload.split())}})
    return parts
