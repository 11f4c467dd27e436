"""Stored responses for `previous_response_id`: in memory only, bounded, least recently used out first.

Each entry keeps its own turn (the input items of its request, as chat messages, and its output as
an assistant message) and the id of the response it continued; a conversation is rebuilt by walking
that chain, so a long conversation costs its length once, not once per turn. Nothing is written to
disk: a restarted server has forgotten every response, as OpenAI's `store: false` would.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from devstral.server.errors import APIError

MAX_RESPONSES = 512
MAX_CHAIN = 10_000  # a cycle cannot happen (ids are fresh), but a bound keeps a walk finite


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the Response object as returned
    messages: list[dict[str, Any]]  # this turn: new input messages, then the output as chat messages
    parent: str | None


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES):
        self.max = max_responses
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, rid: str, entry: StoredResponse) -> None:
        with self._lock:
            self._items[rid] = entry
            self._items.move_to_end(rid)
            while len(self._items) > self.max:
                self._items.popitem(last=False)

    def get(self, rid: str) -> StoredResponse:
        with self._lock:
            entry = self._items.get(rid)
            if entry is None:
                raise APIError(404, f"response {rid!r} not found (never stored, deleted, or evicted: this server "
                                    f"keeps the last {self.max} in memory)", param="response_id",
                               code="response_not_found")
            self._items.move_to_end(rid)
            return entry

    def delete(self, rid: str) -> None:
        with self._lock:
            if self._items.pop(rid, None) is None:
                raise APIError(404, f"response {rid!r} not found", param="response_id", code="response_not_found")

    def conversation(self, rid: str) -> list[dict[str, Any]]:
        """Every message of the chain that ends with `rid`, oldest first."""
        turns: list[list[dict[str, Any]]] = []
        current: str | None = rid
        while current is not None and len(turns) < MAX_CHAIN:
            try:
                entry = self.get(current)
            except APIError:
                if current == rid:
                    raise APIError(404, f"previous response {rid!r} not found", param="previous_response_id",
                                   code="previous_response_not_found") from None
                raise APIError(404, f"previous_response_id: an earlier response of this conversation "
                                    f"({current!r}) is no longer stored", param="previous_response_id",
                               code="previous_response_not_found") from None
            turns.append(entry.messages)
            current = entry.parent
        return [m for turn in reversed(turns) for m in turn]
