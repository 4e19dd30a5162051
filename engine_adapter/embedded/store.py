"""The chunk KV store: content-addressed chunks plus an exact-prefix trie, one byte budget.

An entry is the latent KV of a run of tokens computed once: its token IDs, the position of
its first token, c_KV [L, T, rank] and k_pe [L, T, rope_dim] (RoPE'd at that position).
Two indexes point at entries:

* the content index, chunk key -> entry, used for position-independent reuse;
* the prefix trie, per namespace, whose edges are chunks: a path from the root is a prompt
  prefix whose KV was computed exactly (no reuse before it), like a radix cache at chunk
  granularity. A request may also use the first tokens of an edge (KV at position p depends
  only on tokens 0..p), so matching is exact to the token.
* the approximate tails of that trie: below an exact node, a prompt's chunks from its first
  reused token on, with the KV its prefill composed there (placed, carved, computed over
  placed KV), at the positions it had. A request that repeats that prompt and goes on gets
  them placed as they are (same positions: nothing to rotate, nothing to recompute), but
  counted as content reuse, never as exact prefix: only ``match_prefix(approximate=True)``
  returns them, apart from the exact parts. Below an approximate edge every edge is
  approximate; an approximate edge is never made exact, and an exact one is only ever
  inserted under an exact node, so the exact trie is what it would be without tails.

An entry held by both indexes is stored once. A key is a hint, never a proof: every hit
compares token IDs, and a key whose entry holds other IDs counts as a collision and a miss.
Eviction is LRU over entries, skipping pinned ones (refs > 0) and trie nodes with children.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch


class KVEntry:
    """Latent KV of tokens ``ids`` computed at positions position .. position + len - 1."""

    __slots__ = ("c_kv", "content_key", "ids", "k_pe", "node", "position", "prev_key", "refs")

    def __init__(self, ids, position: int, c_kv: torch.Tensor, k_pe: torch.Tensor,
                 prev_key: str | None = None):
        self.ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int32))
        if c_kv.shape[1] != len(self.ids) or k_pe.shape[1] != len(self.ids):
            raise ValueError("c_kv/k_pe must hold one row per token: [L, T, dim]")
        self.position = int(position)
        self.c_kv, self.k_pe = c_kv, k_pe
        # Key of the chunk right before this one when it was computed (None: none, or
        # unknown). A later prompt with that same chunk before it continues a run: the
        # cross-chunk attention this chunk's KV saw at its start is the same again.
        self.prev_key = prev_key
        self.refs = 0  # pins by in-flight requests
        self.content_key: str | None = None  # set while in the content index
        self.node: _Node | None = None  # set while in the prefix trie

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return self.c_kv.nbytes + self.k_pe.nbytes + self.ids.nbytes


class _Node:
    # The parent is held weakly: a strong child -> parent link closes a cycle with the
    # parent's ``children`` dict, and a trie dropped whole (clear) would then keep every
    # entry's KV alive until Python's cycle collector ran, which it does on counts of
    # objects, not bytes: on a GPU, gigabytes of dead KV per flushed store.
    __slots__ = ("__weakref__", "_parent", "approx", "approx_by_first", "approx_children",
                 "by_first", "children", "entry", "key")

    def __init__(self, key: str, entry: KVEntry | None, parent: _Node | None,
                 approx: bool = False):
        self.key, self.entry, self.approx = key, entry, approx
        self._parent = None if parent is None else weakref.ref(parent)
        self.children: dict[str, _Node] = {}  # exact edges (none below an approximate node)
        self.by_first: dict[int, list[_Node]] = {}  # first token -> children, for partial hits
        self.approx_children: dict[str, _Node] = {}  # approximate edges, and their index
        self.approx_by_first: dict[int, list[_Node]] = {}

    @property
    def parent(self) -> _Node | None:
        return None if self._parent is None else self._parent()

    def kids(self, approx: bool) -> tuple[dict[str, _Node], dict[int, list[_Node]]]:
        return ((self.approx_children, self.approx_by_first) if approx
                else (self.children, self.by_first))

    @property
    def has_children(self) -> bool:
        return bool(self.children or self.approx_children)


class PrefixMatch(NamedTuple):
    """The longest cached exact prefix: (entry, tokens used from it) per edge, in order; then,
    when asked for, the approximate tail that goes on from ``length``: (entry, offset, tokens)
    per edge, tokens entry.ids[offset : offset + tokens] at their own positions."""

    parts: tuple[tuple[KVEntry, int], ...]
    length: int  # exact tokens covered
    tail: tuple[tuple[KVEntry, int, int], ...] = ()

    @property
    def end(self) -> int:
        """Tokens covered, exact and approximate."""
        return self.length + sum(n for _, _, n in self.tail)


class StoreStats(NamedTuple):
    entries: int
    bytes: int
    capacity_bytes: int
    content_entries: int
    prefix_nodes: int
    pinned: int
    hits: int
    misses: int
    collisions: int
    evictions: int
    rejected: int
    prefix_lookups: int
    prefix_tokens: int
    approx_nodes: int  # approximate trie edges held
    approx_tokens: int  # tokens matched on them (prefix_tokens counts exact ones only)


class ChunkStore:
    """Byte-bounded LRU store of :class:`KVEntry` behind a content index and a prefix trie.

    Thread-safe (one internal lock). ``acquire``/``release`` (or ``pinned``) protect entries
    a request is using from eviction.
    """

    def __init__(self, cache_bytes: int):
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.capacity = int(cache_bytes)
        self._lock = threading.RLock()
        self._content: dict[str, KVEntry] = {}
        self._roots: dict[str, _Node] = {}
        self._lru: OrderedDict[int, KVEntry] = OrderedDict()  # held entries, oldest first
        self._bytes = 0
        self._nodes = 0
        self._hits = self._misses = self._collisions = 0
        self._evictions = self._rejected = 0
        self._prefix_lookups = self._prefix_tokens = 0
        self._approx_nodes = self._approx_tokens = 0

    # ---- content index -------------------------------------------------------------------
    def lookup(self, key: str, ids) -> KVEntry | None:
        """The entry stored under ``key`` if its token IDs equal ``ids``, else None.

        A present key with other IDs is a collision (or a corrupted entry): counted, missed.
        A hit becomes the most recently used entry.
        """
        ids = np.asarray(ids, dtype=np.int32)
        with self._lock:
            entry = self._content.get(key)
            if entry is None or not np.array_equal(entry.ids, ids):
                self._misses += 1
                self._collisions += entry is not None
                return None
            self._hits += 1
            self._touch(entry)
            return entry

    def put(self, key: str, entry: KVEntry) -> bool:
        """Index ``entry`` under ``key``; True if the key now maps to these token IDs.

        An existing entry with the same IDs is kept (and touched); one with other IDs is a
        collision and is kept too. Evicts LRU entries to make room; False if it cannot fit.
        """
        with self._lock:
            old = self._content.get(key)
            if old is not None:
                same = np.array_equal(old.ids, entry.ids)
                self._collisions += not same
                if same:
                    self._touch(old)
                return same
            if not self._hold(entry):
                return False
            entry.content_key = key
            self._content[key] = entry
            return True

    # ---- prefix trie ---------------------------------------------------------------------
    def match_prefix(self, namespace: str, ids, chunks: Sequence, *,
                     approximate: bool = False) -> PrefixMatch:
        """Longest exact cached prefix of ``ids``: a radix walk down the namespace's trie.

        Where a chunk (ChunkRef) starts, its key finds the edge, verified by token IDs;
        elsewhere, or on a miss, the child sharing the longest run of leading tokens is
        taken, and the walk goes on below it only if all its tokens matched. Touches every
        entry used.

        ``approximate``: also the approximate tail, walked the same way from the deepest node
        the exact walk reached whole, and kept where it goes past the exact prefix (the exact
        parts stay what they are without it).
        """
        ids = np.asarray(ids, dtype=np.int32)
        starts = {ref.start: ref for ref in chunks}
        with self._lock:
            self._prefix_lookups += 1
            root = self._roots.get(namespace)
            parts, covered, node, at = self._walk(root, ids, 0, starts, approx=False)
            tail: list[tuple[KVEntry, int, int]] = []
            if approximate and node is not None:
                approx, _, _, _ = self._walk(node, ids, at, starts, approx=True)
                pos = at
                for entry, used in approx:  # keep what lies past the exact prefix
                    off = max(0, covered - pos)
                    if off < used:
                        tail.append((entry, off, used - off))
                    pos += used
            for entry, _ in parts:
                self._touch(entry)
            for entry, _, n in tail:
                self._touch(entry)
                self._approx_tokens += n
            self._prefix_tokens += covered
        return PrefixMatch(tuple(parts), covered, tuple(tail))

    def _walk(self, node: _Node | None, ids: np.ndarray, covered: int, starts: dict,
              approx: bool) -> tuple[list[tuple[KVEntry, int]], int, _Node | None, int]:
        """Walk from ``node`` (at ``covered`` tokens) down its exact or approximate edges:
        (entry, tokens used) per edge, tokens covered, and the deepest node reached whole with
        the tokens it covers."""
        parts: list[tuple[KVEntry, int]] = []
        whole, at = node, covered
        while node is not None and covered < len(ids):
            children, by_first = node.kids(approx or node.approx)
            ref = starts.get(covered)
            child = children.get(ref.key) if ref is not None else None
            if child is not None:
                if np.array_equal(child.entry.ids, ids[ref.start : ref.end]):
                    parts.append((child.entry, len(child.entry)))
                    covered, node = ref.end, child
                    whole, at = node, covered
                    continue
                self._collisions += 1
            best, best_n = None, 0
            for cand in by_first.get(int(ids[covered]), ()):
                n = _common_prefix(cand.entry.ids, ids[covered:])
                if n > best_n:
                    best, best_n = cand, n
            if best is None:
                break
            parts.append((best.entry, best_n))
            covered += best_n
            node = best if best_n == len(best.entry) else None
            if node is not None:
                whole, at = node, covered
        return parts, covered, whole, at

    def insert_prefix(self, namespace: str, path: Iterable[tuple[str, KVEntry]], *,
                      approximate_from: int | None = None) -> int:
        """Extend the trie of ``namespace`` along ``path`` [(chunk key, entry)], from the root.

        Entries must tile the prefix from position 0; those before index ``approximate_from``
        (all when None) must be exactly computed, the rest are the approximate tail. Existing
        exact edges with the same IDs are followed (their entries kept); an existing
        approximate edge only if it holds this very entry (another approximation of the same
        tokens is not mixed into this path's). The walk stops there, at a collision or when
        an entry cannot fit. Returns the number of tokens the trie now covers.
        """
        with self._lock:
            node = self._roots.get(namespace)
            if node is None:
                node = self._roots[namespace] = _Node("", None, None)
            covered = 0
            for i, (key, entry) in enumerate(path):
                if entry.position != covered:
                    raise ValueError(f"prefix entry at {entry.position}, expected {covered}")
                approx = node.approx or (approximate_from is not None and i >= approximate_from)
                children, by_first = node.kids(approx)
                child = children.get(key)
                if child is None:
                    if entry.node is not None or not self._hold_below(node, entry):
                        break
                    child = _Node(key, entry, node, approx)
                    entry.node = child
                    children[key] = child
                    by_first.setdefault(int(entry.ids[0]), []).append(child)
                    self._nodes += 1
                    self._approx_nodes += approx
                elif approx and child.entry is not entry:
                    break
                elif not np.array_equal(child.entry.ids, entry.ids):
                    self._collisions += 1
                    break
                else:
                    self._touch(child.entry)
                node, covered = child, covered + len(entry)
            return covered

    # ---- pins ----------------------------------------------------------------------------
    def acquire(self, entries: Iterable[KVEntry]) -> None:
        """Pin entries: never evicted until released."""
        with self._lock:
            for e in entries:
                e.refs += 1

    def release(self, entries: Iterable[KVEntry]) -> None:
        with self._lock:
            for e in entries:
                if e.refs <= 0:
                    raise RuntimeError("release of an entry that is not pinned")
                e.refs -= 1

    @contextmanager
    def pinned(self, entries: Iterable[KVEntry]) -> Iterator[list[KVEntry]]:
        held = list(entries)
        self.acquire(held)
        try:
            yield held
        finally:
            self.release(held)

    # ---- bookkeeping ---------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every entry from both indexes (pinned ones live on with their holders)."""
        with self._lock:
            for e in self._lru.values():
                e.content_key, e.node = None, None
            self._content.clear()
            self._roots.clear()
            self._lru.clear()
            self._bytes = self._nodes = self._approx_nodes = 0

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                entries=len(self._lru),
                bytes=self._bytes,
                capacity_bytes=self.capacity,
                content_entries=len(self._content),
                prefix_nodes=self._nodes,
                pinned=sum(e.refs > 0 for e in self._lru.values()),
                hits=self._hits,
                misses=self._misses,
                collisions=self._collisions,
                evictions=self._evictions,
                rejected=self._rejected,
                prefix_lookups=self._prefix_lookups,
                prefix_tokens=self._prefix_tokens,
                approx_nodes=self._approx_nodes,
                approx_tokens=self._approx_tokens,
            )

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._content

    def _touch(self, entry: KVEntry) -> None:
        self._lru.move_to_end(id(entry))

    def _hold(self, entry: KVEntry) -> bool:
        """Account an entry that an index is about to hold, evicting to make room."""
        if id(entry) in self._lru:
            self._touch(entry)
            return True
        need = entry.nbytes
        if need > self.capacity or not self._make_room(need):
            self._rejected += 1
            return False
        self._lru[id(entry)] = entry
        self._bytes += need
        return True

    def _hold_below(self, node: _Node, entry: KVEntry) -> bool:
        """``_hold`` for an entry about to hang below ``node``: the room is never made by
        evicting ``node`` itself (a leaf until then), which would leave the new edge under a
        node no longer in the trie."""
        if node.entry is None:  # the root: not an entry, never evicted
            return self._hold(entry)
        node.entry.refs += 1
        try:
            return self._hold(entry)
        finally:
            node.entry.refs -= 1

    def _make_room(self, need: int) -> bool:
        while self._bytes + need > self.capacity:
            victim = next(
                (e for e in self._lru.values() if e.refs == 0 and not (e.node and e.node.has_children)),
                None,
            )
            if victim is None:
                return False
            self._drop(victim)
            self._evictions += 1
        return True

    def _drop(self, entry: KVEntry) -> None:
        if entry.content_key is not None:
            del self._content[entry.content_key]
            entry.content_key = None
        node = entry.node
        if node is not None:
            children, by_first = node.parent.kids(node.approx)
            del children[node.key]
            siblings = by_first[int(entry.ids[0])]
            siblings.remove(node)
            if not siblings:
                del by_first[int(entry.ids[0])]
            entry.node = None
            self._nodes -= 1
            self._approx_nodes -= node.approx
        del self._lru[id(entry)]
        self._bytes -= entry.nbytes


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n
