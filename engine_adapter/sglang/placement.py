"""From the shared planner's Plan to what SGLang can place in one prefill (no SGLang import).

SGLang's prefill is "a prefix whose KV is in slots, then a contiguous tail it computes"
(``prefix_device_indices`` + one extend). So one request can take, after SGLang's exact radix
prefix, only the *first run* of placed tokens: the REUSED tokens that follow the prefix
without a gap. Everything after the first computed token is computed, hits included.

:func:`split_rounds` cuts a plan at every computed -> placed boundary: the rounds a split
prefill would run (place a run, compute up to the next run, place it, ...). The backend runs
round 0 only (DESIGN.md, "Holes"); the other rounds are what a hole costs today.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..contract import ReuseCounts
from ..embedded.planner import NEW, PREFIX, RECOMPUTED, REUSED, Plan


class Segment(NamedTuple):
    """Tokens of one planned hit placed at dst positions [start, start + length); their KV is
    at source positions [src_position, src_position + length) of ``site``."""

    site: object  # matching.ChunkSite
    src_position: int
    start: int
    length: int


class Run(NamedTuple):
    """The placed run right after the exact prefix: positions [start, start + length)."""

    start: int
    length: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        return self.start + self.length


class Round(NamedTuple):
    """One step of a split prefill: place [place_start, compute_start), then compute
    [compute_start, compute_end)."""

    place_start: int
    compute_start: int
    compute_end: int


def first_run(plan: Plan, *, limit: int, page_size: int = 1) -> Run:
    """The run SGLang can take: REUSED tokens from ``plan.prefix_len`` on, stopping at the
    first other token, at ``limit`` (SGLang's key limit: at most input_len - 1 tokens may come
    from cache) and at a page boundary (paged pools hand out whole pages)."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    start = plan.prefix_len
    if start % page_size:
        raise ValueError(f"exact prefix {start} is not page aligned (page_size {page_size})")
    src = plan.source
    stop = min(limit, len(src))
    end = start
    while end < stop and src[end] == REUSED:
        end += 1
    end = start + (end - start) // page_size * page_size
    segments = []
    for p in plan.placements:
        a, b = max(p.start, start), min(p.start + p.length, end)
        if a < b:
            src_pos = p.entry.position + p.offset + (a - p.start)
            segments.append(Segment(p.entry, src_pos, a, b - a))
    return Run(start, end - start, tuple(segments))


def split_rounds(plan: Plan) -> tuple[Round, ...]:
    """Every (place, compute) round of the plan, in order; the last one computes up to the
    end of the prompt. Round 0 places nothing when the prompt has no hit right after the
    prefix."""
    src = plan.source
    n = len(src)
    rounds = []
    pos = plan.prefix_len
    while pos < n:
        place_start = pos
        while pos < n and src[pos] == REUSED:
            pos += 1
        compute_start = pos
        while pos < n and src[pos] != REUSED:
            pos += 1
        rounds.append(Round(place_start, compute_start, pos))
    return tuple(rounds)


def run_counts(plan: Plan, run: Run) -> ReuseCounts:
    """How the prompt's tokens are obtained when only ``run`` is placed: planned hits outside
    it are computed and count as recomputed; SGLang's prefix stays exact."""
    src = plan.source
    n = len(src)
    placed = np.zeros(n, dtype=bool)
    placed[run.start : run.end] = True
    exact = int(np.count_nonzero(src == PREFIX))
    hit_computed = int(np.count_nonzero((src == REUSED) & ~placed))
    hit_computed += int(np.count_nonzero(src == RECOMPUTED))
    return ReuseCounts(
        prompt_tokens=n,
        exact_prefix_tokens=exact,
        reused_tokens=run.length,
        recomputed_tokens=hit_computed,
        new_tokens=int(np.count_nonzero(src == NEW)),
        chunks_total=plan.counts.chunks_total,
        chunks_hit=plan.counts.chunks_hit,
        policy=plan.policy,
    )
