"""A bounded LRU map from a text piece to its encoding, shared by the threads that tokenize.

Agents resend the same system prompt, tool list and history every turn; the template puts
added tokens between messages, so those texts come back as the same pieces and are looked
up here instead of being tokenized again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

import numpy as np


class SpanEncoding(NamedTuple):
    """How one piece of text (between added tokens) encodes."""

    ids: np.ndarray  # int32 token IDs of the piece
    section_chars: np.ndarray  # int32 char offsets (in the piece) of section starts
    section_tokens: np.ndarray  # int32 token offsets (in the piece) of those section starts
    char_starts: np.ndarray | None  # int32 char offset of each token start, when kept


class SpanCache:
    """LRU bounded by entry count and by total characters of the keys.

    ``get`` and ``put`` take a lock: the proxy may tokenize on several threads, and
    OrderedDict's move/evict steps are not atomic together.
    """

    def __init__(self, max_entries: int, max_chars: int):
        if max_entries < 0 or max_chars < 0:
            raise ValueError("cache bounds must be >= 0")
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._d: OrderedDict[str, SpanEncoding] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: str) -> SpanEncoding | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: str, value: SpanEncoding) -> None:
        """Store ``value``; pieces longer than the whole budget are not kept."""
        if len(key) > self.max_chars or self.max_entries == 0:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._chars -= len(key)
            self._d[key] = value
            self._chars += len(key)
            while len(self._d) > self.max_entries or self._chars > self.max_chars:
                k, _ = self._d.popitem(last=False)
                self._chars -= len(k)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._chars = 0
            self.hits = self.misses = 0
