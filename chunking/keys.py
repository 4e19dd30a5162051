"""Chunk keys (xxh3_128 over namespace, model fingerprint and int32 token IDs) and the Chunker.

A key is a lookup hint, never a proof: a cache hit must still compare token IDs.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

from ..engine_adapter.contract import ChunkRef
from .cdc import as_token_array, cut_spans
from .config import ChunkerConfig


def key_prefix(namespace: str = "", model_fingerprint: str = "") -> bytes:
    """The bytes hashed before a chunk's tokens: each string UTF-8, preceded by its length.

    The length prefixes (u64 little-endian) keep ("ab", "c") and ("a", "bc") apart.
    """
    if not isinstance(namespace, str) or not isinstance(model_fingerprint, str):
        raise TypeError("namespace and model_fingerprint must be strings")
    ns, fp = namespace.encode(), model_fingerprint.encode()
    return struct.pack("<Q", len(ns)) + ns + struct.pack("<Q", len(fp)) + fp


def chunk_key(ids, *, namespace: str = "", model_fingerprint: str = "") -> str:
    """xxh3_128 hex digest of key_prefix(namespace, model_fingerprint) + int32 LE token bytes."""
    data = as_token_array(ids).tobytes()
    return xxhash.xxh3_128_hexdigest(key_prefix(namespace, model_fingerprint) + data)


def chunk_keys(
    ids, spans: Sequence[tuple[int, int]], *, namespace: str = "", model_fingerprint: str = ""
) -> list[str]:
    """chunk_key of ids[start:end] for every span, sharing one byte buffer (no per-chunk copy
    of the token array)."""
    data = memoryview(as_token_array(ids).tobytes())
    prefix = key_prefix(namespace, model_fingerprint)
    digest = xxhash.xxh3_128_hexdigest
    return [digest(prefix + data[4 * s : 4 * e]) for s, e in spans]


class Chunker:
    """Splits token IDs into keyed chunks with one ChunkerConfig; holds no other state."""

    def __init__(self, config: ChunkerConfig | None = None):
        self.config = config if config is not None else ChunkerConfig()

    def split(
        self,
        ids,
        *,
        anchors: Sequence[int] = (),
        namespace: str = "",
        model_fingerprint: str = "",
    ) -> tuple[ChunkRef, ...]:
        """ChunkRefs tiling [0, len(ids)) in order; empty input gives an empty tuple."""
        arr = as_token_array(ids)
        spans = cut_spans(arr, self.config, anchors)
        # chunk_keys inlined: one pass building the ChunkRefs (this runs per request)
        data = memoryview(arr.tobytes())
        prefix = key_prefix(namespace, model_fingerprint)
        digest = xxhash.xxh3_128_hexdigest
        return tuple([ChunkRef(digest(prefix + data[4 * s : 4 * e]), s, e) for s, e in spans])
