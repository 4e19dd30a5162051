"""Where the tokens beyond the exact prefix go (proxy/oracle_causes.py): hand-made prompts
with every cause known, then the identities on real traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from support.proxy_harness import tiny_tokenizer

from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.keys import Chunker
from irminsul.proxy.oracle import Item, OracleConfig, summarize, trace_items
from irminsul.proxy.oracle_causes import (
    CAUSES,
    add_causes,
    analyze_causes,
    by_family,
    render_causes,
)
from irminsul.proxy.trace_io import load_trace

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "traces"
FOUR = Chunker(ChunkerConfig(min_tokens=4, avg_tokens=4, max_tokens=4))  # cuts every 4 tokens
CFG = OracleConfig(prefix_scope="global", oracle_min_tokens=4, carve_tokens=2)


def causes(*prompts, anchors=None, engine_trie=False, config=CFG, approx_trie=True):
    anchors = anchors or [()] * len(prompts)
    items = [Item("s", k, "f", np.array(p), a) for k, (p, a) in enumerate(zip(prompts, anchors))]
    return [c for _, c in analyze_causes(items, FOUR, config, engine_trie=engine_trie,
                                         approx_trie=approx_trie)]


def test_served_and_carved_follow_the_planner_run_rule():
    a = list(range(1, 13))  # chunks [1..4] [5..8] [9..12]
    c = causes(a, [99, 98, 97, 96, *a], anchors=[(), (4,)])[1]
    # one run of three chunks stored side by side: carved once (2 tokens), the last token
    # is always computed
    assert (c.misses, c.served, c.carve, c.new) == (16, 9, 3, 4)
    assert c.oracle == 12 and c.recovered == 9


def test_lost_causes():
    a = list(range(1, 13))
    # an edit inside the middle chunk: [5, 6, 77, 8] misses; its 3 seen tokens are 'edge'
    b = [1, 2, 3, 4, 5, 6, 77, 8, 9, 10, 11, 12]
    c = causes([50, *a], [60, *b], anchors=[(1,), (1,)])[1]
    assert c.misses == 13 and c.new == 2  # 60 and 77
    assert (c.lost_edge, c.lost_short) == (3, 0)  # 5, 6 and 8, in runs of 6 and 5
    # [1..4] hits, carved 2; [9..12] hits after a computed chunk: carved 2 again, and its
    # last token is the prompt's (always computed)
    assert (c.served, c.carve) == (3, 5)
    assert sum(getattr(c, k) for k in CAUSES) == c.misses
    # a seen run of 2 (7, 8) inside new tokens: shorter than any chunk (min_tokens 4)
    short = OracleConfig(prefix_scope="global", oracle_min_tokens=2, carve_tokens=2)
    c = causes([50, *a], [60, 1, 2, 3, 4, 55, 7, 8, 56, 9, 10, 11, 12], anchors=[(1,), (1,)],
               config=short)[1]
    assert (c.lost_short, c.lost_edge, c.lost_cut, c.new) == (2, 0, 0, 3)


def test_cut_and_prefix_edge():
    a = list(range(1, 13))
    # the same tokens cut elsewhere (anchor at 2): [1, 2] [3..6] [7..10] [11, 12] never seen
    c = causes(a, [70, *a], anchors=[(), (1, 3)])[1]
    assert c.lost_cut == 12 - c.served - c.carve and c.lost_cut > 0
    # the earlier prompt diverged inside a chunk: its seen tail is 'prefix edge'
    c = causes(a, [1, 2, 3, 4, 5, 6, 99, 8, 9, 10, 11, 12])[1]
    # exact prefix 6; chunk [5, 6, 99, 8] straddles it: 99 is new, 8 was seen
    assert (c.misses, c.lost_prefix_edge, c.new) == (6, 1, 1)


def test_engine_trie_loses_what_pic_reused_before():
    docs = list(range(100, 112))
    first = [*docs, 1, 2, 3, 4]
    second = [9, 9, 9, 9, *docs, 5, 6, 7, 8]  # reuses docs by content
    third = [9, 9, 9, 9, *docs, 5, 6, 7, 8, 1, 1, 1, 1]  # repeats the second whole
    plain = causes(first, second, third, anchors=[(), (4,), (4,)])[2]
    assert plain.lost_trie == 0 and plain.misses == 4
    engine = causes(first, second, third, anchors=[(), (4,), (4,)], engine_trie=True,
                    approx_trie=False)[2]
    # pic's engine stored the second prompt's exact part only up to its first reused token
    # (4): the docs come back as content hits, the run carved (2), then the tail chunk
    # [5..8] continues the run
    assert engine.lost_trie == 2 and engine.recovered == plain.recovered - 2
    # with the trie's approximate tail the second prompt is there whole: the third places
    # it as it is (no carve-out), and the new chunk [1, 1, 1, 1] is computed
    tail = causes(first, second, third, anchors=[(), (4,), (4,)], engine_trie=True)[2]
    assert tail.lost_trie == 0 and tail.recovered == plain.recovered
    assert (tail.served, tail.carve, tail.new) == (plain.served, plain.carve, 4)
    # a third prompt that leaves the second after 10 tokens: the tail serves up to there,
    # then the docs' last chunk [108..111] hits by content and is carved again
    left = [9, 9, 9, 9, 100, 101, 102, 103, 104, 105, 7, 7, 108, 109, 110, 111, 5, 6]
    c = causes(first, second, left, anchors=[(), (4,), (4, 10, 12)], engine_trie=True)[2]
    assert c.lost_trie == 0 and c.misses == 8  # exact prefix: 10 tokens of the second
    assert (c.served, c.carve) == (2, 2)  # [108..111] after the new [7, 7]: carved 2


def test_identities_on_committed_traces():
    tok = tiny_tokenizer()
    rows = analyze_causes(trace_items(load_trace(EXAMPLES / "subagent.jsonl"), tok),
                          Chunker(ChunkerConfig()), OracleConfig(prefix_scope="global"))
    total = add_causes(c for _, c in rows)
    s = summarize(r for r, _ in rows)
    assert total.oracle == s.oracle and total.misses == s.misses
    assert sum(getattr(total, k) for k in CAUSES) == total.misses
    assert total.served <= s.content  # served tokens lie in hit chunks
    table = by_family(rows)
    assert [name for name, _ in table] == ["subagent"]
    assert render_causes(table).splitlines()[1].startswith("subagent")
