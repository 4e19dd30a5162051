"""ReusingChunker: reusing a recent prompt's chunks gives exactly what Chunker.split gives."""

import numpy as np
import pytest

from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.keys import Chunker
from irminsul.chunking.reuse import ReusingChunker


def _edit(rng, ids: np.ndarray, anchors: list[int]):
    """A random next prompt: appended, truncated, edited in the middle, a span moved, or
    anchors added/removed, the way agents change their resent conversations."""
    kind = rng.integers(6)
    n = len(ids)
    if kind == 0:  # new turn appended (anchor at the old end, as a message start)
        add = rng.integers(0, 50_000, rng.integers(1, 600), dtype=np.int32)
        return np.concatenate([ids, add]), [*anchors, n]
    if kind == 1:  # appended without an anchor
        add = rng.integers(0, 50_000, rng.integers(1, 300), dtype=np.int32)
        return np.concatenate([ids, add]), anchors
    if kind == 2 and n > 2:  # truncated
        m = int(rng.integers(1, n))
        return ids[:m].copy(), [a for a in anchors if a < m]
    if kind == 3 and n > 2:  # a few tokens replaced / inserted / deleted in the middle
        p = int(rng.integers(0, n))
        ins = rng.integers(0, 50_000, rng.integers(0, 6), dtype=np.int32)
        d = int(rng.integers(0, 6))
        out = np.concatenate([ids[:p], ins, ids[p + d :]])
        shift = len(ins) - min(d, n - p)
        return out, [a if a <= p else a + shift for a in anchors if a <= p or a >= p + d]
    if kind == 4 and n > 4:  # two spans swapped (messages reordered)
        a, b, c = sorted(int(x) for x in rng.choice(n, 3, replace=False))
        out = np.concatenate([ids[:a], ids[b:c], ids[a:b], ids[c:]])
        return out, sorted({a, a + c - b, *[x for x in anchors if x < a or x >= c]})
    # anchors changed only
    new = set(anchors)
    for _ in range(int(rng.integers(1, 4))):
        x = int(rng.integers(1, max(2, n)))
        new.symmetric_difference_update({x})
    return ids.copy(), sorted(new)


@pytest.mark.parametrize(
    "config",
    [ChunkerConfig(), ChunkerConfig(min_tokens=8, avg_tokens=32, max_tokens=64)],
    ids=["default", "small"],
)
def test_reuse_equals_full_split_over_random_edit_chains(config):
    rng = np.random.default_rng(7)
    chunker, reuse = Chunker(config), ReusingChunker(keep=3)
    reused = 0
    for conv in range(6):  # several conversations interleaved through one memory
        ids = rng.integers(0, 50_000, 3000 + 500 * conv, dtype=np.int32)
        anchors = sorted(int(x) for x in rng.choice(len(ids), 12, replace=False) if x > 0)
        for _ in range(40):
            ids, anchors = _edit(rng, ids, anchors)
            ns = "t1" if rng.integers(5) == 0 else ""
            want = chunker.split(ids, anchors=anchors, namespace=ns, model_fingerprint="fp")
            before = reuse.reused_chunks
            got = reuse.split(chunker, ids, anchors=anchors, namespace=ns, model_fingerprint="fp")
            assert got == want
            reused += reuse.reused_chunks - before
    assert reused > 0  # the memory was used, not only bypassed


def test_reuse_keeps_chunks_only_for_the_same_config_namespace_and_fingerprint():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50_000, 4000, dtype=np.int32)
    reuse = ReusingChunker()
    a, b = Chunker(), Chunker(ChunkerConfig(min_tokens=32, avg_tokens=128, max_tokens=512))
    reuse.split(a, ids, namespace="x", model_fingerprint="fp")
    for chunker, ns, fp in [(b, "x", "fp"), (a, "y", "fp"), (a, "x", "fp2")]:
        before = reuse.reused_chunks
        got = reuse.split(chunker, ids, namespace=ns, model_fingerprint=fp)
        assert got == chunker.split(ids, namespace=ns, model_fingerprint=fp)
    assert reuse.split(a, ids, namespace="x", model_fingerprint="fp") == a.split(
        ids, namespace="x", model_fingerprint="fp"
    )
    assert reuse.reused_chunks > before


def test_reuse_is_not_fooled_by_callers_mutating_their_array():
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 50_000, 4000, dtype=np.int32)
    reuse, chunker = ReusingChunker(), Chunker()
    reuse.split(chunker, ids)
    ids[100] += 1  # same array object, new content
    assert reuse.split(chunker, ids) == chunker.split(ids)


def test_reuse_validates_anchors_like_the_chunker():
    with pytest.raises(ValueError):
        ReusingChunker().split(Chunker(), np.arange(10), anchors=[11])


def test_reuse_drops_the_chunk_holding_a_changed_token_at_its_last_or_first_position():
    rng = np.random.default_rng(3)
    chunker = Chunker(ChunkerConfig(min_tokens=8, avg_tokens=32, max_tokens=64))
    ids = rng.integers(0, 50_000, 2000, dtype=np.int32)
    ends = [c.end for c in chunker.split(ids)][:-1]
    for e in ends[::5]:
        for pos in (e - 1, e):  # the last token of one chunk, the first of the next
            reuse = ReusingChunker()
            reuse.split(chunker, ids)
            new = ids.copy()
            new[pos] += 1
            assert reuse.split(chunker, new) == chunker.split(new)
