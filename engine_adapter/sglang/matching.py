"""Where a chunk's exact KV sits in SGLang's radix tree: the content index of the plugin.

No SGLang import, no tensors. SGLang owns every KV slot; this index owns none. It remembers,
per chunk key, a *site*: the token IDs of a prompt SGLang inserted into its exact radix tree,
and which tokens [start, end) of it are the chunk. The slots are found again, when a later
request hits the chunk, by matching that prompt prefix in the tree (cache.py); if SGLang has
evicted them the site is stale and is forgotten. Eviction therefore stays SGLang's alone.

:class:`PlannerView` gives the embedded engine's planner (engine_adapter/embedded/planner.py,
``make_plan``) the store face it reads, so both engines plan with the same code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from ..contract import ChunkRef
from ..embedded.store import PrefixMatch

Scope = tuple[str, str]  # (extra_key, cache_salt): SGLang's isolation of radix trees


class _Prompt:
    """Token IDs of one exactly cached prompt, shared by all its chunk sites."""

    __slots__ = ("ids", "keys", "scope")

    def __init__(self, ids: np.ndarray, scope: Scope):
        self.ids = ids
        self.scope = scope
        self.keys: list[str] = []


class ChunkSite:
    """Chunk tokens prompt.ids[start:end], exact KV computed at positions start..end-1."""

    __slots__ = ("end", "prev_key", "prompt", "start")

    def __init__(self, prompt: _Prompt, start: int, end: int, prev_key: str | None):
        self.prompt, self.start, self.end, self.prev_key = prompt, start, end, prev_key

    @property
    def ids(self) -> np.ndarray:
        return self.prompt.ids[self.start : self.end]

    @property
    def position(self) -> int:
        return self.start

    @property
    def scope(self) -> Scope:
        return self.prompt.scope

    def prefix_ids(self) -> np.ndarray:
        """The prompt up to the chunk's end: the radix key whose path holds its slots."""
        return self.prompt.ids[: self.end]

    def __len__(self) -> int:
        return self.end - self.start


class IndexStats(NamedTuple):
    prompts: int
    chunks: int
    hits: int
    misses: int
    stale: int


class SlotIndex:
    """chunk key -> :class:`ChunkSite`, bounded by ``max_prompts`` (oldest prompt dropped)."""

    def __init__(self, max_prompts: int = 4096):
        if max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
        self.max_prompts = max_prompts
        self._sites: dict[str, ChunkSite] = {}
        self._prompts: OrderedDict[int, _Prompt] = OrderedDict()
        self._hits = self._misses = self._stale = 0

    def record(self, ids, chunks: Sequence[ChunkRef], covered: int, scope: Scope) -> int:
        """Remember the chunks of ``ids`` that end within the first ``covered`` tokens (the
        part SGLang now holds exactly in its tree under ``scope``). Returns how many."""
        arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int32)[:covered])
        prompt = _Prompt(arr, scope)
        prev: str | None = None
        for ref in chunks:
            if ref.end > covered:
                break
            self._sites[ref.key] = ChunkSite(prompt, ref.start, ref.end, prev)
            prompt.keys.append(ref.key)
            prev = ref.key
        if not prompt.keys:
            return 0
        self._prompts[id(prompt)] = prompt
        while len(self._prompts) > self.max_prompts:
            _, old = self._prompts.popitem(last=False)
            for key in old.keys:
                site = self._sites.get(key)
                if site is not None and site.prompt is old:
                    del self._sites[key]
        return len(prompt.keys)

    def lookup(self, key: str, ids, scope: Scope) -> ChunkSite | None:
        """The site of ``key`` if it is in ``scope`` and holds exactly ``ids``."""
        site = self._sites.get(key)
        if site is None or site.scope != scope or not np.array_equal(
            site.ids, np.asarray(ids, dtype=np.int32)
        ):
            self._misses += 1
            return None
        self._hits += 1
        self._prompts.move_to_end(id(site.prompt), last=True)
        return site

    def forget(self, site: ChunkSite, resident: int = 0) -> None:
        """SGLang now holds only the first ``resident`` tokens of the site's prompt (it evicts
        leaves, i.e. tails): drop the prompt's chunks that end past them."""
        self._stale += 1
        prompt = site.prompt
        kept = []
        for key in prompt.keys:
            current = self._sites.get(key)
            if current is None or current.prompt is not prompt:
                continue
            if current.end > resident:
                del self._sites[key]
            else:
                kept.append(key)
        prompt.keys = kept
        if not kept:
            self._prompts.pop(id(prompt), None)

    def __contains__(self, key: str) -> bool:
        return key in self._sites

    def stats(self) -> IndexStats:
        return IndexStats(len(self._prompts), len(self._sites), self._hits, self._misses,
                          self._stale)


class PlannerView:
    """The ChunkStore face ``make_plan`` reads, over SGLang's tree and a :class:`SlotIndex`.

    ``match_prefix`` answers SGLang's own radix match (``exact_len`` tokens, already made);
    ``lookup`` answers index hits in ``scope`` whose slots are still in the tree:
    ``resident(site)`` says how many tokens of the site's prompt SGLang holds; a site past
    them is forgotten and missed. Pins are SGLang's tree locks,
    taken when slots are read (cache.py), so acquire/release have nothing to do.
    """

    def __init__(self, index: SlotIndex, scope: Scope, exact_len: int,
                 resident: Callable[[ChunkSite], int]):
        self.index, self.scope, self.exact_len, self.resident = index, scope, exact_len, resident

    def match_prefix(self, namespace: str, ids, chunks) -> PrefixMatch:
        return PrefixMatch((), self.exact_len)

    def lookup(self, key: str, ids) -> ChunkSite | None:
        site = self.index.lookup(key, ids, self.scope)
        if site is None:
            return None
        held = self.resident(site)
        if held < site.end:
            self.index.forget(site, held)
            return None
        return site

    def acquire(self, entries) -> None:
        pass

    def release(self, entries) -> None:
        pass
