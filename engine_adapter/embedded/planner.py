"""The reuse planner: where each prompt token's KV comes from, before any compute.

Per token the source is one of

* PREFIX     - the longest exact cached prefix (prefix trie; bit-identical to a prefill);
* REUSED     - a content hit: c_KV copied, k_pe δ-rotated from where it was computed; or
               the prefix trie's approximate tail (store.py): an earlier prompt's composed
               KV at the same positions, placed as it is, with no carve-out;
* RECOMPUTED - in a hit, but computed anyway (pic's first k tokens of each placed run,
               blend's most-deviating tokens, clip's windows, the last prompt token whose
               logits we need);
* NEW        - no hit; computed.

Policies: ``full`` computes everything; ``prefix`` uses the exact prefix only (a radix cache);
``pic`` adds content hits and recomputes the first k tokens of each placed run; a run is a
sequence of hit chunks each of which was stored with the same chunk before it as it has now
(KVEntry.prev_key), so only where the left context changed is attention restored; ``blend``
(CacheBlend) adds content hits, runs layer 0 for every non-prefix token and recomputes, in
layers 1.., the fraction r of placed tokens whose layer-1 KV deviates most from the stored one
(which ones is decided while running; how many is fixed here); ``clip`` (CacheClip, clip.py)
places content hits like blend and recomputes as many placed tokens, in windows chosen by an
auxiliary model's attention from the end of the prompt.

With ``approximate`` (EngineConfig.approx_trie) the three content policies also take the
trie's approximate tail after the exact prefix: tokens counted as reused, never as exact
prefix, and not offered to blend's or clip's selection (they were chosen over once, when
that earlier prompt composed them). ``full`` and ``prefix`` never see the tail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..contract import ChunkRef, ReuseCounts
from .config import POLICIES
from .store import ChunkStore, KVEntry, PrefixMatch

PREFIX, REUSED, RECOMPUTED, NEW = 0, 1, 2, 3


class PolicyArgs(NamedTuple):
    k: int = 16  # pic: tokens recomputed at the start of each placed run
    r: float = 0.10  # blend, clip: fraction of placed tokens recomputed


def policy_args(policy: str, args: dict[str, Any] | None, defaults: PolicyArgs) -> PolicyArgs:
    """Validated arguments: {"k": int >= 0} (pic) and {"r": 0..1} (blend, clip). Either key is
    accepted whatever the policy (a proxy may send both) and used only where it applies."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    args = dict(args or {})
    unknown = sorted(map(str, set(args) - {"k", "r"}))
    if unknown:
        raise ValueError(f"unknown policy argument(s) {', '.join(unknown)} (known: k, r)")
    k, r = args.get("k", defaults.k), args.get("r", defaults.r)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"pic argument k must be an integer >= 0, got {k!r}")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
        raise ValueError(f"blend/clip argument r must be a number in [0, 1], got {r!r}")
    return PolicyArgs(k, float(r))


class Placement(NamedTuple):
    """Tokens entry.ids[offset : offset + length] placed at positions start .. start+length-1."""

    entry: KVEntry
    offset: int
    start: int
    length: int


class Plan(NamedTuple):
    policy: str
    args: PolicyArgs
    ids: np.ndarray  # int32 [N]
    chunks: tuple[ChunkRef, ...]
    source: np.ndarray  # int8 [N]: PREFIX / REUSED / RECOMPUTED / NEW
    prefix: PrefixMatch  # trie edges, cut to prefix_len tokens when copied
    prefix_len: int
    placements: tuple[Placement, ...]
    hit_chunks: tuple[int, ...]  # indexes of chunks with a content hit
    compute: np.ndarray  # int64 positions computed in every layer, sorted
    blend_candidates: np.ndarray  # int64 placed positions blend (or clip) chooses from
    blend_count: int  # how many of them blend (or clip) recomputes
    counts: ReuseCounts
    approx_end: int = 0  # [prefix_len, approx_end): the trie's approximate tail, placed as is

    @property
    def entries(self) -> list[KVEntry]:
        """Every store entry the plan reads (pinned by make_plan)."""
        return [e for e, _ in self.prefix.parts] + [p.entry for p in self.placements]


