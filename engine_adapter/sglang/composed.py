"""The derived ``extra_key`` under which composed KV lives in SGLang's own radix tree.

No SGLang import. SGLang 0.5.23 partitions its radix tree by ``RadixKey.extra_key`` (and
``cache_salt``): ``radix_cache.py`` ``RadixKey.child_key_at`` prefixes every child key with
them, and ``match_at`` refuses to compare keys of different namespaces. A request matches only
under its own ``Req.extra_key``, so KV inserted under a key no client can name is invisible to
every plain request.

The cache (cache.py) inserts a composed request's tokens ``[p, N)`` (p = its exact prefix)
under :func:`composed_key`; a later request whose exact prefix is the same ``ids[:p]`` (same
tenant, same SGLang namespace) derives the same key and matches its tokens from p on under it.
The key is a keyed hash (BLAKE2b with a secret drawn per cache instance), so a client that sets
``extra_key`` itself cannot name it; it changes on every server start, when the tree is empty.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

COMPOSED_PREFIX = "irminsul~"


def new_secret() -> bytes:
    return os.urandom(16)


def composed_key(secret: bytes, extra_key: str | None, cache_salt: str | None,
                 namespace: str, prefix_ids) -> str:
    """Namespace of composed KV that follows the exact prefix ``prefix_ids`` of a request in
    SGLang namespace (``extra_key``, ``cache_salt``) and proxy tenant ``namespace``."""
    if len(secret) < 16:
        raise ValueError("composed_key needs a secret of at least 16 bytes")
    h = hashlib.blake2b(key=secret, digest_size=16)
    for part in (extra_key, cache_salt, namespace):
        raw = b"\x00" if part is None else b"\x01" + part.encode()
        h.update(len(raw).to_bytes(4, "little") + raw)  # length-framed: no ambiguous joins
    ids = np.ascontiguousarray(np.asarray(prefix_ids, dtype=np.int64))
    h.update(len(ids).to_bytes(8, "little") + ids.tobytes())
    return COMPOSED_PREFIX + h.hexdigest()


def is_composed_key(extra_key: str | None) -> bool:
    return extra_key is not None and extra_key.startswith(COMPOSED_PREFIX)
