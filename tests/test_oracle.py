"""The offline recovery analysis: hand-made traces with known numbers, then real traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support.proxy_harness import tiny_tokenizer

from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.keys import Chunker
from irminsul.proxy.oracle import (
    Analyzer,
    Item,
    OracleConfig,
    _HashSet,
    analyze,
    gram_hashes,
    summarize,
    tokenize_request,
    trace_items,
)
from irminsul.proxy.trace_io import load_trace
from irminsul.proxy.traces import TraceConfig, generate, traces_command

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "traces"
FOUR = Chunker(ChunkerConfig(min_tokens=4, avg_tokens=4, max_tokens=4))  # cuts every 4 tokens
A0 = list(range(1, 13))  # 12 tokens: chunks and blocks [1..4] [5..8] [9..12]
A1 = [99, *A0, 50, 51, 52]  # shifted by one token, 3 new at the end (anchor after the 99)
A2 = [*A0, 60, 61]  # A0 again plus 2 new tokens


def items():
    return [Item("A", 0, None, np.array(A0)), Item("A", 1, None, np.array(A1), (1,)),
            Item("A", 2, None, np.array(A2)), Item("B", 0, None, np.array(A0))]


def counts(r):
    return (r.prompt_tokens, r.exact_prefix_tokens, r.chunks_total, r.chunks_hit, r.content,
            r.content_net, r.fixed, r.fixed_net, r.oracle)


def test_hand_made_trace_session_scope():
    cfg = OracleConfig(prefix_scope="session", fixed_block=4, oracle_min_tokens=4, carve_tokens=1)
    rows = analyze(items(), FOUR, cfg)
    assert [counts(r) for r in rows] == [
        (12, 0, 3, 0, 0, 0, 0, 0, 0),  # nothing seen before
        # the anchor re-aligns the chunks: [1..4] [5..8] [9..12] hit (3 x 4, minus 1 carved
        # each); fixed blocks [99,1,2,3] [4..7] ... are all new; the oracle sees A0's 12 tokens
        (16, 0, 5, 3, 12, 9, 0, 0, 12),
        (14, 12, 4, 3, 0, 0, 0, 0, 0),  # A0 is its exact prefix; the rest is new
        # another session: no exact prefix in session scope, everything else recovered
        (12, 0, 3, 3, 12, 9, 12, 9, 12),
    ]
    # the three hit chunks follow each other in A0 as well: one run, carved once
    assert [r.content_run_net for r in rows] == [0, 11, 0, 11]
    s = summarize(rows)
    assert (s.requests, s.prompt_tokens, s.exact_prefix_tokens, s.misses) == (4, 54, 12, 42)
    assert s.shares("content") == (24 / 54, 24 / 42, 24 / 24)
    assert s.shares("fixed") == (12 / 54, 12 / 42, 12 / 24)
    assert s.shares("content_net") == (18 / 54, 18 / 42, 18 / 24)
    with pytest.raises(ValueError, match="method must be one of"):
        s.shares("bogus")


def test_hand_made_trace_global_scope():
    cfg = OracleConfig(prefix_scope="global", fixed_block=4, oracle_min_tokens=4, carve_tokens=0)
    rows = analyze(items(), FOUR, cfg)
    # session B starts with A0 whole: a global prefix cache has it all
    assert counts(rows[3]) == (12, 12, 3, 3, 0, 0, 0, 0, 0)
    assert counts(rows[1]) == (16, 0, 5, 3, 12, 12, 0, 0, 12)


def test_prefix_straddling_chunks_and_blocks_count_only_beyond_the_prefix():
    cfg = OracleConfig(fixed_block=4, oracle_min_tokens=4, carve_tokens=2)
    seen = [1, 2, 3, 4, 5, 6, 7, 8]
    again = [1, 2, 3, 9, 5, 6, 7, 8]  # diverges at 3: chunk/block [5..8] hits beyond it
    rows = analyze([Item("s", 0, None, np.array(seen)), Item("s", 1, None, np.array(again))],
                   FOUR, cfg)
    assert counts(rows[1]) == (8, 3, 2, 1, 4, 2, 4, 2, 4)
    assert rows[1].content_run_net == 2  # a run's first chunk is carved


def test_runs_break_where_the_stored_copies_were_not_neighbours():
    cfg = OracleConfig(fixed_block=4, oracle_min_tokens=4, carve_tokens=1)
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    rows = analyze([Item("s", 0, None, np.array(x + y + z)),
                    Item("t", 0, None, np.array(z + x + y))], FOUR, cfg)
    # z, then x and y as a run: z and x each start a run (carved), y follows x
    assert (rows[1].content, rows[1].content_net, rows[1].content_run_net) == (12, 9, 10)


def test_a_key_hit_counts_only_when_the_token_ids_compare_equal():
    analyzer = Analyzer(FOUR, OracleConfig(fixed_block=4, oracle_min_tokens=4))
    first = analyzer.add(Item("s", 0, None, np.array(A0)))
    assert first.chunks_hit == 0
    # forge a colliding entry: every stored key now maps to other token IDs
    analyzer.chunks = dict.fromkeys(analyzer.chunks, np.arange(4, dtype=np.int32).tobytes())
    again = analyzer.add(Item("t", 0, None, np.array(A0)))
    assert (again.chunks_hit, again.content, again.fixed) == (0, 0, 12)


def test_gram_hashes_and_the_hash_set():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4096, 3000, dtype=np.int32)
    h = gram_hashes(ids, 16)
    assert len(h) == 3000 - 15 and len(np.unique(h)) == len(h)  # no collisions among windows
    same = np.concatenate([ids[100:116], ids[100:116]])
    hs = gram_hashes(same, 16)
    assert hs[0] == hs[16] == h[100]
    assert len(gram_hashes(ids[:15], 16)) == 0
    hset = _HashSet()
    for k in range(20):  # more runs than the merge threshold
        hset.add(h[k * 100 : (k + 1) * 100])
    assert hset.contains(h[:2000]).all() and not hset.contains(h[2000:]).any()


def test_config_is_checked():
    with pytest.raises(ValueError, match="prefix_scope"):
        OracleConfig(prefix_scope="tenant")
    with pytest.raises(ValueError, match="carve_tokens"):
        OracleConfig(carve_tokens=-1)


@pytest.fixture(scope="module")
def tok():
    tokenizer = tiny_tokenizer()
    assert tokenizer is not None, "examples/models/tiny-mla tokenizer is missing"
    return tokenizer


def test_anthropic_and_openai_forms_tokenize_alike(tok):
    small = {"sessions": 1, "turns": 3, "skills": 2, "skill_tokens": 60, "tools": 3,
             "tool_tokens": 150}
    o = generate(TraceConfig.preset("toolloop", **small))
    a = generate(TraceConfig.preset("toolloop", api="anthropic", **small))
    for x, y in zip(o, a):
        px, py = tokenize_request(x, tok), tokenize_request(y, tok)
        assert np.array_equal(px.ids, py.ids) and px.anchors == py.anchors


def test_each_family_shows_its_pattern_on_the_samples(tok):
    chunker = Chunker(ChunkerConfig())
    result = {}
    for fam in ("header", "reorder", "toolloop", "rag"):
        rows = analyze(trace_items(load_trace(EXAMPLES / f"{fam}.jsonl"), tok), chunker)
        for r in rows:
            assert 0 <= r.content_net <= r.content_run_net <= r.content
            assert r.content <= r.prompt_tokens - r.exact_prefix_tokens
            assert r.fixed_net <= r.fixed <= r.prompt_tokens - r.exact_prefix_tokens
            assert r.chunks_hit <= r.chunks_total
        result[fam] = [r for r in rows if r.turn > 0]
    # header at the top and reordered sections: the exact prefix ends within a few tokens,
    # while most of every later prompt is content seen before
    for fam in ("header", "reorder"):
        for r in result[fam]:
            assert r.content > 0.5 * (r.prompt_tokens - r.exact_prefix_tokens), fam
    assert max(r.exact_prefix_tokens / r.prompt_tokens for r in result["header"]) < 0.02
    # a tool loop without compaction yet only appends: the exact prefix carries it
    assert all(r.exact_prefix_tokens > 0.5 * r.prompt_tokens for r in result["toolloop"])


def test_recovery_command_prints_the_analysis(tok):
    path = EXAMPLES / "mixed.jsonl"
    runner = CliRunner()
    result = runner.invoke(traces_command, ["recovery", str(path), "--scope", "session",
                                            "--chunk-tokens", "16/64/256", "--carve", "8"])
    assert result.exit_code == 0, result.output
    rows = analyze(trace_items(load_trace(path), tok),
                   Chunker(ChunkerConfig(min_tokens=16, avg_tokens=64, max_tokens=256)),
                   OracleConfig(prefix_scope="session", carve_tokens=8))
    line = next(x for x in result.output.splitlines() if x.startswith("all "))
    s = summarize(rows)
    for method in ("content", "content_net", "fixed"):
        sh = s.shares(method)
        assert " ".join(f"{100 * v:5.1f}%" for v in sh) in line
    bad = runner.invoke(traces_command, ["recovery", str(path), "--chunk-tokens", "64/32/16"])
    assert bad.exit_code == 2 and "avg_tokens (32) must be >= min_tokens (64)" in bad.output
