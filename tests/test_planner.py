"""The reuse planner: token sources, placements, counts and pins for every policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from irminsul.chunking.keys import chunk_key
from irminsul.engine_adapter.contract import ChunkRef
from irminsul.engine_adapter.embedded.planner import (
    NEW,
    PREFIX,
    RECOMPUTED,
    REUSED,
    PolicyArgs,
    make_plan,
    policy_args,
)
from irminsul.engine_adapter.embedded.store import ChunkStore, KVEntry

SPANS = [(0, 8), (8, 16), (16, 24), (24, 32)]


def chunks_of(ids, spans=SPANS) -> list[ChunkRef]:
    return [ChunkRef(chunk_key(ids[s:e]), s, e) for s, e in spans]


def entry(ids, position) -> KVEntry:
    z = torch.zeros(2, len(ids), 4)
    return KVEntry(ids, position, z, z.clone())


@pytest.fixture
def prompt():
    return np.arange(1000, 1032, dtype=np.int32)


def store_with(prompt, content=(), prefix=0) -> ChunkStore:
    """A store holding the chunks numbered in ``content`` (computed at position 100) and a
    prefix trie over the first ``prefix`` chunks."""
    store = ChunkStore(1 << 20)
    refs = chunks_of(prompt)
    for i in content:
        r = refs[i]
        store.put(r.key, entry(prompt[r.start : r.end], 100 + r.start))
    store.insert_prefix("", [(r.key, entry(prompt[r.start : r.end], r.start))
                             for r in refs[:prefix]])
    return store


def test_full_computes_everything(prompt):
    store = store_with(prompt, content=range(4), prefix=4)
    plan = make_plan(store, prompt, chunks_of(prompt), policy="full", args=PolicyArgs())
    assert (plan.source == NEW).all() and plan.compute.tolist() == list(range(32))
    c = plan.counts
    assert (c.new_tokens, c.exact_prefix_tokens, c.reused_tokens, c.chunks_hit) == (32, 0, 0, 0)


def test_prefix_uses_exact_prefix_and_recomputes_last_token(prompt):
    store = store_with(prompt, content=range(4), prefix=2)
    plan = make_plan(store, prompt, chunks_of(prompt), policy="prefix", args=PolicyArgs())
    assert (plan.source[:16] == PREFIX).all() and (plan.source[16:] == NEW).all()
    assert plan.counts.exact_prefix_tokens == 16 and plan.counts.chunks_hit == 2
    store.release(plan.entries)
    full = store_with(prompt, prefix=4)
    plan = make_plan(full, prompt, chunks_of(prompt), policy="prefix", args=PolicyArgs())
    # The whole prompt is cached, but its last token's logits are needed: it is computed.
    assert plan.prefix_len == 31 and plan.source[31] == RECOMPUTED
    assert plan.compute.tolist() == [31]
    assert (plan.counts.exact_prefix_tokens, plan.counts.recomputed_tokens) == (31, 1)


@pytest.mark.parametrize("k", [0, 3, 8, 100])
def test_pic_places_hits_and_recomputes_first_k(prompt, k):
    store = store_with(prompt, content=[1, 2], prefix=1)
    plan = make_plan(store, prompt, chunks_of(prompt), policy="pic", args=PolicyArgs(k=k))
    src = plan.source
    assert (src[:8] == PREFIX).all() and (src[24:] == NEW).all()
    for s in (8, 16):
        kk = min(k, 8)
        assert (src[s : s + kk] == RECOMPUTED).all() and (src[s + kk : s + 8] == REUSED).all()
    assert [(p.start, p.offset, p.length, p.entry.position) for p in plan.placements] == [
        (8, 0, 8, 108), (16, 0, 8, 116)]
    assert plan.compute.tolist() == np.flatnonzero(src >= RECOMPUTED).tolist()
    c = plan.counts
    assert c.reused_tokens == 2 * (8 - min(k, 8)) and c.recomputed_tokens == 2 * min(k, 8)
    assert c.chunks_hit == 3 and c.chunks_total == 4  # ReuseCounts checks the sum itself
    assert all(e.refs == 1 for e in plan.entries)  # pinned until the caller releases
    store.release(plan.entries)
    assert all(e.refs == 0 for e in plan.entries)


def test_pic_clips_a_reused_last_token(prompt):
    store = store_with(prompt, content=[3])
    plan = make_plan(store, prompt, chunks_of(prompt), policy="pic", args=PolicyArgs(k=0))
    assert (plan.source[24:31] == REUSED).all() and plan.source[31] == RECOMPUTED


def test_hit_chunk_partly_inside_the_prefix_is_placed_from_an_offset(prompt):
    store = store_with(prompt, content=[1], prefix=0)
    # A cached prefix that ends inside chunk 1: the trie holds tokens 0..11 as one edge.
    edge = entry(prompt[:12], 0)
    store.insert_prefix("", [(chunk_key(prompt[:12]), edge)])
    plan = make_plan(store, prompt, chunks_of(prompt), policy="pic", args=PolicyArgs(k=2))
    assert plan.prefix_len == 12
    (p,) = plan.placements
    assert (p.start, p.offset, p.length) == (12, 4, 4)
    assert plan.source[12:14].tolist() == [RECOMPUTED] * 2
    assert plan.source[14:16].tolist() == [REUSED] * 2


@pytest.mark.parametrize(("r", "picked"), [(0.0, 0), (0.1, 2), (0.5, 8), (1.0, 16)])
def test_blend_fixes_how_many_placed_tokens_are_recomputed(prompt, r, picked):
    store = store_with(prompt, content=[1, 2])
    plan = make_plan(store, prompt, chunks_of(prompt), policy="blend", args=PolicyArgs(r=r))
    assert plan.blend_candidates.tolist() == list(range(8, 24))
    assert plan.blend_count == picked
    assert plan.counts.recomputed_tokens == picked and plan.counts.reused_tokens == 16 - picked


def test_policy_args_validation():
    d = PolicyArgs(k=16, r=0.1)
    assert policy_args("pic", {"k": 4}, d) == PolicyArgs(4, 0.1)
    assert policy_args("blend", None, d) == d
    assert policy_args("blend", {"k": 4, "r": 0.5}, d) == PolicyArgs(4, 0.5)
    for policy, args, match in [("pic", {"k": -1}, "k must"), ("blend", {"r": 2}, "r must"),
                                ("pic", {"k": 1.5}, "k must"), ("warp", {}, "unknown policy"),
                                ("full", {"depth": 1}, "unknown policy argument")]:
        with pytest.raises(ValueError, match=match):
            policy_args(policy, args, d)


def test_pic_carves_out_once_per_run_of_chunks_stored_side_by_side(prompt):
    # Chunks 1-3 were computed after the same chunks they follow now (a run whose start moved
    # behind a new chunk 0): only the run's start needs its attention restored.
    refs = chunks_of(prompt)
    store = ChunkStore(1 << 20)
    for i in (1, 2, 3):
        r = refs[i]
        e = KVEntry(prompt[r.start : r.end], 100 + r.start, torch.zeros(2, 8, 4),
                    torch.zeros(2, 8, 4), prev_key="old-header" if i == 1 else refs[i - 1].key)
        store.put(r.key, e)
    plan = make_plan(store, prompt, refs, policy="pic", args=PolicyArgs(k=3))
    src = plan.source
    assert (src[:8] == NEW).all()
    assert (src[8:11] == RECOMPUTED).all() and (src[11:31] == REUSED).all()
    assert src[31] == RECOMPUTED  # the last token: its logits are needed
    # a carve-out longer than a chunk runs on into the next chunk of the run
    plan = make_plan(store, prompt, refs, policy="pic", args=PolicyArgs(k=12))
    assert (plan.source[8:20] == RECOMPUTED).all() and (plan.source[20:31] == REUSED).all()
    # a stored left neighbour that differs from the current one starts a new run
    store.lookup(refs[3].key, prompt[24:32]).prev_key = "something else"
    plan = make_plan(store, prompt, refs, policy="pic", args=PolicyArgs(k=3))
    assert (plan.source[24:27] == RECOMPUTED).all() and (plan.source[27:31] == REUSED).all()
