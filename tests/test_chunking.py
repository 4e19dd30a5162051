"""Content-defined chunking: config checks, the gear hash, and cut_spans against a reference."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from irminsul.chunking.cdc import as_token_array, cut_spans, gear_values, rolling_hash
from irminsul.chunking.config import ChunkerConfig

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- an independent, token-by-token reference of the algorithm the README describes ----------


def _ref_gear(token: int, seed: int) -> int:
    x = (seed + 0x9E3779B97F4A7C15) & M64  # splitmix64 of the seed gives the xor word
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    h = ((token & M32) ^ (x ^ (x >> 31))) & M32  # murmur3 fmix32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def _ref_cut(ids, cfg: ChunkerConfig, anchors=()):
    """Classic FastCDC loop: hash restarted at every chunk start, one token at a time."""
    g = [_ref_gear(int(t), cfg.seed) for t in ids]
    w, n = cfg.hash_window, len(ids)
    bounds = sorted({0, n, *anchors})
    spans = []
    for a, end in itertools.pairwise(bounds):
        s = a
        while s < end:
            h, e = 0, None
            for i in range(s, min(s + cfg.max_tokens, end)):
                h = (h << 1) + g[i] - (g[i - w] << w if i - w >= s else 0)
                h &= M32
                length = i + 1 - s
                if length < cfg.min_tokens:
                    continue
                threshold = (
                    cfg.strict_threshold if length <= cfg.avg_tokens else cfg.loose_threshold
                )
                if h < threshold:
                    e = i + 1
                    break
            e = e if e is not None else min(s + cfg.max_tokens, end)
            spans.append((s, e))
            s = e
    return spans


@st.composite
def configs(draw):
    mn = draw(st.integers(1, 40))
    avg = draw(st.integers(mn, 96))
    mx = draw(st.integers(avg, 256))
    return ChunkerConfig(
        mn, avg, mx, seed=draw(st.integers(0, M64)), normalization=draw(st.integers(0, 3))
    )


@st.composite
def prompts(draw, max_len=1500):
    """Random tokens over a small or a large vocabulary (small gives repeated content)."""
    n = draw(st.integers(0, max_len))
    vocab = draw(st.sampled_from([3, 50, 130_000]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = rng.integers(0, vocab, n).astype(np.int32)
    anchors = draw(st.lists(st.integers(0, n), max_size=8))
    return ids, anchors


def _check_tiling(spans, n, cfg, anchors):
    assert [s for s, _ in spans[1:]] == [e for _, e in spans[:-1]]
    if n == 0:
        assert spans == []
        return
    assert spans[0][0] == 0 and spans[-1][1] == n
    starts = {s for s, _ in spans}
    seg_ends = {a for a in anchors if 0 < a < n} | {n}
    assert {a for a in anchors if a < n} <= starts  # every anchor is a chunk boundary
    for s, e in spans:
        assert 0 < e - s <= cfg.max_tokens
        if e not in seg_ends:  # only a segment's last chunk may be shorter than min
            assert e - s >= cfg.min_tokens


# --- properties ------------------------------------------------------------------------------


@SETTINGS
@given(prompts(max_len=600), configs())
def test_cut_spans_equals_token_by_token_reference(prompt, cfg):
    ids, anchors = prompt
    assert cut_spans(ids, cfg, anchors) == _ref_cut(ids, cfg, anchors)


@SETTINGS
@given(prompts(max_len=4000), configs())
def test_spans_tile_input_and_respect_bounds_and_anchors(prompt, cfg):
    ids, anchors = prompt
    spans = cut_spans(ids, cfg, anchors)
    _check_tiling(spans, len(ids), cfg, anchors)


def test_default_config_tiles_long_prompt_with_anchors():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 130_000, 50_000)
    anchors = sorted(rng.choice(50_000, 40, replace=False).tolist())
    cfg = ChunkerConfig()
    _check_tiling(cut_spans(ids, cfg, anchors), len(ids), cfg, anchors)


@SETTINGS
@given(st.data(), configs())
def test_same_content_after_anchor_gives_same_spans_whatever_precedes(data, cfg):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    vocab = data.draw(st.sampled_from([4, 130_000]))
    content = rng.integers(0, vocab, data.draw(st.integers(1, 1500)))
    heads = [rng.integers(0, vocab, data.draw(st.integers(0, 700))) for _ in range(2)]
    tails = []
    for head in heads:
        ids = np.concatenate([head, content])
        spans = cut_spans(ids, cfg, anchors=[len(head)])
        tails.append([(s - len(head), e - len(head)) for s, e in spans if s >= len(head)])
    assert tails[0] == tails[1]


# --- the hash --------------------------------------------------------------------------------


def test_gear_values_match_reference_for_any_int32_id():
    ids = np.array([0, 1, 2, 129_279, 131_072, 131_073, 163_839, 2**31 - 1, -1, -(2**31)])
    for seed in (0, 1, 2**64 - 1):
        got = gear_values(ids, seed).tolist()
        assert got == [_ref_gear(int(t), seed) for t in ids]
    # no aliasing of ids a table of 2**17 entries would fold together
    assert len(set(gear_values(np.arange(0, 300_000, 7)).tolist())) == len(range(0, 300_000, 7))
    assert gear_values(ids, 0).tolist() != gear_values(ids, 1).tolist()


@pytest.mark.parametrize("window", [1, 2, 8, 32])
def test_rolling_hash_equals_windowed_gear_sum(window):
    ids = np.random.default_rng(window).integers(0, 130_000, 300)
    g = [_ref_gear(int(t), 5) for t in ids]
    want = [sum(g[i - j] << j for j in range(window) if i - j >= 0) & M32 for i in range(len(ids))]
    assert rolling_hash(ids, window, seed=5).tolist() == want
    if window == 32:  # exactly the state of the sequential 32-bit gear loop
        h, seq = 0, []
        for x in g:
            h = ((h << 1) + x) & M32
            seq.append(h)
        assert rolling_hash(ids, 32, seed=5).tolist() == seq


def test_rolling_hash_refuses_bad_window():
    for w in (0, 3, 64):
        with pytest.raises(ValueError, match="window"):
            rolling_hash(np.arange(10), w)


def test_default_chunk_lengths_centre_near_avg_and_seed_changes_cuts():
    ids = np.random.default_rng(11).integers(0, 130_000, 65_536)
    cfg = ChunkerConfig()
    lengths = np.diff([s for s, _ in cut_spans(ids, cfg)] + [len(ids)])
    assert cfg.avg_tokens * 0.9 < lengths.mean() < cfg.avg_tokens * 1.5
    assert cut_spans(ids, cfg) != cut_spans(ids, ChunkerConfig(seed=1))


def test_empty_input_gives_no_spans():
    assert cut_spans([], ChunkerConfig()) == []
    assert cut_spans(np.zeros(0, np.int64), ChunkerConfig(), anchors=[0]) == []


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_tokens": 0}, "min_tokens"),
        ({"min_tokens": 200, "avg_tokens": 128}, "avg_tokens"),
        ({"avg_tokens": 1024, "max_tokens": 512}, "max_tokens"),
        ({"normalization": 5}, "normalization"),
        ({"normalization": -1}, "normalization"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"avg_tokens": True}, "avg_tokens"),
        ({"max_tokens": 512.0}, "max_tokens"),
        ({"avg_tokens": 1 << 25, "max_tokens": 1 << 26}, "avg_tokens"),
    ],
)
def test_invalid_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChunkerConfig(**kwargs)


def test_config_json_round_trip_and_refusals():
    cfg = ChunkerConfig(16, 64, 256, seed=9, normalization=1)
    assert ChunkerConfig.from_json(cfg.to_json()) == cfg
    assert ChunkerConfig.from_json({}) == ChunkerConfig()
    with pytest.raises(ValueError, match="unknown chunker config keys: window"):
        ChunkerConfig.from_json({"window": 8})
    with pytest.raises(ValueError, match="object"):
        ChunkerConfig.from_json([32, 128, 512])
    assert ChunkerConfig(min_tokens=8, avg_tokens=8, max_tokens=8).hash_window == 8
    assert ChunkerConfig(min_tokens=100).hash_window == 32


def test_bad_token_input_and_anchors_raise_value_error():
    cfg = ChunkerConfig()
    with pytest.raises(ValueError, match="1-D"):
        cut_spans(np.zeros((2, 3), np.int32), cfg)
    with pytest.raises(ValueError, match="int32 range: 4294967296"):
        cut_spans(np.array([1, 2**32]), cfg)
    with pytest.raises(ValueError, match="integers"):
        cut_spans(np.array([1.5, 2.0]), cfg)
    with pytest.raises(ValueError, match="anchor 11 outside"):
        cut_spans(np.arange(10), cfg, anchors=[3, 11])
    with pytest.raises(ValueError, match="anchor -1 outside"):
        cut_spans(np.arange(10), cfg, anchors=[-1])
    with pytest.raises(TypeError):
        cut_spans(np.arange(10), cfg, anchors=[2.5])
    assert cut_spans(np.arange(100), cfg, anchors=np.array([50, 50, 10])) == cut_spans(
        np.arange(100), cfg, anchors=[10, 50]
    )
    assert as_token_array([3, -5]).dtype == np.dtype("<i4")
