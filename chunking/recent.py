"""Recently encoded prompts, to reuse the pieces of the part a new prompt shares with one.

An agent's next request renders to the previous text plus a little: finding that common
prefix costs a few memcmp-speed slice comparisons, and every piece before a safe split
point inside it (with its IDs) is taken as is, so only the tail is split and looked up.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import xxhash

HEAD = 512  # prompts are grouped by a digest of their first HEAD chars
PER_HEAD = 4  # sessions sharing a system prompt share a head; keep a few of each
TAIL = 4096  # a candidate sharing all but this many chars is taken without trying others


def _head(text: str) -> bytes:
    return xxhash.xxh3_64_digest(text[:HEAD].encode("utf-8", "surrogatepass"))


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, step = 0, 4096
    while lo + step <= n and a[lo : lo + step] == b[lo : lo + step]:
        lo += step
    hi = min(lo + step, n)  # a[:lo] == b[:lo]; a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class RecentPrompts:
    """Bounded map from a prompt's head to the last encodings (any object with ``.text``)."""

    def __init__(self, max_heads: int):
        self.max_heads = max_heads
        self._d: OrderedDict[bytes, list] = OrderedDict()
        self._lock = threading.Lock()

    def best(self, text: str):
        """(encoding, common prefix length) of the remembered prompt sharing the longest
        prefix with ``text``, or None when none shares at least its head."""
        if len(text) < HEAD or not self.max_heads:
            return None
        with self._lock:
            cands = list(self._d.get(_head(text), ()))
        best = None
        for enc in cands:  # most recent first
            # an agent's next prompt usually extends its last one: a copy-free check first
            n = len(enc.text) if text.startswith(enc.text) else common_prefix(enc.text, text)
            if best is None or n > best[1]:
                best = (enc, n)
            if n >= min(len(enc.text), len(text) - TAIL):
                break  # all of it, or all but a tail that re-splits in microseconds
        return best

    def add(self, enc) -> None:
        if len(enc.text) < HEAD or not self.max_heads:
            return
        key = _head(enc.text)
        with self._lock:
            lst = [e for e in self._d.pop(key, []) if e.text != enc.text]
            self._d[key] = [enc, *lst][:PER_HEAD]
            while len(self._d) > self.max_heads:
                self._d.popitem(last=False)
