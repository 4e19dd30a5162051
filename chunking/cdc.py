"""Content-defined chunking over token IDs: a gear rolling hash with FastCDC normalised cuts.

The hash is computed for every token at once with numpy (log2(window) doubling steps), the
candidate cut points are found with two vectorised comparisons, and only the min/avg/max walk
is a Python loop, one iteration per chunk (not per token).
"""

from __future__ import annotations

import operator
from bisect import bisect_left, bisect_right
from collections.abc import Sequence

import numpy as np

from .config import ChunkerConfig

_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_M32 = 0xFFFFFFFF


def as_token_array(ids) -> np.ndarray:
    """Token IDs as a contiguous 1-D little-endian int32 array (no copy when already one).

    Raises ValueError for a non-1-D input or an ID outside the int32 range, rather than
    letting numpy wrap it silently into another token.
    """
    if isinstance(ids, np.ndarray) and ids.dtype == np.dtype("<i4") and ids.ndim == 1:
        return np.ascontiguousarray(ids)
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"token IDs must be a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype="<i4")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token IDs must be integers, got dtype {arr.dtype}")
    if arr.dtype.itemsize > 4 or arr.dtype == np.uint32:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < _INT32_MIN or hi > _INT32_MAX:
            raise ValueError(f"token ID out of int32 range: {lo if lo < _INT32_MIN else hi}")
    return np.ascontiguousarray(arr, dtype="<i4")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def gear_values(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """The gear value (uint32) of every token: murmur3's fmix32 of the ID xor a seed word.

    Hashing the ID instead of indexing a table means any int32 ID (vocab 130K, 160K or
    more, negative too) gets its own value, and no table has to be built or kept.
    fmix32 is a bijection, so distinct IDs never share a gear value.
    """
    key = np.uint32(_splitmix64(seed) & _M32)
    h = as_token_array(ids).view(np.uint32) ^ key
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def rolling_hash(ids: np.ndarray, window: int, seed: int = 0) -> np.ndarray:
    """h[i] = sum_{j < window} gear[i - j] << j (mod 2**32), terms before index 0 taken as 0.

    This is the gear hash h = (h << 1) + gear[t] a sequential loop would hold after token i,
    restricted to the last ``window`` tokens (a power of two <= 32; with window 32 it is
    exactly the 32-bit rolling value). Computed in log2(window) vectorised doubling steps:
    a sum over 2k tokens is the sum over the last k plus the previous k-sum shifted by k.
    """
    if window < 1 or window > 32 or window & (window - 1):
        raise ValueError(f"window must be a power of two in [1, 32], got {window}")
    h = gear_values(ids, seed)
    k = 1
    while k < window:
        # the right-hand side is a new array, so the in-place add reads pre-step values
        h[k:] += h[:-k] << np.uint32(k)
        k <<= 1
    return h


def _boundaries(n: int, anchors: Sequence[int]) -> list[int]:
    """Sorted segment boundaries [0, ..., n] from the caller's anchors (validated).

    Anchors may come in any order and repeat; 0 and n are boundaries anyway. A non-integer
    anchor raises TypeError (operator.index), one outside [0, n] ValueError.
    """
    inner = set()
    for a in map(operator.index, anchors):
        if a < 0 or a > n:
            raise ValueError(f"anchor {a} outside the prompt [0, {n}]")
        if 0 < a < n:
            inner.add(a)
    return [0, *sorted(inner), n]


def cut_spans(ids, config: ChunkerConfig, anchors: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Split token IDs into [start, end) spans that tile [0, len(ids)) in order.

    Every anchor is a boundary. Within an anchor segment a chunk [s, e) ends at the first e
    in [s + min, s + avg] whose hash (over tokens e-window .. e-1) is below the strict
    threshold, else the first e in (s + avg, s + max) below the loose one, else s + max;
    the last chunk of a segment is cut short at the segment end. Since min >= window, a cut
    depends only on the chunk's own tokens: the same content after an anchor gives the same
    spans whatever precedes it, and an edit changes only the chunks around it.
    """
    arr = as_token_array(ids)
    n = len(arr)
    bounds = _boundaries(n, anchors)
    if n == 0:
        return []
    mn, avg, mx = config.min_tokens, config.avg_tokens, config.max_tokens
    h = rolling_hash(arr, config.hash_window, config.seed)
    # Candidate chunk ends e: the hash of token e - 1 decides whether a chunk may end at e.
    # The strict threshold is <= the loose one, so strict ends are a subset of loose ends.
    loose_at = np.flatnonzero(h <= np.uint32(config.loose_threshold - 1))
    strict_at = loose_at[h[loose_at] <= np.uint32(config.strict_threshold - 1)]
    never = n + mx + 1  # sentinel past every reachable end: spares a bounds check per chunk
    loose = (loose_at + 1).tolist() + [never]
    strict = (strict_at + 1).tolist() + [never]
    spans: list[tuple[int, int]] = []
    append = spans.append
    for i in range(len(bounds) - 1):
        s, end = bounds[i], bounds[i + 1]
        while s < end:
            # every end found here is >= s + min, so a remainder <= min is cut at `end`
            e = strict[bisect_left(strict, s + mn)]
            # plain ifs, not min(): a builtin call per chunk costs ~15% of the whole walk
            if e > s + avg:
                e = loose[bisect_right(loose, s + avg)]
                if e > s + mx:  # noqa: PLR1730
                    e = s + mx
            if e > end:  # noqa: PLR1730
                e = end
            append((s, e))
            s = e
    return spans