def make_plan(
    store: ChunkStore,
    ids: np.ndarray,
    chunks: Sequence[ChunkRef],
    *,
    policy: str,
    args: PolicyArgs,
    namespace: str = "",
    approximate: bool = False,
) -> Plan:
    """Plan a prefill of ``ids`` (chunks tile it). Pins the entries it uses in ``store``:
    the caller must ``store.release(plan.entries)`` when the prefill is done.
    ``approximate``: content policies also use the trie's approximate tail."""
    n = len(ids)
    if n == 0:
        raise ValueError("cannot plan an empty prompt")
    source = np.full(n, NEW, dtype=np.int8)
    prefix = PrefixMatch((), 0)
    content = policy in ("pic", "blend", "clip")
    if policy != "full":
        prefix = (store.match_prefix(namespace, ids, chunks, approximate=True)
                  if approximate and content else store.match_prefix(namespace, ids, chunks))
    p_len = min(prefix.length, n - 1)  # the last token is always computed: we need its logits
    source[:p_len] = PREFIX
    placements: list[Placement] = []
    hits: list[int] = []
    a_end = p_len  # the tail starts where the exact prefix ends (prefix.length < n then)
    for entry, off, used in prefix.tail:  # same positions: no rotation, no carve-out
        placements.append(Placement(entry, off, a_end, used))
        source[a_end : a_end + used] = REUSED
        a_end += used
    if content:
        carve_left = 0  # pic: tokens of the current run's carve-out still to recompute
        for i, ref in enumerate(chunks):
            if ref.end <= a_end:
                continue
            entry = store.lookup(ref.key, ids[ref.start : ref.end])
            if entry is None:
                carve_left = 0  # computed tokens: exact KV for whatever follows
                continue
            hits.append(i)
            start = max(ref.start, a_end)
            placements.append(Placement(entry, start - ref.start, start, ref.end - start))
            source[start : ref.end] = REUSED
            continues = (start == ref.start and i > 0 and entry.prev_key is not None
                         and entry.prev_key == chunks[i - 1].key)
            if not continues:
                carve_left = args.k
            if policy == "pic":
                n_re = min(carve_left, ref.end - start)
                source[start : start + n_re] = RECOMPUTED
                carve_left -= n_re
    if prefix.length >= n or source[n - 1] == REUSED:
        source[n - 1] = RECOMPUTED
    compute = np.flatnonzero(source >= RECOMPUTED).astype(np.int64)
    candidates = np.flatnonzero(source == REUSED).astype(np.int64)
    candidates = candidates[candidates >= a_end]  # the tail is placed as it is
    blend_count = 0
    if policy in ("blend", "clip"):
        blend_count = min(len(candidates), math.ceil(args.r * len(candidates) - 1e-9))
    else:
        candidates = candidates[:0]
    counted = np.bincount(source, minlength=4)
    covered = {i for i, ref in enumerate(chunks) if ref.end <= max(prefix.length, a_end)}
    counts = ReuseCounts(
        prompt_tokens=n,
        exact_prefix_tokens=int(counted[PREFIX]),
        reused_tokens=int(counted[REUSED]) - blend_count,
        recomputed_tokens=int(counted[RECOMPUTED]) + blend_count,
        new_tokens=int(counted[NEW]),
        chunks_total=len(chunks),
        chunks_hit=len(covered | set(hits)),
        policy=policy,
    )
    plan = Plan(
        policy, args, ids, tuple(chunks), source, prefix, p_len, tuple(placements), tuple(hits),
        compute, candidates, blend_count, counts, a_end,
    )
    store.acquire(plan.entries)
    return plan
