"""Chunking a prompt that shares its head with a recent one: keep the old chunks, cut the tail.

An agent's next prompt is its last one plus a little, so most of its chunks (and their
xxh3 keys) are the previous turn's. A chunk [s, e) of the old prompt is also a chunk of the
new one when every input its cut read is unchanged: its tokens (the rolling hash at e - 1
covers only the chunk's own tokens, as min_tokens >= hash_window), and the boundary set
below e (its segment's start) and at e (a cut forced by an anchor or the prompt's end). So
the old chunks ending at or before the first differing token, and before the first boundary
that is in one list and not the other, are kept; the walk restarts at the last kept end,
which is a chunk start of the full walk too, and the rolling hash there needs no history
(cut_spans over ids[r:] gives exactly the full walk's spans past r). Result: identical to
Chunker.split, in O(new tokens) instead of O(prompt).
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import xxhash

from ..engine_adapter.contract import ChunkRef
from .cdc import _boundaries, as_token_array, cut_spans
from .config import ChunkerConfig
from .keys import Chunker, key_prefix


class _Past(NamedTuple):
    config: ChunkerConfig
    prefix: bytes  # key_prefix(namespace, model_fingerprint)
    ids: np.ndarray  # a private copy
    bounds: list[int]  # [0, sorted inner anchors..., n]
    chunks: tuple[ChunkRef, ...]
    ends: list[int]


def _first_difference(a: np.ndarray, b: np.ndarray) -> int:
    """Index of the first position where ``a`` and ``b`` differ (the shorter length if one
    is a prefix of the other)."""
    m = min(len(a), len(b))
    if not m:
        return 0
    neq = a[:m] != b[:m]
    k = int(neq.argmax())  # the first True, or 0 when none is
    return k if neq[k] else m


def _first_bound_difference(a: list[int], b: list[int]) -> int:
    """The smallest boundary in one sorted list and not in the other (a large value if none)."""
    if a == b:
        return 1 << 62
    for x, y in zip(a, b):
        if x != y:
            return min(x, y)
    if len(a) != len(b):
        return (a if len(a) > len(b) else b)[min(len(a), len(b))]
    return 1 << 62


class ReusingChunker:
    """Chunker.split with the last few results remembered (thread-safe; bounded).

    ``keep`` results are remembered (one per recent conversation; each holds a copy of its
    token IDs). Results never depend on what is remembered, only the time does.
    """

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._past: list[_Past] = []
        self._lock = threading.Lock()
        self.reused_chunks = 0  # chunks taken from a remembered result (for tests and stats)

    def split(
        self,
        chunker: Chunker,
        ids,
        *,
        anchors: Sequence[int] = (),
        namespace: str = "",
        model_fingerprint: str = "",
    ) -> tuple[ChunkRef, ...]:
        arr = as_token_array(ids)
        n = len(arr)
        bounds = _boundaries(n, anchors)  # validates the anchors as cut_spans does
        config = chunker.config
        prefix = key_prefix(namespace, model_fingerprint)
        with self._lock:
            past = list(self._past)
        kept: tuple[ChunkRef, ...] = ()
        source = None
        for p in past:  # most recent first
            if p.config != config or p.prefix != prefix or not p.ends:
                continue
            limit = min(_first_difference(p.ids, arr), _first_bound_difference(p.bounds, bounds) - 1)
            k = bisect_right(p.ends, limit)
            if k > len(kept):
                kept, source = p.chunks[:k], p
                if kept[-1].end >= n - config.max_tokens:
                    break  # all but the last chunk or so: no other can save much more
        r = kept[-1].end if kept else 0
        tail = arr[r:]
        spans = cut_spans(tail, config, [b - r for b in bounds if r < b < n])
        data = memoryview(tail.tobytes())
        digest = xxhash.xxh3_128_hexdigest
        chunks = kept + tuple(
            [ChunkRef(digest(prefix + data[4 * s : 4 * e]), s + r, e + r) for s, e in spans]
        )
        if self.keep > 0 and n:
            entry = _Past(config, prefix, arr.copy(), bounds, chunks, [c.end for c in chunks])
            with self._lock:
                self.reused_chunks += len(kept)
                # a result that grew from most of an entry replaces it: one per conversation
                gone = source if source is not None and 2 * r >= len(source.ids) else None
                rest = [q for q in self._past if q is not gone]
                self._past = [entry, *rest][: self.keep]
        return chunks

    def clear(self) -> None:
        with self._lock:
            self._past = []
