"""Training JSONL -> token ids with labels (-100 everywhere except what the assistant emits).

Accepted line shapes:
- `{"messages": [...], "tools": [...]}`: OpenAI-shaped chat, as `devstral agent` writes trajectories;
- `{"prompt": "...", "completion": "..."}`: one user turn and one assistant turn;
- `{"text": "..."}`: raw text (BOS + text + EOS), every token learned.
Chat shapes go through `prompt.chat.encode_for_training`, the same encoder serving uses. User
messages may hold OpenAI `image_url` parts: data URLs, or paths of image files relative to the JSONL
file (for a model with a vision encoder); an example then carries its images (prompt/images.PromptImage:
where its [IMG] tokens are, mistral-common's pixels), which are never learned.
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstral.errors import DevstralError
from devstral.prompt.images import PromptImage, images_of

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    line: int
    images: list[PromptImage] = field(default_factory=list)  # where [IMG] embeddings go (start in ids)

    @property
    def n_labels(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class DataStats:
    lines: int = 0
    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    truncated: int = 0

    def summary(self) -> str:
        parts = [f"{self.examples} examples", f"{self.tokens} tokens", f"{self.label_tokens} trained tokens"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        parts += [f"{n} skipped ({reason})" for reason, n in sorted(self.skipped.items())]
        return ", ".join(parts)


def _tool_names(tools: Any) -> set[str]:
    names = set()
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


def _check_tool_calls(messages: list[Any], tools: Any) -> None:
    known = _tool_names(tools)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        for j, call in enumerate(m.get("tool_calls") or []):
            fn = call.get("function") if isinstance(call, dict) else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if isinstance(name, str) and name not in known:
                have = ", ".join(sorted(known)) or "none"
                raise DevstralError(f"message {i}: tool_calls[{j}] calls unknown tool {name!r} "
                                    f"(tools given: {have})")


def encode_record(record: Any, tokenizer, *, train_on: str = "assistant",
                  image_root: Path | None = None) -> tuple[list[int], list[int]]:
    """One parsed JSON line -> (ids, labels); the ids are a PromptIds when the line has images (paths
    relative to `image_root`). Raises DevstralError describing what is wrong."""
    from devstral.prompt.chat import encode_for_training

    if not isinstance(record, dict):
        raise DevstralError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages, tools = record["messages"], record.get("tools")
        if not isinstance(messages, list) or not messages:
            raise DevstralError("'messages' must be a non-empty list")
        _check_tool_calls(messages, tools)
        ids, mask = encode_for_training(tokenizer, messages, tools or None, train_on=train_on, image_root=image_root)
        if images_of(ids):
            return ids, [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    elif "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise DevstralError("'prompt' and 'completion' must both be strings, completion non-empty")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        ids, mask = encode_for_training(tokenizer, messages, None, train_on=train_on)
    elif "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise DevstralError("'text' must be a non-empty string")
        ids = tokenizer.encode(text, bos=True, eos=True)
        mask = [False] + [True] * (len(ids) - 1)  # the BOS is given, never predicted
    else:
        raise DevstralError("expected 'messages', 'prompt'/'completion' or 'text'")
    return list(ids), [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]


def _parse_line(raw: bytes, *, first: bool) -> Any:
    """One JSONL line (bytes) -> its JSON value; DevstralError naming the column otherwise."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")  # a BOM may start the file
    except UnicodeDecodeError as e:
        raise DevstralError(f"not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DevstralError(f"invalid JSON at column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DevstralError("invalid JSON: nested too deeply") from None


# Files larger than this are encoded by several processes: tokenizing is the slow part of loading a
# pretraining-sized file (about 0.5M tokens/s per core), and lines are independent.
PARALLEL_BYTES = 16 << 20
_TOKENIZER = None  # the parent's tokenizer, inherited by forked workers
_IMAGE_ROOT: Path | None = None  # the JSONL file's folder: image paths are relative to it


def _encode_lines(lines: list[tuple[int, bytes]], train_on: str):
    """(lineno, ids, labels, images) per line, ids and labels as compact int arrays, or
    (lineno, None, error message, None)."""
    for lineno, raw in lines:
        try:
            ids, labels = encode_record(_parse_line(raw, first=lineno == 1), _TOKENIZER, train_on=train_on,
                                        image_root=_IMAGE_ROOT)
            yield lineno, array("i", ids), array("i", labels), images_of(ids)
        except DevstralError as e:
            yield lineno, None, str(e), None


def _encode_chunk(chunk: list[tuple[int, bytes]], train_on: str) -> list[tuple[int, Any, Any, Any]]:
    return list(_encode_lines(chunk, train_on))


def _encoded(lines: list[tuple[int, bytes]], tokenizer, train_on: str, workers: int, image_root: Path):
    global _TOKENIZER, _IMAGE_ROOT
    _TOKENIZER, _IMAGE_ROOT = tokenizer, image_root
    try:
        if workers <= 1:
            yield from _encode_lines(lines, train_on)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        size = max(1, -(-len(lines) // (4 * workers)))
        chunks = [lines[i:i + size] for i in range(0, len(lines), size)]
        # fork: the workers inherit the tokenizer instead of rebuilding it; no CUDA context exists yet
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for done in pool.map(_encode_chunk, chunks, [train_on] * len(chunks)):
                yield from done
    finally:
        _TOKENIZER, _IMAGE_ROOT = None, None


def _auto_workers(n_bytes: int) -> int:
    if n_bytes < PARALLEL_BYTES or sys.platform != "linux":
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), 32))


def load_examples(path: Path, tokenizer, *, max_seq_len: int, train_on: str = "assistant",
                  skip_invalid: bool = False, truncate: bool = True,
                  workers: int | None = None) -> tuple[list[Example], DataStats]:
    """Read and encode a JSONL file. Bad lines raise (naming file and line) unless skip_invalid.
    `workers`: encoding processes (None: one per core for files over PARALLEL_BYTES)."""
    path = Path(path)
    if not path.is_file():
        raise DevstralError(f"--data {path}: no such file")
    stats = DataStats()
    examples: list[Example] = []
    with path.open("rb") as f:
        lines = [(lineno, raw) for lineno, raw in enumerate(f, 1) if raw.strip()]
    stats.lines = len(lines)
    n_workers = workers if workers is not None else _auto_workers(path.stat().st_size)
    for lineno, ids, labels, images in _encoded(lines, tokenizer, train_on, n_workers, path.parent):
        if ids is None:
            if not skip_invalid:
                raise DevstralError(f"{path}:{lineno}: {labels}")
            stats.skipped["invalid"] += 1
            continue
        ids, labels = ids.tolist(), labels.tolist()
        if len(ids) > max_seq_len:
            if not truncate:
                stats.skipped["too long"] += 1
                continue
            # an image is kept whole or not at all: a cut inside one moves to before it
            cut = min([max_seq_len] + [im.start for im in images if im.end > max_seq_len])
            ids, labels = ids[:cut], labels[:cut]
            images = [im for im in images if im.end <= cut]
            stats.truncated += 1
        ex = Example(ids, labels, lineno, images)
        # Labels are shifted at loss time: a label on position 0 is never predicted.
        if sum(1 for t in labels[1:] if t != IGNORE) == 0:
            stats.skipped["no assistant tokens"] += 1
            continue
        examples.append(ex)
        stats.examples += 1
        stats.tokens += len(ids)
        stats.label_tokens += ex.n_labels
    if stats.lines == 0:
        raise DevstralError(f"{path}: no examples (the file is empty)")
    if not examples:
        raise DevstralError(f"{path}: no example has assistant tokens to train on ({stats.summary()})")
    return examples, stats
