"""Where the tokens beyond the exact prefix go: served, carved out, or lost, and why lost.

proxy/oracle.py says how much content reuse recovers and what the oracle bound is; this says
where the gap between the two lies. Every token beyond the exact prefix gets one cause:

* ``served``: in a chunk hit, reused (what pic's plan marks REUSED);
* ``carve``: in a chunk hit but recomputed: pic's first ``carve_tokens`` tokens of each run
  of hit chunks, with the planner's rule (engine_adapter/embedded/planner.py): a hit chunk
  continues a run when the chunk before it now is the one stored before it, and a carve-out
  longer than a short chunk goes on into the next one;
* ``lost_prefix_edge``: seen before (in the oracle) but its chunk missed, and that chunk
  starts inside the exact prefix: the earlier prompt diverged inside the chunk;
* ``lost_short``: seen before, chunk missed, in a run of seen tokens (beyond the exact prefix)
  shorter than the chunker's ``min_tokens``: no chunk of this chunker fits inside it;
* ``lost_edge``: seen before, chunk missed, the chunk also holds unseen tokens: its
  boundaries do not line up with the edit;
* ``lost_cut``: seen before, chunk missed, every token of the chunk seen: the content came
  before, but never cut into this chunk (another wrapper, another neighbour, a longer chunk);
* ``new``: not in the oracle and not in a hit chunk: content no cache could have.

Causes are tried in that order, so the counts add up to the prefix cache's misses, and
``served + carve + lost_* - hit_outside_oracle`` is the oracle (hits on runs shorter than
the oracle's minimum fall outside it).

One more loss lies *inside* the prefix cache's exact prefix: pic's engine enters an earlier
prompt in its prefix trie only up to that prompt's first reused token (its KV after that is
not bit-exact), so a later request repeating that prompt finds a shorter exact prefix and
gets the rest as content hits, paying carve-outs the prefix cache did not: ``lost_trie``,
counted against ``served`` (``recovered = served - lost_trie``, what replay measures).
With the engine's approximate trie tails (EngineConfig.approx_trie, on by default) the trie
also holds the rest of every earlier prompt, composed KV placed as it is: a later request gets
its whole common prefix with them at no carve-out (reused, not exact), and ``lost_trie``
keeps only what that does not reach.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from irminsul.chunking.keys import Chunker
from irminsul.proxy.oracle import (
    Analyzer,
    Detail,
    Item,
    OracleConfig,
    Recovery,
    common_prefix,
)

LOST = ("lost_prefix_edge", "lost_short", "lost_edge", "lost_cut")
CAUSES = ("served", "carve", *LOST, "new")


class Causes(NamedTuple):
    """Tokens beyond the exact prefix by cause (one request, or a sum of requests)."""

    misses: int
    served: int
    carve: int
    lost_prefix_edge: int
    lost_short: int
    lost_edge: int
    lost_cut: int
    new: int
    hit_outside_oracle: int  # served or carved tokens the oracle does not count
    lost_trie: int  # exact-prefix tokens pic's engine recomputes (its thinner prefix trie)

    @property
    def recovered(self) -> int:
        """What pic serves above the prefix cache's exact prefix (replay's 'recovered')."""
        return self.served - self.lost_trie

    @property
    def oracle(self) -> int:
        return self.served + self.carve + sum(getattr(self, c) for c in LOST) \
            - self.hit_outside_oracle


def add_causes(rows: Iterable[Causes]) -> Causes:
    rows = list(rows)
    return Causes(*(sum(col) for col in zip(*rows, strict=True))) if rows else Causes(*[0] * len(Causes._fields))


def _run_lengths(mask: np.ndarray) -> np.ndarray:
    """For every True of ``mask``, the length of the maximal run of Trues holding it."""
    out = np.zeros(len(mask), dtype=np.int64)
    if not mask.any():
        return out
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    for s, e in zip(starts, ends):
        out[s:e] = e - s
    return out


def classify(d: Detail, carve_tokens: int, min_tokens: int,
             pic_exact: int | None = None, pic_tail: int | None = None) -> tuple[Causes, int]:
    """The causes of one analysed request (``Analyzer.last``) and the end of the exact KV
    pic's engine stores in its prefix trie (the whole chunks before the first reused token).

    ``pic_exact``: the exact prefix pic's engine finds (its trie holds only the exact part of
    earlier prompts); None: the same as the prefix cache's. Tokens between the two that pic
    recomputes are ``lost_trie``. ``pic_tail``: where the trie's approximate tail that goes on
    from there ends (None: no tail); its tokens are reused as they are, with no carve-out.
    """
    n, exact = len(d.ids), d.exact
    lo = exact if pic_exact is None else min(pic_exact, exact)
    hi = lo if pic_tail is None else max(lo, min(pic_tail, n))  # planner.make_plan's a_end
    hit = np.zeros(n, dtype=bool)
    carve = np.zeros(n, dtype=bool)
    hit[lo:hi] = True
    carve_left = 0
    for i, ref in enumerate(d.refs):
        if ref.end <= hi:
            continue
        if not d.hits[i]:
            carve_left = 0  # computed tokens: exact KV for whatever follows
            continue
        start = max(ref.start, hi)
        hit[start : ref.end] = True
        continues = (start == ref.start and i > 0 and d.stored_prev[i] is not None
                     and d.stored_prev[i] == d.refs[i - 1].key)
        if not continues:
            carve_left = carve_tokens
        k = min(carve_left, ref.end - start)
        carve[start : start + k] = True
        carve_left -= k
    if hit[n - 1]:
        carve[n - 1] = True  # the last token is always computed: its logits are needed
    reused = np.flatnonzero(hit & ~carve)
    exact_end = int(reused[0]) if len(reused) else n
    trie_end = max((r.end for r in d.refs if r.end <= exact_end), default=0)
    beyond = np.zeros(n, dtype=bool)
    beyond[exact:] = True
    seen = d.covered & beyond
    runs = _run_lengths(seen)
    counts = dict.fromkeys(CAUSES, 0)
    counts["served"] = int((hit & ~carve & beyond).sum())
    counts["carve"] = int((carve & beyond).sum())
    lost = seen & ~hit
    for ref in d.refs:
        if ref.end <= exact:
            continue
        part = slice(ref.start, ref.end)
        lost_here = lost[part]
        if not lost_here.any():
            continue
        if ref.start < exact:
            counts["lost_prefix_edge"] += int(lost_here.sum())
            continue
        short = lost_here & (runs[part] < min_tokens)
        counts["lost_short"] += int(short.sum())
        rest = int((lost_here & ~short).sum())
        mixed = not seen[part].all()
        counts["lost_edge" if mixed else "lost_cut"] += rest
    counts["new"] = int((beyond & ~hit & ~d.covered).sum())
    lost_trie = int((~(hit & ~carve))[lo:exact].sum())
    return Causes(n - exact, hit_outside_oracle=int((hit & ~d.covered & beyond).sum()),
                  lost_trie=lost_trie, **counts), trie_end


def analyze_causes(items: Iterable[Item], chunker: Chunker,
                   config: OracleConfig | None = None, *, engine_trie: bool = True,
                   approx_trie: bool = True) -> list[tuple[Recovery, Causes]]:
    """oracle.analyze's rows, each with its causes (carve-out: ``config.carve_tokens``).

    ``engine_trie``: model pic's engine, whose prefix trie holds an earlier prompt exactly
    only up to its first reused token (prefill.commit); False: pic finds the prefix cache's
    exact prefix. ``approx_trie`` (with ``engine_trie``): the trie holds the rest of each
    earlier prompt as its approximate tail (EngineConfig.approx_trie).
    """
    config = config if config is not None else OracleConfig()
    analyzer = Analyzer(chunker, config)
    trie: dict[str, list[np.ndarray]] = {}  # session -> exact parts pic's engine stored
    tails: dict[str, list[np.ndarray]] = {}  # session -> whole prompts (exact + tail)

    def scoped(stored: dict[str, list[np.ndarray]], session: str) -> list[np.ndarray]:
        return (stored.get(session, []) if config.prefix_scope == "session"
                else [a for seqs in stored.values() for a in seqs])

    out = []
    for it in items:
        row = analyzer.add(it)
        d = analyzer.last
        pic_exact = pic_tail = None
        if engine_trie:
            pic_exact = max((common_prefix(a, d.ids) for a in scoped(trie, it.session)),
                            default=0)
            if approx_trie:
                pic_tail = max((common_prefix(a, d.ids) for a in scoped(tails, it.session)),
                               default=0)
        causes, trie_end = classify(d, config.carve_tokens, chunker.config.min_tokens,
                                    pic_exact, pic_tail)
        trie.setdefault(it.session, []).append(d.ids[:trie_end])
        tails.setdefault(it.session, []).append(d.ids)
        out.append((row, causes))
    return out


def by_family(rows: Sequence[tuple[Recovery, Causes]]) -> list[tuple[str, Causes]]:
    """(family, summed causes) in order of appearance, then ``all`` when several."""
    groups: dict[str, list[Causes]] = {}
    for r, c in rows:
        groups.setdefault(r.family or "-", []).append(c)
    out = [(name, add_causes(g)) for name, g in groups.items()]
    if len(out) > 1:
        out.append(("all", add_causes([c for _, c in rows])))
    return out


def render_causes(table: list[tuple[str, Causes]]) -> str:
    """Per row: the misses, the oracle as share of them, then as shares of the oracle what
    pic recovers (served - lost_trie), serves, carves out, loses to the thinner trie and
    loses per cause; hits outside the oracle; last, genuinely new tokens as share of misses."""
    head = (f"{'family':<9} | {'misses':>6} | {'oracle':>6} | {'recov':>6} = {'served':>6} "
            f"- {'trie':>6} | {'carve':>6} | {'pfx-edge':>8} {'short':>6} {'edge':>6} "
            f"{'cut':>6} | {'hit-out':>7} | {'new/miss':>8}")
    lines = [head]
    for name, c in table:
        o = c.oracle

        def p(x: int, den: int = o) -> str:
            return f"{100 * x / den:5.1f}%" if den else "    -"

        lines.append(
            f"{name:<9} | {c.misses:>6} | {p(o, c.misses)} | {p(c.recovered)} = {p(c.served)} "
            f"- {p(c.lost_trie)} | {p(c.carve)} | {p(c.lost_prefix_edge):>8} "
            f"{p(c.lost_short)} {p(c.lost_edge)} {p(c.lost_cut)} | "
            f"{p(c.hit_outside_oracle):>7} | {p(c.new, c.misses):>8}")
    return "\n".join(lines)
