"""A command's output in a fixed memory budget: the first and the last bytes, and how many came between.

`yes` writes gigabytes a second; keeping all of it grew the agent to 17.8 GB. The model only ever sees
the head and the tail (an observation is capped at 30,000 characters), so nothing else is kept. Memory stays below
head + 2 * tail bytes whatever the command prints.
"""

from __future__ import annotations

HEAD_BYTES = 14_000
TAIL_BYTES = 14_000
# A cut is moved to a line break when one is this close: whole lines read better, and a secret
# (one line, nearly always) is then never split into a masked-too-late half.
_LINE_SNAP_BYTES = 2_000


class HeadTailBuffer:
    def __init__(self, head_bytes: int = HEAD_BYTES, tail_bytes: int = TAIL_BYTES):
        self.head_bytes, self.tail_bytes = head_bytes, tail_bytes
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0  # bytes seen, kept or not

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_bytes - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        if len(data) >= self.tail_bytes:
            self._tail = bytearray(data[-self.tail_bytes:])
            return
        self._tail += data
        if len(self._tail) > 2 * self.tail_bytes:  # trim now and then, not on every chunk
            del self._tail[:-self.tail_bytes]

    @property
    def elided(self) -> int:
        return self.total - len(self._head) - min(len(self._tail), self.tail_bytes)

    def text(self) -> str:
        """The output as text: everything when it fit, else head, a line saying how much was cut, tail."""
        tail = bytes(self._tail[-self.tail_bytes:]) if self._tail else b""
        if self.elided == 0:
            return (bytes(self._head) + tail).decode("utf-8", errors="replace")
        head = bytes(self._head)
        cut = head.rfind(b"\n", len(head) - _LINE_SNAP_BYTES)
        if cut >= 0:
            head = head[:cut + 1]
        start = tail.find(b"\n", 0, _LINE_SNAP_BYTES)
        if start >= 0:
            tail = tail[start + 1:]
        elided = self.total - len(head) - len(tail)
        return (head.decode("utf-8", errors="replace").rstrip("\n")
                + f"\n[... {elided} bytes of output cut here; the first and last lines are shown ...]\n"
                + tail.decode("utf-8", errors="replace"))
