"""IrminsulRadixCache: SGLang 0.5.23's UnifiedRadixCache plus position-independent content hits.

Imports SGLang: loaded only by the factory plugin.py registers, i.e. only when the server runs
with ``--radix-cache-backend irminsul``. The request path (file and function names are
SGLang's, see DESIGN.md):

1. ``match_prefix`` (scheduler: ``Req.init_next_round_input`` -> ``match_kv_cache``): SGLang's
   own radix match first; then the shared planner (``make_plan`` over :class:`PlannerView`)
   finds content hits in the request's prompt, and :func:`first_run` keeps those SGLang can
   take (right after the exact prefix). They are reported as ``host_hit_length`` so the
   PrefillAdder budgets them as it budgets a HiCache load.
2. ``init_load_back`` (``PrefillAdder``, once admitted): the sources are re-found in the tree
   and locked, slots are allocated (evicting like any allocation), c_KV copied and k_pe
   δ-rotated into them (kernels/materialize.py: torch on CPU, Triton on CUDA), and the
   request is barred from the tree (``skip_radix_cache_insert``): composed KV never becomes an
   exact radix key. ``already_computed`` is seeded with the placed length so SGLang's
   ``cached_tokens`` stays the exact prefix (SGLang seeds it the same way for PD decode).
3. ``prefix_device_indices`` appends the placed slots after the tree path; SGLang writes them
   into the request's row and frees them on release (they are past ``cache_protected_len``).
4. ``checkpoint`` (an exact request published into the tree) records its prompt's chunks in
   the :class:`SlotIndex`: the site of each chunk is the prompt prefix whose tree path holds
   its slots, so eviction stays SGLang's.
"""

from __future__ import annotations

import logging
from array import array
from typing import Any, NamedTuple

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InitLoadBackParams,
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
    """One request's planned (and, once ``slots`` is set, placed) run."""

    exact_len: int
    run: Run
    counts: ReuseCounts
    slots: torch.Tensor | None = None


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
        flow = self._flows.get(req.rid)
        if flow is not None and flow.slots is not None:
            # Matched again after its load (a retry): the placed slots are still the
            # request's, appended by prefix_device_indices.
            if result.device_prefix_len != flow.exact_len:
                return result
            return result._replace(device_prefix_len=flow.exact_len + flow.run.length)
        self._flows.pop(req.rid, None)
        flow = self._plan(req, result.device_prefix_len, len(params.key))
        if flow is None:
            return result
        self._flows[req.rid] = flow
        return result._replace(
            last_host_node=result.last_device_node,
            best_match_node=result.last_device_node,
            host_hit_length=flow.run.length,
            full_kv_hit_length=max(result.full_kv_hit_length, flow.run.end),
        )

    def init_load_back(self, params: InitLoadBackParams):
        req = params.req
        flow = self._flows.get(req.rid) if req is not None else None
        if flow is None:
            return super().init_load_back(params)
        if flow.slots is not None:
            return 0, params.best_match_node
        slots = self._place(flow)
        if slots is None:  # a source was evicted, or no room: the request computes them
            self._flows.pop(req.rid, None)
            return 0, params.best_match_node
        self._flows[req.rid] = flow._replace(slots=slots)
        req.skip_radix_cache_insert = True
        req.already_computed = flow.run.length
        setattr(req, REQ_COUNTS_ATTR, flow.counts)
        return flow.run.length, params.best_match_node

    def load_back_is_cache_owned(self) -> bool:
        # Placed slots are the request's: cache_protected_len stays at the exact prefix, so
        # release_kv_cache frees them with the rest of the row.
        return False

    def prefix_device_indices(self, req) -> torch.Tensor:
        flow = self._flows.get(req.rid)
        if flow is None or flow.slots is None:
            return super().prefix_device_indices(req)
        root = self.root_node_handle(req.extra_key)
        path = self.tree_core.collect_full_device_indices(req.last_node, root)
        assert len(path) >= flow.exact_len, (req.rid, len(path), flow.exact_len)
        indices = torch.cat([path[: flow.exact_len], flow.slots.to(path.device, path.dtype)])
        assert len(indices) >= req.prefix_len, (req.rid, len(indices), req.prefix_len)
        return indices[: req.prefix_len]

    def checkpoint(self, req, *, up_to: int, **kwargs) -> None:
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
        self._flows.pop(req.rid, None)
        self._recorded.discard(req.rid)
        self._chunk_memo.pop(req.rid, None)

    # ---- planning and placement --------------------------------------------------------------
    def _chunks(self, req, prompt: np.ndarray, scope) -> tuple:
        # A waiting request is matched again every scheduling round: chunk its prompt once.
        cached = self._chunk_memo.get(req.rid)
        if cached is not None and cached[0] == len(prompt):
            return cached[1]
        ann = annotation_from_kv_hints(getattr(req, "kv_hints", None))
        if ann is not None and not ann.matches(prompt):
            ann = None  # made for other tokens: chunk the request's own IDs
        # Keys carry SGLang's isolation (extra_key, cache_salt) and the proxy's tenant.
        namespace = "\x1f".join((ann.namespace if ann else "", str(scope[0]), str(scope[1])))
        chunks = self._chunker.split(prompt, anchors=ann.anchors if ann else (),
                                     namespace=namespace)
        self._chunk_memo[req.rid] = (len(prompt), chunks)
        return chunks

    def _plan(self, req, exact_len: int, key_len: int) -> _Flow | None:
        prompt = np.asarray(req.origin_input_ids, dtype=np.int32)
        if len(prompt) < 2 or exact_len % self.page_size:
            return None
        scope = (req.extra_key, req.cache_salt)
        ann = annotation_from_kv_hints(getattr(req, "kv_hints", None))
        policy = self._config.policy
        if ann is not None and ann.policy in ("full", "prefix"):
            return None
        view = PlannerView(self._index, scope, min(exact_len, len(prompt)), self._resident)
        self._residency: dict[int, tuple] = {}  # per plan: tree walks are not free
        try:
            plan = make_plan(view, prompt, self._chunks(req, prompt, scope), policy=policy,
                             args=PolicyArgs(k=self._config.pic_k))
        finally:
            self._residency = {}
        run = first_run(plan, limit=min(key_len, len(prompt) - 1), page_size=self.page_size)
        if run.length == 0:
            return None
        return _Flow(exact_len, run, run_counts(plan, run))

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
