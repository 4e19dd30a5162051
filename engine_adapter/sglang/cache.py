"""IrminsulRadixCache: SGLang 0.5.23's UnifiedRadixCache plus position-independent content hits.

Imports SGLang: loaded only by the factory plugin.py registers, i.e. only when the server runs
with ``--radix-cache-backend irminsul``. The request path (file and function names are
SGLang's, see DESIGN.md):

1. ``match_prefix`` (scheduler: ``Req.init_next_round_input`` -> ``match_kv_cache``): SGLang's
   own radix match first (exact KV, the request's ``extra_key``); then, from the end of that
   exact prefix, the request's tokens matched in the same tree under a derived key
   (composed.py: composed KV an earlier request left there); then the shared planner
   (``make_plan`` over :class:`PlannerView`) finds content hits, and :func:`first_run` keeps
   those SGLang can take (right after what is matched). Composed tokens and the run are
   reported as ``host_hit_length`` so the PrefillAdder budgets them like a HiCache load.
2. ``init_load_back`` (``PrefillAdder``, once admitted): the composed-tree node is matched
   again and locked (our lock, released in ``on_release``); the run's sources are re-found
   and locked, slots allocated (evicting like any allocation), c_KV copied and k_pe
   δ-rotated into them (kernels/materialize.py: torch on CPU, Triton on CUDA).
   ``cache_protected_len`` becomes exact + composed (tree-owned), ``already_computed`` the
   served length, so SGLang's ``cached_tokens`` stays the exact prefix.
3. ``prefix_device_indices``: exact path, composed path, placed slots.
4. ``checkpoint``: an exact request is inserted by SGLang and its prompt's chunks recorded in
   the :class:`SlotIndex` (sites are tree paths, so eviction stays SGLang's). A composed
   request (one that was served anything past its exact prefix) is inserted from its exact
   prefix on under the derived key only (``_checkpoint_composed``): composed KV never becomes
   an exact radix key, yet the next turn of the conversation matches it.
"""

from __future__ import annotations

import dataclasses
import logging
from array import array
from typing import Any, NamedTuple

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InitLoadBackParams,
    InsertParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from ...chunking.keys import Chunker
from ...kernels.materialize import materialize_indexed
from ...kernels.rope import RopeSpec
from ..contract import ReuseCounts
from ..embedded.planner import PolicyArgs, make_plan
from .composed import composed_key, is_composed_key, new_secret
from .config import SGLangReuseConfig
from .hints import annotation_from_kv_hints
from .matching import ChunkSite, PlannerView, SlotIndex
from .placement import Run, first_run, run_counts

log = logging.getLogger(__name__)

REQ_COUNTS_ATTR = "irminsul_reuse"  # ReuseCounts set on a Req whose prefill placed content
DETAILS_TARGET = ("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
                  ".get_cached_tokens_details")


def reuse_details(details: dict | None, streamer: Any, req: Any) -> dict | None:
    """AFTER hook on ``DETAILS_TARGET`` (installed by the factory): adds the request's
    ReuseCounts as ``cached_tokens_details["irminsul"]``, which /generate returns as
    ``meta_info.cached_tokens_details.irminsul``. Requests without placed content, and every
    request of a server without this backend, are left as SGLang made them."""
    counts = getattr(req, REQ_COUNTS_ATTR, None)
    if counts is None:
        return details
    out = dict(details) if details else {"device": req.cached_tokens, "host": 0}
    out["irminsul"] = counts.to_json()
    return out


