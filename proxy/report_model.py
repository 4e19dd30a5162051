"""What `irminsul report` computes: plain result types, shared by the queries and the renderers.

Token totals count only requests whose five counters (prompt, exact prefix, reused, recomputed,
new) are all known; ``counted`` says how many those are. Every share carries its denominator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from irminsul.proxy.audits import AuditGroup

PROMPT = "prompt tokens"
MISSES = "exact-prefix misses (prompt - exact-prefix tokens)"


class Share(NamedTuple):
    """``numerator`` of ``denominator``; ``of`` names the denominator."""

    name: str
    numerator: float
    denominator: float
    of: str

    @property
    def value(self) -> float | None:
        """The share, or None when the denominator is 0."""
        return self.numerator / self.denominator if self.denominator else None


class Totals(NamedTuple):
    requests: int
    counted: int  # requests with all five token counters known
    failed: int  # HTTP status >= 400 or an error
    prompt_tokens: int
    exact_prefix_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    new_tokens: int
    potential_requests: int  # requests with prompt, exact prefix and potential reuse known
    potential_reuse_tokens: int
    potential_prompt_tokens: int
    potential_missed_tokens: int
    completion_tokens: int
    flops_requests: int  # requests with a FLOPs estimate
    flops_saved: float
    energy_saved_j: float

    @property
    def missed_tokens(self) -> int:
        """Tokens the exact-prefix cache did not serve."""
        return self.prompt_tokens - self.exact_prefix_tokens

    def shares(self) -> tuple[Share, ...]:
        out = [
            Share("exact-prefix tokens", self.exact_prefix_tokens, self.prompt_tokens, PROMPT),
            Share("content-reused tokens", self.reused_tokens, self.prompt_tokens, PROMPT),
            Share("content-reused tokens", self.reused_tokens, self.missed_tokens, MISSES),
            Share("saved tokens (exact prefix + reused)",
                  self.exact_prefix_tokens + self.reused_tokens, self.prompt_tokens, PROMPT),
        ]
        if self.potential_requests:
            out += [
                Share("potential content reuse", self.potential_reuse_tokens,
                      self.potential_prompt_tokens, "prompt tokens of requests with a potential"),
                Share("potential content reuse", self.potential_reuse_tokens,
                      self.potential_missed_tokens,
                      "exact-prefix misses of requests with a potential"),
            ]
        return tuple(out)


class Percentiles(NamedTuple):
    requests: int
    p50: float | None
    p95: float | None


def percentiles(values) -> Percentiles:
    """p50 and p95 by linear interpolation between closest ranks (numpy's default)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if not len(arr):
        return Percentiles(0, None, None)
    p50, p95 = np.percentile(arr, [50, 95])
    return Percentiles(len(arr), float(p50), float(p95))


class TtftSplit(NamedTuple):
    """TTFT of requests with content reuse (reused_tokens > 0), without (= 0), and of all
    requests with a TTFT (those whose reuse is unknown included)."""

    with_reuse: Percentiles
    without_reuse: Percentiles
    overall: Percentiles


class MissCause(NamedTuple):
    cause: str
    requests: int
    missed_tokens: int  # prompt - exact prefix, over requests with both known
    reused_tokens: int  # content-reused tokens over the same requests


class GroupRow(NamedTuple):
    key: str | None
    totals: Totals
    ttft: Percentiles


class RunSide(NamedTuple):
    """One run's figures for one family."""

    requests: int
    counted: int
    prompt_tokens: int
    exact_prefix_tokens: int
    reused_tokens: int
    ttft: Percentiles


class FamilyComparison(NamedTuple):
    family: str | None  # None: the family was not recorded; "(all)" for the total row
    a: RunSide
    b: RunSide

    @property
    def recovered_tokens(self) -> int:
        """B's exact prefix + reused minus A's exact prefix: what B recovers above A's cache."""
        return self.b.exact_prefix_tokens + self.b.reused_tokens - self.a.exact_prefix_tokens

    @property
    def prompts_match(self) -> bool:
        return self.a.prompt_tokens == self.b.prompt_tokens

    def shares(self) -> tuple[Share, Share]:
        return (
            Share("recovered tokens", self.recovered_tokens, self.a.prompt_tokens,
                  "run A's prompt tokens"),
            Share("recovered tokens", self.recovered_tokens,
                  self.a.prompt_tokens - self.a.exact_prefix_tokens,
                  "run A's exact-prefix misses"),
        )

    def ttft_ratios(self) -> tuple[float | None, float | None]:
        """A's TTFT over B's, p50 and p95 (above 1: B is faster)."""
        return (_ratio(self.a.ttft.p50, self.b.ttft.p50), _ratio(self.a.ttft.p95, self.b.ttft.p95))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


class Comparison(NamedTuple):
    run_a: str
    run_b: str
    families: tuple[FamilyComparison, ...]
    total: FamilyComparison


@dataclass(frozen=True)
class Report:
    db: str
    since: str | None  # ISO UTC cutoff, None for all time
    by: str
    source: str | None = None  # only rows of this source; None for all
    totals: Totals | None = None
    ttft: TtftSplit | None = None
    miss_causes: tuple[MissCause, ...] = ()
    groups: tuple[GroupRow, ...] = ()
    comparison: Comparison | None = None
    audits: tuple[AuditGroup, ...] = ()  # per model and policy, then "(all)"; () when none
