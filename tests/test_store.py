"""ChunkStore: verified hits, collisions, byte-bounded LRU, pins, and the exact-prefix trie."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from irminsul.chunking.keys import chunk_key
from irminsul.engine_adapter.contract import ChunkRef
from irminsul.engine_adapter.embedded.store import ChunkStore, KVEntry

L, RANK, ROPE = 2, 8, 4


def entry(ids, position: int = 0) -> KVEntry:
    """An entry whose KV values encode its token IDs (so a wrong entry is visible)."""
    ids = np.asarray(ids, dtype=np.int32)
    t = torch.as_tensor(ids, dtype=torch.float32)
    c = t[None, :, None].expand(L, len(ids), RANK).clone()
    return KVEntry(ids, position, c, c[..., :ROPE].clone())


def key(ids, namespace: str = "") -> str:
    return chunk_key(np.asarray(ids, dtype=np.int32), namespace=namespace)


SIZE = entry(range(4)).nbytes  # bytes of a 4-token entry


def refs(ids, chunks: list[tuple[int, int]], namespace: str = "") -> list[ChunkRef]:
    return [ChunkRef(key(ids[s:e], namespace), s, e) for s, e in chunks]


def test_hit_requires_equal_token_ids():
    store = ChunkStore(10 * SIZE)
    e = entry([1, 2, 3, 4])
    assert store.put(key([1, 2, 3, 4]), e)
    assert store.lookup(key([1, 2, 3, 4]), [1, 2, 3, 4]) is e
    assert store.lookup(key([5, 6, 7, 8]), [5, 6, 7, 8]) is None
    st = store.stats()
    assert (st.hits, st.misses, st.collisions, st.entries) == (1, 1, 0, 1)


def test_colliding_key_is_a_miss_never_other_kv():
    store = ChunkStore(10 * SIZE)
    k = key([1, 2, 3, 4])
    store.put(k, entry([1, 2, 3, 4]))
    # A request whose chunk hashes to k but holds other tokens (a collision, or a corrupted
    # entry): the store must answer miss, not the KV of [1, 2, 3, 4].
    assert store.lookup(k, [9, 9, 9, 9]) is None
    assert store.lookup(k, [1, 2, 3]) is None  # a prefix of the stored IDs is not equal
    assert not store.put(k, entry([9, 9, 9, 9]))  # the first entry stays
    assert store.lookup(k, [1, 2, 3, 4]).ids.tolist() == [1, 2, 3, 4]
    st = store.stats()
    assert st.collisions == 3 and st.misses == 2 and st.hits == 1


def test_lru_eviction_under_byte_budget():
    store = ChunkStore(3 * SIZE)
    chunks = [[i, i, i, i] for i in range(5)]
    for ids in chunks[:3]:
        assert store.put(key(ids), entry(ids))
    assert store.lookup(key(chunks[0]), chunks[0]) is not None  # 0 becomes most recent
    assert store.put(key(chunks[3]), entry(chunks[3]))  # evicts 1, the least recent
    assert key(chunks[1]) not in store and key(chunks[0]) in store
    st = store.stats()
    assert st.evictions == 1 and st.bytes == 3 * SIZE <= st.capacity_bytes


def test_pinned_entries_survive_eviction_pressure():
    store = ChunkStore(2 * SIZE)
    a, b = entry([1] * 4), entry([2] * 4)
    store.put(key([1] * 4), a)
    store.put(key([2] * 4), b)
    with store.pinned([a]):
        assert store.put(key([3] * 4), entry([3] * 4))  # b goes, a (older but pinned) stays
        assert key([1] * 4) in store and key([2] * 4) not in store
        store.acquire([store.lookup(key([3] * 4), [3] * 4)])
        assert not store.put(key([4] * 4), entry([4] * 4))  # all pinned: refused, not evicted
        assert store.stats().rejected == 1 and store.stats().pinned == 2
    assert store.put(key([4] * 4), entry([4] * 4))  # a was released: now it can go
    assert key([1] * 4) not in store and key([3] * 4) in store
    with pytest.raises(RuntimeError):
        store.release([a])


def test_entry_larger_than_budget_is_refused():
    store = ChunkStore(SIZE - 1)
    assert not store.put(key([1] * 4), entry([1] * 4))
    assert store.stats().entries == 0 and store.stats().rejected == 1


def test_prefix_trie_longest_exact_match_to_the_token():
    store = ChunkStore(100 * SIZE)
    ids = np.arange(100, 112, dtype=np.int32)
    spans = [(0, 4), (4, 8), (8, 12)]
    path = [(r.key, entry(ids[r.start : r.end], r.start)) for r in refs(ids, spans)]
    assert store.insert_prefix("", path) == 12
    # Same prompt: every edge, verified by IDs.
    m = store.match_prefix("", ids, refs(ids, spans))
    assert m.length == 12 and [e for e, _ in m.parts] == [e for _, e in path]
    # A longer prompt whose chunking cut the last cached chunk differently.
    longer = np.concatenate([ids, [7, 7, 7]]).astype(np.int32)
    m = store.match_prefix("", longer, refs(longer, [(0, 4), (4, 8), (8, 15)]))
    assert m.length == 12 and m.parts[-1][1] == 4  # partial edge: all 4 tokens match
    # Diverging inside the second chunk: exact up to the first differing token.
    other = ids.copy()
    other[6] = 1
    m = store.match_prefix("", other, refs(other, spans))
    assert m.length == 6 and [n for _, n in m.parts] == [4, 2]
    # Another namespace sees nothing.
    assert store.match_prefix("tenant-b", ids, refs(ids, spans, "tenant-b")).length == 0
    assert store.stats().prefix_nodes == 3


def test_prefix_trie_refuses_colliding_edge():
    store = ChunkStore(100 * SIZE)
    ids = np.arange(8, dtype=np.int32)
    r = refs(ids, [(0, 4), (4, 8)])
    store.insert_prefix("", [(x.key, entry(ids[x.start : x.end], x.start)) for x in r])
    fake = ids.copy()
    fake[4:] = 50  # a prompt claiming the same key for its second chunk
    m = store.match_prefix("", fake, [r[0], ChunkRef(r[1].key, 4, 8)])
    assert m.length == 4 and store.stats().collisions == 1


def test_interior_trie_nodes_outlive_their_children():
    store = ChunkStore(3 * SIZE)
    ids = np.arange(8, dtype=np.int32)
    r = refs(ids, [(0, 4), (4, 8)])
    store.insert_prefix("", [(x.key, entry(ids[x.start : x.end], x.start)) for x in r])
    store.put(key([9] * 4), entry([9] * 4))
    store.put(key([8] * 4), entry([8] * 4))  # over budget: the root edge is oldest but has a child
    assert store.match_prefix("", ids, r).length == 4  # the leaf edge went first
    assert store.stats().prefix_nodes == 1


def test_extending_a_path_never_evicts_the_node_it_extends():
    """Found by a 12-turn replay: holding a new edge's entry made room by evicting the leaf it
    was about to hang from, so the edge went under a node no longer in the trie (claimed as
    covered, unreachable), and dropping it later failed on its parent, already freed."""
    store = ChunkStore(SIZE)  # room for one entry
    ids = np.arange(8, dtype=np.int32)
    r = refs(ids, [(0, 4), (4, 8)])
    path = [(x.key, entry(ids[x.start : x.end], x.start)) for x in r]
    assert store.insert_prefix("", path[:1]) == 4
    # the second edge does not fit beside the first, and the first is the path: refused
    assert store.insert_prefix("", path) == 4
    assert store.match_prefix("", ids, r).length == 4
    assert store.stats().prefix_nodes == 1
    # the store stays sound: a newcomer evicts the leaf as usual
    assert store.insert_prefix("b", [(key([9] * 4), entry([9] * 4))]) == 4
    assert store.match_prefix("", ids, r).length == 0
    assert store.stats().prefix_nodes == 1


def test_shared_entry_is_counted_once_and_cleared():
    store = ChunkStore(100 * SIZE)
    ids = np.arange(4, dtype=np.int32)
    e = entry(ids)
    store.put(key(ids), e)
    store.insert_prefix("", [(key(ids), e)])
    st = store.stats()
    assert st.bytes == e.nbytes and st.entries == 1 and st.content_entries == 1
    store.clear()
    st = store.stats()
    assert st.bytes == 0 and st.entries == 0 and st.prefix_nodes == 0
    assert store.lookup(key(ids), ids) is None


def test_prefix_walk_descends_edges_that_do_not_align_with_chunks():
    store = ChunkStore(100 * SIZE)
    ids = np.arange(200, 208, dtype=np.int32)
    path = [(key(ids[s:e]), entry(ids[s:e], s)) for s, e in [(0, 4), (4, 8)]]
    store.insert_prefix("", path)
    request = np.concatenate([ids, [1, 2, 3]]).astype(np.int32)
    # The request is chunked differently: no chunk key equals an edge key.
    m = store.match_prefix("", request, refs(request, [(0, 6), (6, 11)]))
    assert m.length == 8 and [n for _, n in m.parts] == [4, 4]


def test_approximate_tail_is_returned_apart_and_only_when_asked():
    store = ChunkStore(100 * SIZE)
    ids = np.arange(300, 316, dtype=np.int32)
    spans = [(0, 4), (4, 8), (8, 12), (12, 16)]
    path = [(key(ids[s:e]), entry(ids[s:e], s)) for s, e in spans]
    assert store.insert_prefix("", path, approximate_from=1) == 16  # [0, 4) exact, then tail
    st = store.stats()
    assert (st.prefix_nodes, st.approx_nodes) == (4, 3)
    longer = np.concatenate([ids, [7, 7]]).astype(np.int32)
    chunks = refs(longer, [*spans, (16, 18)])
    m = store.match_prefix("", longer, chunks)  # the exact trie alone, as before
    assert m.length == 4 and m.tail == () and m.end == 4
    m = store.match_prefix("", longer, chunks, approximate=True)
    assert m.length == 4 and [e for e, _ in m.parts] == [path[0][1]]
    assert [(e, off, n) for e, off, n in m.tail] == [(e, 0, 4) for _, e in path[1:]]
    assert m.end == 16 and store.stats().approx_tokens == 12
    # a request that leaves the prompt inside the third edge: its first 2 tokens only
    other = ids.copy()
    other[10] = 1
    m = store.match_prefix("", other, refs(other, spans), approximate=True)
    assert m.length == 4 and [n for _, _, n in m.tail] == [4, 2]


def test_approximate_tail_never_becomes_exact_and_never_mixes():
    store = ChunkStore(100 * SIZE)
    ids = np.arange(400, 412, dtype=np.int32)
    spans = [(0, 4), (4, 8), (8, 12)]
    approx = [(key(ids[s:e]), entry(ids[s:e], s)) for s, e in spans]
    store.insert_prefix("", approx, approximate_from=1)
    # the same tokens computed exactly later: exact edges beside the tail, the tail kept
    exact = [(key(ids[s:e]), entry(ids[s:e], s)) for s, e in spans]
    assert store.insert_prefix("", exact) == 12
    m = store.match_prefix("", ids, refs(ids, spans), approximate=True)
    assert m.length == 12 and [e for e, _ in m.parts] == [approx[0][1], *(e for _, e in exact[1:])]
    assert m.tail == ()
    assert store.stats().approx_nodes == 2 and approx[1][1].node.approx
    # another approximation of the same tokens does not go under the first one's edge
    store2 = ChunkStore(100 * SIZE)
    first = [(key(ids[s:e]), entry(ids[s:e], s)) for s, e in spans]
    store2.insert_prefix("", first, approximate_from=1)
    again = [first[0], *((key(ids[s:e]), entry(ids[s:e], s)) for s, e in spans[1:])]
    assert store2.insert_prefix("", again, approximate_from=1) == 4
    assert store2.stats().approx_nodes == 2


def test_forged_tail_edge_is_a_miss():
    store = ChunkStore(100 * SIZE)
    ids = np.arange(500, 512, dtype=np.int32)
    spans = [(0, 4), (4, 8), (8, 12)]
    forged = (ids[4:8] + 1000).astype(np.int32)  # other tokens under the chunk's key
    path = [(key(ids[0:4]), entry(ids[0:4], 0)), (key(ids[4:8]), entry(forged, 4))]
    store.insert_prefix("", path, approximate_from=1)
    m = store.match_prefix("", ids, refs(ids, spans), approximate=True)
    assert m.length == 4 and m.tail == () and store.stats().collisions == 1


def test_tail_eviction_and_pins():
    store = ChunkStore(4 * SIZE)
    ids = np.arange(600, 616, dtype=np.int32)
    spans = [(0, 4), (4, 8), (8, 12), (12, 16)]
    path = [(key(ids[s:e]), entry(ids[s:e], s)) for s, e in spans]
    store.insert_prefix("", path, approximate_from=2)
    m = store.match_prefix("", ids, refs(ids, spans), approximate=True)
    tail = [e for e, _, _ in m.tail]
    store.acquire(tail)
    # no room: the leaf is pinned and every other node has a child
    assert not store.put(key([1, 2, 3, 4]), entry([1, 2, 3, 4]))
    store.release(tail)
    assert store.put(key([1, 2, 3, 4]), entry([1, 2, 3, 4]))  # the leaf tail edge goes
    st = store.stats()
    assert st.evictions == 1 and (st.prefix_nodes, st.approx_nodes) == (3, 1)
    m = store.match_prefix("", ids, refs(ids, spans), approximate=True)
    assert m.length == 8 and m.end == 12
    assert st.bytes <= st.capacity_bytes


def test_cleared_and_evicted_kv_is_freed_without_the_cycle_collector():
    """Python collects reference cycles on counts of objects, not bytes: KV that only the
    cycle collector could free stays on the GPU for many requests (bench/NOTES.md)."""
    import gc
    import weakref

    store = ChunkStore(3 * SIZE)
    path = [(key(np.arange(i, i + 4)), entry(np.arange(i, i + 4), i)) for i in (0, 4, 8)]
    watched = [weakref.ref(e.c_kv) for _, e in path]
    gc.collect()
    gc.disable()
    try:
        store.put(path[0][0], path[0][1])
        assert store.insert_prefix("", path) == 12
        del path
        other = [(key(np.arange(50, 54)), entry(np.arange(50, 54)))]
        assert store.insert_prefix("b", other) == 4  # evicts the deepest leaf, at 8
        assert watched[2]() is None
        store.clear()
        del other
        assert [w() is None for w in watched] == [True, True, True]
    finally:
        gc.enable()