class _Flow(NamedTuple):
    """One request's plan (and, once ``slots`` is set, what it was served): the exact prefix
    [0, exact_len), then composed KV [exact_len, exact_len + composed_len) matched in SGLang's
    tree under ``composed_key``, then the placed ``run``. A loaded flow is *composed*: its
    tokens past the exact prefix go into the tree under ``composed_key``, never the exact key."""

    exact_len: int
    composed_key: str
    composed_len: int
    run: Run
    counts: ReuseCounts
    slots: torch.Tensor | None = None  # the run's private slots, once placed (may be empty)
    node: Any = None  # composed-tree node ending the tree-owned part past exact_len
    lock: Any = None  # our TreeLock on ``node`` (req.lock holds the exact prefix)
    inserted: int = 0  # composed-tree tokens this request inserted, from exact_len

    @property
    def served(self) -> int:
        """Tokens past the exact prefix whose KV the request did not compute."""
        return self.composed_len + self.run.length


class IrminsulRadixCache(UnifiedRadixCache):
    """UnifiedRadixCache whose misses after the exact prefix may be content hits."""

    def __init__(self, params, *args: Any, **kwargs: Any):
        # UnifiedRadixCache.__init__ calls reset(), which clears our state: define it first.
        self._config: SGLangReuseConfig | None = None
        self._index: SlotIndex | None = None
        self._flows: dict[str, _Flow] = {}
        self._recorded: set[str] = set()
        self._residency: dict[int, tuple] = {}
        self._chunk_memo: dict[str, tuple] = {}  # rid -> (prompt length, chunks)
        super().__init__(params, *args, **kwargs)

    def attach(self, config: SGLangReuseConfig, spec: RopeSpec, pool: MLATokenToKVPool) -> None:
        """Turn content reuse on over ``pool`` (rotary as ``spec``); without it this class is
        SGLang's radix cache."""
        if not isinstance(pool, MLATokenToKVPool) or type(pool) is not MLATokenToKVPool:
            raise ValueError("irminsul needs SGLang's MLATokenToKVPool (an MLA model with a "
                             f"bf16/fp16/fp32 KV cache); got {type(pool).__name__}")
        if pool.store_dtype != pool.dtype or pool.use_dsa:
            raise ValueError("irminsul cannot rotate a quantised or DSA MLA cache "
                             f"(store dtype {pool.store_dtype}, dsa={pool.use_dsa})")
        if spec.dim != pool.qk_rope_head_dim:
            raise ValueError(f"rope dim {spec.dim} != pool qk_rope_head_dim "
                             f"{pool.qk_rope_head_dim}")
        self._config, self._spec, self._pool = config, spec, pool
        self._chunker = Chunker(config.chunker)
        self._index = SlotIndex(config.max_prompts)
        self._secret = new_secret()  # composed.py: keys no client can name

    @property
    def reuse_enabled(self) -> bool:
        return self._index is not None and self._config.policy != "prefix" and not self.disable

    # ---- SGLang's interface ------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._flows.clear()
        self._recorded.clear()
        self._chunk_memo.clear()
        if self._index is not None:
            self._index = SlotIndex(self._config.max_prompts)

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        req = params.req
        if req is None or not self.reuse_enabled or result.host_hit_length:
            return result
        session = getattr(req, "session", None)
        if session is not None and getattr(session, "streaming", False):
            return result  # a streaming session keeps the row: no checkpoint, no release
        if is_composed_key(req.extra_key):
            return result  # never compose on top of a namespace that looks like ours
        flow = self._flows.get(req.rid)
        if flow is not None and flow.slots is not None:
            # Matched again after its load (a retry): the served slots are still the
            # request's row, appended by prefix_device_indices.
            if result.device_prefix_len != flow.exact_len:
                return result
            return result._replace(device_prefix_len=flow.exact_len + flow.served,
                                   cache_protected_len=req.kv.cache_protected_len)
        self._flows.pop(req.rid, None)
        flow = self._plan(req, result.device_prefix_len, params.key)
        if flow is None:
            return result
        self._flows[req.rid] = flow
        return result._replace(
            last_host_node=result.last_device_node,
            best_match_node=result.last_device_node,
            host_hit_length=flow.served,
            full_kv_hit_length=max(result.full_kv_hit_length, flow.exact_len + flow.served),
        )

    def init_load_back(self, params: InitLoadBackParams):
        req = params.req
        flow = self._flows.get(req.rid) if req is not None else None
        if flow is None:
            return super().init_load_back(params)
        if flow.slots is not None:
            return 0, params.best_match_node
        node = lock = None
        if flow.composed_len:
            # Matched again and locked first: our own allocation below may evict.
            n, node = self._match_composed(flow.composed_key, req, req.full_untruncated_fill_ids,
                                           flow.exact_len, flow.exact_len + flow.composed_len)
            if n < flow.composed_len:  # evicted since match_prefix: the request computes
                self._flows.pop(req.rid, None)
                return 0, params.best_match_node
            lock = self.lock(node)
        slots = self._place(flow) if flow.run.length else torch.empty(0, dtype=torch.int64)
        if slots is None:  # a source was evicted, or no room: the request computes them
            self.unlock(lock)
            self._flows.pop(req.rid, None)
            return 0, params.best_match_node
        self._flows[req.rid] = flow._replace(slots=slots, node=node, lock=lock)
        # The composed tree owns [exact_len, exact_len + composed_len) of the row (we hold
        # its lock); the placed run is the request's, freed on release unless checkpointed.
        # load_back_is_cache_owned() is False, so the scheduler leaves this value alone.
        req.kv.cache_protected_len = flow.exact_len + flow.composed_len
        req.already_computed = flow.served  # SGLang's cached_tokens stays the exact prefix
        setattr(req, REQ_COUNTS_ATTR, flow.counts)
        return flow.served, params.best_match_node

    def load_back_is_cache_owned(self) -> bool:
        # Placed slots are the request's: cache_protected_len is set by init_load_back (the
        # exact prefix plus the composed-tree part), so release_kv_cache frees the run.
        return False

    def prefix_device_indices(self, req) -> torch.Tensor:
        flow = self._flows.get(req.rid)
        if flow is None or flow.slots is None:
            return super().prefix_device_indices(req)
        root = self.root_node_handle(req.extra_key)
        path = self.tree_core.collect_full_device_indices(req.last_node, root)
        assert len(path) >= flow.exact_len, (req.rid, len(path), flow.exact_len)
        parts = [path[: flow.exact_len]]
        if flow.composed_len:
            composed = self.tree_core.collect_full_device_indices(flow.node, root)
            assert len(composed) >= flow.composed_len, (req.rid, len(composed))
            parts.append(composed[: flow.composed_len].to(path.dtype))
        parts.append(flow.slots.to(path.device, path.dtype))
        indices = torch.cat(parts)
        assert len(indices) >= req.prefix_len, (req.rid, len(indices), req.prefix_len)
        return indices[: req.prefix_len]

    def checkpoint(self, req, *, up_to: int, **kwargs) -> None:
        flow = self._flows.get(req.rid)
        if flow is not None and flow.slots is not None:
            self._checkpoint_composed(req, flow, up_to)  # never under the exact key
            return
        super().checkpoint(req, up_to=up_to, **kwargs)
        if not self.reuse_enabled or req.rid in self._recorded:
            return
        prompt = np.asarray(req.origin_input_ids, dtype=np.int32)
        covered = min(up_to, len(prompt)) // self.page_size * self.page_size
        if covered < len(prompt) and not req.finished():
            return  # record once, when the whole prompt is in the tree (or at the end)
        self._recorded.add(req.rid)
        scope = (req.extra_key, req.cache_salt)
        self._index.record(prompt, self._chunks(req, prompt, scope), covered, scope)

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        flow = self._flows.pop(req.rid, None)
        if flow is not None and flow.lock is not None:
            self.unlock(flow.lock)
        self._recorded.discard(req.rid)
        self._chunk_memo.pop(req.rid, None)

    # ---- planning and placement --------------------------------------------------------------
    def _annotation(self, req, prompt: np.ndarray):
        ann = annotation_from_kv_hints(getattr(req, "kv_hints", None))
        if ann is not None and not ann.matches(prompt):
            return None  # made for other tokens: chunk the request's own IDs
        return ann

    def _chunks(self, req, prompt: np.ndarray, scope) -> tuple:
        # A waiting request is matched again every scheduling round: chunk its prompt once.
        cached = self._chunk_memo.get(req.rid)
        if cached is not None and cached[0] == len(prompt):
            return cached[1]
        ann = self._annotation(req, prompt)
        # Keys carry SGLang's isolation (extra_key, cache_salt) and the proxy's tenant.
        namespace = "\x1f".join((ann.namespace if ann else "", str(scope[0]), str(scope[1])))
        chunks = self._chunker.split(prompt, anchors=ann.anchors if ann else (),
                                     namespace=namespace)
        self._chunk_memo[req.rid] = (len(prompt), chunks)
        return chunks

    def _plan(self, req, exact_len: int, key: RadixKey) -> _Flow | None:
        prompt = np.asarray(req.origin_input_ids, dtype=np.int32)
        if len(prompt) < 2 or exact_len % self.page_size:
            return None
        scope = (req.extra_key, req.cache_salt)
        ann = self._annotation(req, prompt)
        if ann is not None and ann.policy in ("full", "prefix"):
            return None
        limit = min(len(key), len(prompt) - 1)
        ids = key.token_ids
        ckey = composed_key(self._secret, req.extra_key, req.cache_salt,
                            ann.namespace if ann else "", ids[:exact_len])
        # Composed KV first: it continues the exact prefix, keyed from its end.
        composed_len, _ = self._match_composed(ckey, req, ids, exact_len, limit)
        start = exact_len + composed_len
        view = PlannerView(self._index, scope, min(start, len(prompt)), self._resident)
        self._residency: dict[int, tuple] = {}  # per plan: tree walks are not free
        try:
            plan = make_plan(view, prompt, self._chunks(req, prompt, scope),
                             policy=self._config.policy, args=PolicyArgs(k=self._config.pic_k))
        finally:
            self._residency = {}
        run = first_run(plan, limit=limit, page_size=self.page_size)
        if run.length == 0 and composed_len == 0:
            return None
        counts = run_counts(plan, run)
        if composed_len:  # the planner saw them as prefix; they are reused, not exact
            counts = dataclasses.replace(
                counts, exact_prefix_tokens=exact_len,
                reused_tokens=counts.reused_tokens + composed_len)
        return _Flow(exact_len, ckey, composed_len, run, counts)

    def _match_composed(self, ckey: str, req, ids, start: int, stop: int) -> tuple[int, Any]:
        """(tokens, node) of ``ids[start:stop]`` held in the tree under ``ckey``. The token
        IDs are compared by SGLang's own match: composed KV is served for these tokens only."""
        if stop <= start or self.tree_core.is_eagle:
            return 0, None
        key = RadixKey(ids[start:stop], ckey, cache_salt=req.cache_salt)
        # _match_tree, not match_prefix: no session shortcut, and no rank_consensus on a key
        # that holds this rank's secret.
        match = self._match_tree(MatchPrefixParams(key=key))
        return match.device_prefix_len, match.last_device_node

    def _checkpoint_composed(self, req, flow: _Flow, up_to: int) -> None:
        """checkpoint_into_tree for a composed request: insert its row [exact_len, up_to)
        under ``flow.composed_key``, repoint the row at the tree's copy (duplicates are freed
        by SGLang's insert), move our lock to the node it ended on, advance
        cache_protected_len. req.lock (the exact prefix) and req.last_node stay."""
        p = flow.exact_len
        ids = req.full_untruncated_fill_ids[:up_to]
        if len(ids) <= p:
            return
        key = RadixKey(ids[p:], flow.composed_key, cache_salt=req.cache_salt)
        key = key.page_aligned(self.page_size)
        n, protected = len(key), req.kv.cache_protected_len - p
        if n <= protected:
            return
        row = req.kv.req_pool_idx
        values = self.req_to_token_pool.req_to_token[row, p : p + n].to(torch.int64, copy=True)
        result = self.insert(InsertParams(
            key=key, value=values, prev_prefix_len=protected, inserted_len=flow.inserted,
            priority=req.priority or 0, rotation_base=req.kv_rotation_base))
        if result.rotation_tail_declined:
            return  # the row stays the request's, freed on release
        path = self.tree_core.collect_full_device_indices(result.last_device_node,
                                                          self.root_node_handle())
        assert len(path) == n, (req.rid, len(path), n)
        self.req_to_token_pool.write((row, slice(p + protected, p + n)), path[protected:])
        lock = self.lock(result.last_device_node)
        self.unlock(flow.lock)
        req.kv.cache_protected_len = p + n
        self._flows[req.rid] = flow._replace(node=result.last_device_node, lock=lock,
                                             inserted=max(flow.inserted, n))

    def _site_path(self, site: ChunkSite):
        """(tree node, slots) of the longest part of the site's recorded prompt SGLang still
        holds. Matched on the whole prompt (page aligned when recorded): a key cut at the
        chunk's end would be floored to a page by a paged tree."""
        extra_key, cache_salt = site.scope
        key = RadixKey(array("q", site.prompt.ids.tolist()), extra_key, cache_salt=cache_salt)
        match = UnifiedRadixCache.match_prefix(self, MatchPrefixParams(key=key))
        node = match.last_device_node
        path = self.tree_core.collect_full_device_indices(node, self.root_node_handle(extra_key))
        return node, path[: match.device_prefix_len]

    def _resident(self, site: ChunkSite) -> int:
        """Tokens of the site's prompt SGLang holds; one tree walk per prompt per plan."""
        memo = self._residency
        if id(site.prompt) not in memo:
            memo[id(site.prompt)] = (site.prompt, len(self._site_path(site)[1]))
        return memo[id(site.prompt)][1]

    def _place(self, flow: _Flow) -> torch.Tensor | None:
        """Allocate the run's slots and fill them; None (nothing held) if it cannot."""
        locks, src_slots, src_pos = [], [], []
        try:
            for seg in flow.run.segments:
                node, path = self._site_path(seg.site)
                if len(path) < seg.site.end:  # evicted since match_prefix
                    self._index.forget(seg.site, len(path))
                    return None
                locks.append(self.lock(node))  # no eviction of the source while we copy
                src_slots.append(path[seg.src_position : seg.src_position + seg.length])
                src_pos.append(torch.arange(seg.src_position, seg.src_position + seg.length))
            slots = self._alloc(flow.run.length)
            if slots is None:
                return None
            dst_pos = torch.arange(flow.run.start, flow.run.end)
            self._materialize(torch.cat(src_slots), torch.cat(src_pos), slots, dst_pos)
            return slots
        finally:
            for lock in locks:
                self.unlock(lock)

    def _alloc(self, n: int) -> torch.Tensor | None:
        allocator = self.token_to_kv_pool_allocator
        if allocator.available_size() < n:
            self.evict(EvictParams(num_tokens=n))
        return allocator.alloc(n)

    def _materialize(self, src_slots, src_pos, dst_slots, dst_pos) -> None:
        pool, rank = self._pool, self._pool.kv_lora_rank
        dev = pool.kv_buffer[0].device  # move the indexes once, not once per layer
        src_slots, src_pos, dst_slots, dst_pos = (
            t.to(dev, torch.int64) for t in (src_slots, src_pos, dst_slots, dst_pos))
        for buf in pool.kv_buffer:  # one [size + page, 1, rank + rope] tensor per layer
            flat = buf[:, 0, :]
            ckv, kpe = flat[:, :rank].unsqueeze(0), flat[:, rank:].unsqueeze(0)
            materialize_indexed(ckv, kpe, src_slots, src_pos, ckv, kpe, dst_slots, dst_pos,
                                self._spec)
