"""Pieces of the proxy checked on their own: the forwarded body, the annotation's JSON, usage
rewriting, the seen-chunk set and the rows made from a request."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from irminsul.engine_adapter.contract import Annotation, ChunkRef, ReuseCounts
from irminsul.proxy.divergence import Divergence
from irminsul.proxy.exchange import Exchange, build_row
from irminsul.proxy.handlers import _encode
from irminsul.proxy.pipeline import Analysis, SeenChunks
from irminsul.proxy.usage import (
    UpstreamUsage,
    merge,
    read_anthropic,
    read_openai,
    rewrite_anthropic,
    rewrite_openai,
)

SPLIT = ReuseCounts(prompt_tokens=100, exact_prefix_tokens=10, reused_tokens=70,
                    recomputed_tokens=5, new_tokens=15, chunks_total=8, chunks_hit=6,
                    policy="pic")


def test_annotation_to_json_covers_every_field():
    ann = Annotation(num_tokens=30, seq_hash="ab", anchors=(0, 7),
                     chunks=(ChunkRef("k1", 0, 7), ChunkRef("k2", 7, 30)), namespace="t",
                     model_fingerprint="fp", policy="blend", policy_args={"r": 0.1},
                     session="s")
    # to_json is built by hand for speed: it must still carry every dataclass field
    expected = dataclasses.asdict(ann)
    expected["chunks"] = [list(c) for c in ann.chunks]
    expected["anchors"] = list(ann.anchors)
    assert ann.to_json() == expected
    assert Annotation.from_json(json.loads(json.dumps(ann.to_json()))) == ann


@pytest.mark.parametrize("raw", [b'{"a": [1, {"b": 2}]}', b'{"a": [1, {"b": 2}]}\n  ',
                                 b'{\n "a": [1, {"b": 2}]\n}\n', b"{}"])
def test_forwarded_body_splices_new_keys(raw):
    body = json.loads(raw)
    extra = {"irminsul": {"num_tokens": 3}, "stream_options": {"include_usage": True}}
    assert json.loads(_encode(raw, body, body, extra)) == {**body, **extra}
    assert _encode(raw, body, body, {}) is raw  # unchanged: the client's bytes as they came
    rewritten = {**body, "x": 1}
    assert json.loads(_encode(raw, body, rewritten, extra)) == {**rewritten, **extra}


def test_a_key_the_client_sent_is_replaced_not_doubled():
    raw = b'{"stream_options": {"include_usage": false}, "m": 1}'
    body = json.loads(raw)
    out = _encode(raw, body, body, {"stream_options": {"include_usage": True}})
    assert out.count(b"stream_options") == 1
    assert json.loads(out) == {"stream_options": {"include_usage": True}, "m": 1}


def test_usage_reported_as_saved_tokens():
    usage = {"prompt_tokens": 100, "completion_tokens": 4,
             "prompt_tokens_details": {"cached_tokens": 10}, "irminsul": SPLIT.to_json()}
    out = rewrite_openai(usage)
    assert out["prompt_tokens_details"]["cached_tokens"] == 80 and out["irminsul"] == usage[
        "irminsul"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 10  # input not mutated
    assert read_openai(usage) == UpstreamUsage(100, 4, 10, SPLIT)
    stock = {"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 10}}
    assert rewrite_openai(stock) is stock  # a stock engine's count is already what it skipped
    bad = {**usage, "irminsul": {**SPLIT.to_json(), "new_tokens": 99}}  # does not add up
    assert rewrite_openai(bad) is bad and read_openai(bad).counts is None
    ant = {"input_tokens": 90, "output_tokens": 4, "cache_read_input_tokens": 10,
           "irminsul": SPLIT.to_json()}
    assert rewrite_anthropic(ant)["cache_read_input_tokens"] == 80
    assert rewrite_anthropic(ant)["input_tokens"] == 20
    assert read_anthropic({"input_tokens": 90, "cache_read_input_tokens": 10,
                           "output_tokens": 1}) == UpstreamUsage(100, 1, 10, None)
    assert merge(UpstreamUsage(100, None, 10), UpstreamUsage(None, 7)) == UpstreamUsage(
        100, 7, 10)


def test_seen_chunks_compare_ids_and_stay_bounded():
    seen = SeenChunks(max_tokens=10)
    ids = np.arange(12, dtype=np.int32)
    chunks = (ChunkRef("a", 0, 4), ChunkRef("b", 4, 8))
    assert seen.observe(ids, chunks) == ()
    assert seen.observe(ids, chunks) == ((0, 4), (4, 8))
    liar = np.array([9, 9, 9, 9, 4, 5, 6, 7], dtype=np.int32)  # same key "a", other tokens
    assert seen.observe(liar, chunks) == ((4, 8),)
    seen.observe(ids, (ChunkRef("c", 8, 12),))  # 12 tokens > 10: the oldest ("a") goes
    assert len(seen) == 2 and seen.observe(ids, chunks[:1]) == ()


def analysis(hits) -> Analysis:
    ann = Annotation(100, "h", (ChunkRef("k", 0, 100),))
    div = Divergence(12, 1, "system_changed", "system prompt changed at token 12 (header)")
    return Analysis(100, ann.chunks * 4, hits, div, 2, ann, "text", 0.01)


def test_rows_from_exchanges():
    ex = Exchange(endpoint="/v1/chat/completions", mode="stock", t0=0.0, session="s",
                  status=200, usage=UpstreamUsage(100, 5, 12))
    ex.finish()
    row = build_row(ex, analysis(((0, 40), (50, 100))))
    assert (row.prompt_tokens, row.exact_prefix_tokens, row.new_tokens) == (100, 12, 88)
    assert row.potential_reuse_tokens == 28 + 50 and row.chunks_hit == 2
    assert (row.miss_cause, row.turn, row.diverge_offset) == ("system_changed", 2, 12)
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
           "v_head_dim": 16, "intermediate_size": 128, "vocab_size": 4096}
    ex.usage = UpstreamUsage(100, 5, 10, SPLIT)
    row = build_row(ex, None, hf_config=cfg)
    assert (row.reused_tokens, row.recomputed_tokens, row.policy) == (70, 5, "pic")
    assert row.potential_reuse_tokens is None and row.flops_saved > 0 and row.energy_saved_j > 0
    failed = Exchange(endpoint="/v1/messages", mode="stock", t0=0.0, session="s",
                      usage=UpstreamUsage(100, 5, 12))
    failed.fail(502, "upstream stream failed")
    row = build_row(failed, analysis(()))
    assert (row.status, row.prompt_tokens, row.exact_prefix_tokens) == (502, None, None)
    assert row.miss_cause == "system_changed"  # what the proxy knows before forwarding stays
