"""OpenAI-shaped messages + tools -> token ids, through mistral-common's own request encoding.

Serving (`encode_chat`) and training (`encode_for_training`) share one path: our checks (which name
the message index), then mistral-common's validator, normalizer and versioned instruct tokenizer.
Training only switches the validator to mistral-common's finetuning mode (the conversation ends
with the assistant turn to learn) and records which ids each normalized message produced.
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Any, Literal

from devstral.errors import DevstralError
from devstral.prompt import raw_arguments
from devstral.prompt.images import MAX_IMAGES, attach_images, image_from_file, image_from_url, why_no_images
from devstral.prompt.system_prompt import DEFAULT, with_system_prompt

TrainOn = Literal["assistant", "last-assistant"]

# The per-message encoders of mistral-common's instruct tokenizers, and the role each one encodes.
_MESSAGE_ENCODERS = {"encode_user_message": "user", "encode_assistant_message": "assistant",
                     "encode_tool_message": "tool", "encode_system_message": "system"}


def encode_chat(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
                system_prompt: str | None | object = DEFAULT) -> list[int]:
    """Exactly the ids the model sees for a chat request (the default system prompt included).

    `system_prompt`: DEFAULT uses the tokenizer's (SYSTEM_PROMPT.txt, placeholders filled); a string
    overrides it; None sends none. A system message in `messages` always wins.
    """
    ids, _ = _encode_segments(tokenizer, messages, tools, system_prompt, training=False)
    return ids


def encode_for_training(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                        *, train_on: TrainOn = "assistant", system_prompt: str | None | object = DEFAULT,
                        image_root: Path | None = None) -> tuple[list[int], list[bool]]:
    """Ids of a whole conversation plus a mask that is True exactly on the tokens to learn.

    The mask covers what each assistant turn emits: its content, its tool-call tokens and the EOS
    closing it (`train_on="last-assistant"`: the final assistant turn only). An assistant message with
    `"weight": 0` (OpenAI's fine-tuning format; the agent marks malformed replies so) stays in the
    context but is not learned. Everything else (BOS,
    system prompt, tool definitions, user turns, tool results) is False. The ids are the serving
    encoding of the same conversation, so a fine-tuned model sees at inference what it learned on.
    Images (user messages' image_url parts) are never learned; `image_root`: the folder that an
    image_url which is a local path (training data) is relative to. The ids are a PromptIds then.
    """
    if train_on not in ("assistant", "last-assistant"):
        raise DevstralError(f"train_on must be 'assistant' or 'last-assistant', not {train_on!r}")
    weights = _assistant_weights(messages)
    messages = [{k: v for k, v in m.items() if k != "weight"} if isinstance(m, dict) else m for m in messages]
    ids, segments = _encode_segments(tokenizer, messages, tools, system_prompt, training=True, image_root=image_root)
    turns = [i for i, (role, _) in enumerate(segments) if role == "assistant"]
    if len(turns) != len(weights):
        if 0 in weights:  # mistral-common merged turns: a per-turn weight no longer has one place
            raise DevstralError("cannot apply per-message weights: consecutive assistant messages were merged")
        weights = [1] * len(turns)
    learned = [i for i, w in zip(turns, weights, strict=True) if w]
    if train_on == "last-assistant":
        learned = learned[-1:]
    learned_set = set(learned)
    mask: list[bool] = []
    for i, (_, seg) in enumerate(segments):
        mask.extend([i in learned_set] * len(seg))
    return ids, mask


def _assistant_weights(messages: list[dict[str, Any]]) -> list[int]:
    """OpenAI fine-tuning's per-message `weight` (0: keep in context, don't learn; 1: learn)."""
    weights = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant":
            w = m.get("weight", 1)
            if w not in (0, 1) or isinstance(w, bool):
                raise DevstralError(f"messages[{i}].weight must be 0 or 1, got {w!r}")
            weights.append(int(w))
    return weights


def _encode_segments(tokenizer, messages, tools, system_prompt, *, training: bool, image_root: Path | None = None):
    """(ids, [(role, ids of that message)]) with "start" for the leading BOS; segments concatenate to ids."""
    from mistral_common.protocol.instruct.validator import ValidationMode, get_validator

    mistral = tokenizer.mistral
    version = mistral.instruct_tokenizer.tokenizer.version
    path = getattr(tokenizer, "path", None)
    messages = with_system_prompt(messages, tokenizer.default_system_prompt, system_prompt,
                                  name=path.parent.name if path is not None else "")
    request = prepare_request(messages, tools, version.value, continue_final=not training,
                              images_for=_image_gate(tokenizer), image_root=image_root)
    mode = ValidationMode.finetuning if training else ValidationMode.serving
    segments: list[tuple[str, list[int]]] = []
    instruct = _recording_copy(mistral.instruct_tokenizer, segments)
    raw_arguments.install(instruct)
    try:
        validated = get_validator(version, mode=mode).validate_request(request)
        normalized = mistral._instruct_request_normalizer.from_chat_completion_request(validated)
        tokenized = instruct.encode_instruct(normalized)
        ids = tokenized.tokens
    except DevstralError:
        raise
    except Exception as e:  # mistral-common's validation errors: ValueError/AssertionError/its own types
        raise DevstralError(f"invalid chat request: {_one_line(e)}") from None
    segments.insert(0, ("start", list(instruct.start())))
    if [t for _, seg in segments for t in seg] != ids:  # e.g. a future mistral-common that truncates
        raise RuntimeError("mistral-common's per-message encodings do not add up to its request encoding")
    if tokenized.images:
        ids = attach_images(ids, tokenized.images, tokenizer.image_tokens)
    return ids, segments


def _image_gate(tokenizer) -> str | None:
    """None when the tokenizer's model takes images, else why it does not (the error's reason)."""
    if getattr(tokenizer, "image_tokens", None) is not None:
        return None
    return why_no_images(tokenizer)


def _recording_copy(instruct, segments: list[tuple[str, list[int]]]):
    """A shallow copy of an instruct tokenizer whose per-message encoders log what they return.

    A copy, so that a tokenizer shared with a server thread is never patched.
    """
    clone = copy.copy(instruct)
    for method, role in _MESSAGE_ENCODERS.items():
        original = getattr(clone, method)

        def recorded(*args, _original=original, _role=role, **kwargs):
            out = _original(*args, **kwargs)
            tokens = out if isinstance(out, list) else out[0]
            segments.append((_role, list(tokens)))
            return out

        setattr(clone, method, recorded)
    return clone


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


# ---------------------------------------------------------------------------------------------------
# Request checks: mistral-common's own messages do not say which message is wrong, ours do.

_ROLES = ("system", "developer", "user", "assistant", "tool")
_MISTRAL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Versions whose validator demands 9-character alphanumeric call ids (v13+ do not encode ids at all).
_STRICT_ID_VERSIONS = ("v3", "v7", "v11")


def prepare_request(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, version: str, *,
                    continue_final: bool = False, images_for: str | None = "images are not supported here",
                    image_root: Path | None = None):
    """Check an OpenAI-shaped request and turn it into mistral-common's ChatCompletionRequest.

    `continue_final`: a last assistant message with text is a prefill that the answer continues
    (mistral-common's `prefix`: encoded without its closing EOS), as Mistral's API with
    `"prefix": true`, Ollama, llama.cpp and vLLM's `continue_final_message` do.

    Adjustments, each one what the model's format needs and nothing more:
    - call ids that are not 9 alphanumerics (OpenAI's "call_..." ids) are mapped, the same way in
      calls and results, to 9 alphanumerics for versions that encode or validate them (as vLLM does);
    - tool results without a "name" get the name of their call (v2/v3 encode it);
    - v2/v3 cannot hold content and tool calls in one turn: the tool calls are kept.

    `image_url` parts of user messages are decoded and checked here (prompt/images.py) and handed to
    mistral-common as images, so it never opens a URL itself; `images_for` is None when the model
    takes images, else the reason it does not (which a request with an image is refused with).
    `image_root` (training data only): image_url values that are local paths are read relative to it.
    """
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    if not isinstance(messages, list) or not messages:
        raise DevstralError("messages must be a non-empty list")
    checked_tools = check_tools(tools)
    strict_ids = version in _STRICT_ID_VERSIONS or version in ("v1", "v2")
    call_names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    images: dict[tuple[int, int], Any] = {}  # (message, part) -> checked PIL image
    for i, message in enumerate(messages):
        message = _check_message(i, message)
        images |= message_images(i, message, images_for, len(images), image_root=image_root)
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for j, call in enumerate(message["tool_calls"]):
                call = _check_call(i, j, call)
                if call.get("id") is not None and strict_ids:
                    call["id"] = mistral_call_id(str(call["id"]))
                if call.get("id") is not None:
                    call_names[call["id"]] = call["function"]["name"]
                calls.append(call)
            message["tool_calls"] = calls
            if version in ("v1", "v2", "v3") and message.get("content"):
                message["content"] = None
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise DevstralError(f"message {i}: a tool message needs a tool_call_id")
            if strict_ids:
                call_id = message["tool_call_id"] = mistral_call_id(call_id)
            if call_id not in call_names:
                raise DevstralError(f"message {i}: tool result for tool_call_id {message['tool_call_id']!r}, "
                                    "which no earlier assistant message called")
            message.setdefault("name", call_names[call_id])
        out.append(message)
    try:
        # serving-mode validation wants a model name; it is not part of the encoding
        request = ChatCompletionRequest.from_openai(out, tools=checked_tools, model="devstral")
    except Exception as e:  # pydantic ValidationError, ValueError
        raise DevstralError(f"invalid chat request: {_one_line(e)}") from None
    if continue_final and continued_prefix(out) is not None:
        request.messages[-1].prefix = True  # from_openai drops the field
    if images:
        _use_checked_images(request, images)
    return request


def message_images(i: int, message: dict[str, Any], images_for: str | None, seen: int, *,
                   image_root: Path | None = None) -> dict[tuple[int, int], Any]:
    """The checked images of message i's image_url parts; errors name the message and the part.
    `images_for` is None when the model takes images, else why it does not; `seen`: images before it;
    `image_root`: local paths (a fine-tuning JSONL's) are allowed, relative to this folder."""
    content = message.get("content")
    found = {}
    for k, part in enumerate(content if isinstance(content, list) else []):
        if not isinstance(part, dict) or part.get("type") not in ("image_url", "image"):
            continue
        where = f"message {i}: content part {k}"
        if part["type"] == "image":
            raise DevstralError(f"{where}: use OpenAI's 'image_url' parts for images")
        if images_for is not None:
            raise DevstralError(f"{where}: cannot take an image: {images_for}")
        if message.get("role") != "user":
            raise DevstralError(f"{where}: images are only accepted in user messages")
        if seen + len(found) >= MAX_IMAGES:
            raise DevstralError(f"{where}: more than {MAX_IMAGES} images in one request")
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if image_root is not None and isinstance(url, str) and url.split(":", 1)[0].lower() in ("http", "https"):
            raise DevstralError(f"{where}: remote image URLs are not fetched in training data (no network use): "
                                "download the image and give its path, relative to the JSONL file")
        found[(i, k)] = (image_from_local(url, image_root, where) if image_root is not None and _is_local(url)
                         else image_from_url(url, where))
    return found


def _is_local(url: Any) -> bool:
    return isinstance(url, str) and bool(url) and not url.startswith("data:") and \
        url.split(":", 1)[0].lower() not in ("http", "https")


def image_from_local(url: str, root: Path, where: str):
    """An image_url that names a file (absolute, or relative to `root`; `file://` allowed)."""
    path = Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()
    path = path if path.is_absolute() else root / path
    return image_from_file(path, f"{where}: {path}")


def _use_checked_images(request, images: dict[tuple[int, int], Any]) -> None:
    """Swap mistral-common's URL chunks for our checked images (ChatCompletionRequest keeps one message
    per input message, in order)."""
    from mistral_common.protocol.instruct.chunk import ImageChunk

    for (i, k), image in images.items():
        content = request.messages[i].content
        content[k] = ImageChunk(image=image)


def continued_prefix(messages: list[dict[str, Any]]) -> str | None:
    """The text of a last assistant message that generation continues (no tool calls), else None."""
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant" or last.get("tool_calls"):
        return None
    content = last.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) and content else None


def mistral_call_id(call_id: str) -> str:
    """A 9-alphanumeric id for `call_id`: itself when it already is one, else a stable stand-in.

    Like vLLM, keep the last 9 alphanumerics when there are enough (readable, and the same id
    comes back for the same call); shorter ids are hashed.
    """
    if _MISTRAL_ID.match(call_id) or call_id == "null":
        return call_id
    alnum = re.sub(r"[^a-zA-Z0-9]", "", call_id)
    if len(alnum) >= 9:
        return alnum[-9:]
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        digest, r = divmod(digest, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[r])
    return "".join(chars)


def _check_message(i: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise DevstralError(f"message {i}: must be an object with a 'role', not {type(message).__name__}")
    role = message.get("role")
    if role not in _ROLES:
        raise DevstralError(f"message {i}: unknown role {role!r} (expected system, user, assistant or tool)")
    message = dict(message)
    content = message.get("content")
    if role == "assistant":
        if not content and not message.get("tool_calls"):
            raise DevstralError(f"message {i}: an assistant message needs content or tool_calls")
        if message.get("tool_calls") is not None and not isinstance(message["tool_calls"], list):
            raise DevstralError(f"message {i}: tool_calls must be a list")
        return message
    if content is None or (isinstance(content, str | list) and not content and role != "tool"):
        raise DevstralError(f"message {i}: a {role} message needs content")
    if isinstance(content, list):
        for k, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise DevstralError(f"message {i}: content part {k} must be an object with a 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise DevstralError(f"message {i}: content part {k} of type 'text' needs a 'text' string")
    elif not isinstance(content, str):
        raise DevstralError(f"message {i}: content must be a string or a list of parts")
    return message


def _check_call(i: int, j: int, call: Any) -> dict[str, Any]:
    where = f"message {i}: tool_calls[{j}]"
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise DevstralError(f"{where} must be an object with a 'function'")
    function = dict(call["function"])
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise DevstralError(f"{where} has no function name")
    arguments = function.get("arguments", "{}")
    # A string that is not JSON (a call cut off by max_tokens, a malformed one) is what the model
    # wrote: it is kept and encoded as that text (prompt/raw_arguments.py), never refused.
    if not isinstance(arguments, str | dict):
        raise DevstralError(f"{where} ({function['name']}): arguments must be a JSON string or an object")
    return {**call, "function": function}


def check_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Tools in OpenAI's shape whose parameters are valid JSON Schema; errors name the tool."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise DevstralError("tools must be a list")
    from jsonschema import Draft202012Validator, SchemaError
    from jsonschema.validators import validator_for

    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        where = f"tools[{k}]" + (f" ({name})" if isinstance(name, str) else "")
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise DevstralError(f"{where}: expected {{'type': 'function', 'function': {{...}}}}")
        if not isinstance(name, str) or not re.match(r"^[a-zA-Z0-9_-]{1,64}$", name):
            raise DevstralError(f"{where}: function name must be 1-64 characters of a-z, A-Z, 0-9, _ or -")
        schema = function.get("parameters", {})
        if not isinstance(schema, dict):
            raise DevstralError(f"{where}: parameters must be a JSON Schema object")
        try:
            validator_for(schema, default=Draft202012Validator).check_schema(schema)
        except SchemaError as e:
            at = "/".join(str(p) for p in e.path) or "(root)"
            raise DevstralError(f"{where}: parameters are not a valid JSON Schema at {at}: {e.message}") from None
    return tools
