"""Memory shared between chat_layout calls for one tokenizer: what each template puts before
each role's content, and rendered skeletons / prefix lengths. Both are bounded."""

from __future__ import annotations

import threading
from collections import OrderedDict


class HeaderBook:
    """What one template puts before each role's content. Thread-safe.

    ``match(role, glue)`` gives the header length at the end of ``glue`` (the text between
    the previous content and this one): first from glues seen before (exact memo, which
    also remembers "no prefix split exists here" as -1), then from the longest known
    non-empty header of that role that ends the glue. An empty header is only memoised per
    glue: learned as a suffix it would match every glue of the role.
    """

    def __init__(self, max_headers: int = 32, max_glues: int = 4096, max_glue_chars: int = 1024):
        self.max_headers, self.max_glues, self.max_glue_chars = (
            max_headers,
            max_glues,
            max_glue_chars,
        )
        self._by_role: dict[str, list[str]] = {}
        self._glues: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def match(self, role: str, glue: str) -> int | None:
        hl = self._glues.get((role, glue))
        if hl is not None:
            return hl
        for h in self._by_role.get(role, ()):  # longest first
            if glue.endswith(h):
                return len(h)
        return None

    def recall(self, key: str, glue: str) -> int | None:
        """A value memoised for exactly this (key, glue) by :meth:`remember`."""
        return self._glues.get((key, glue))

    def remember(self, key: str, glue: str, value: int) -> None:
        with self._lock:
            if len(glue) <= self.max_glue_chars and len(self._glues) < self.max_glues:
                self._glues[(key, glue)] = value

    def learn(self, role: str, glue: str, header_len: int) -> None:
        """Record that ``glue`` ends with a ``header_len``-char header (-1: none found)."""
        with self._lock:
            if len(glue) <= self.max_glue_chars and len(self._glues) < self.max_glues:
                self._glues[(role, glue)] = header_len
            known = self._by_role.get(role, [])
            if header_len > 0 and len(known) < self.max_headers:
                h = glue[len(glue) - header_len :]
                if h not in known:
                    # replaced whole: readers never see a half-sorted list
                    self._by_role[role] = sorted([*known, h], key=len, reverse=True)


class RenderMemo:
    """LRU of render results keyed by a digest: skeleton renders (text) and, in exact mode,
    prefix-render lengths (int). Agents resend the conversation every turn, so the same
    skeleton or prefix comes back with one more message."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._d: OrderedDict[bytes, object] = OrderedDict()
        self._lock = threading.Lock()
        # the last chat_layout alignment (alignment.Alignment), replaced whole per call: the
        # next turn of a conversation re-walks only what follows the part it shares with it
        self.last_alignment = None
        self.last_starts = None  # the last _from_alignment's starts (anchors._Starts), likewise

    def get(self, key: bytes):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: bytes, value) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.max_entries:
                self._d.popitem(last=False)
