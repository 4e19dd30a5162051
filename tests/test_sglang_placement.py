"""The SGLang plugin's pure logic: kv_hints envelope, content index, first run, rounds.

No SGLang import: these always run. The shared planner (make_plan) plans over the index through
PlannerView, as the backend does."""

from __future__ import annotations

import numpy as np
import pytest

from irminsul.chunking.keys import Chunker
from irminsul.engine_adapter.contract import Annotation, ChunkRef, seq_hash
from irminsul.engine_adapter.embedded.planner import (
    NEW,
    PREFIX,
    RECOMPUTED,
    REUSED,
    PolicyArgs,
    make_plan,
)
from irminsul.engine_adapter.sglang.hints import annotation_from_kv_hints, kv_hints_envelope
from irminsul.engine_adapter.sglang.matching import PlannerView, SlotIndex
from irminsul.engine_adapter.sglang.placement import first_run, run_counts, split_rounds

SCOPE = ("", "")


def _tiles(n: int, size: int, tag: str) -> tuple[ChunkRef, ...]:
    return tuple(ChunkRef(f"{tag}{s // size}", s, min(s + size, n)) for s in range(0, n, size))


def _refs(ids, size, keyed):
    """Chunks of `size` tokens whose key is the tokens themselves (content keys)."""
    return tuple(ChunkRef(keyed(ids[s : s + size]), s, min(s + size, len(ids)))
                 for s in range(0, len(ids), size))


def _key(tokens) -> str:
    return "k" + ",".join(map(str, np.asarray(tokens).tolist()))


def _plan(index, ids, exact, *, k=0, resident=lambda s: 1 << 30):
    view = PlannerView(index, SCOPE, exact, resident)
    chunks = _refs(ids, 4, _key)
    return make_plan(view, np.asarray(ids, np.int32), chunks, policy="pic", args=PolicyArgs(k=k))


# ---- kv_hints --------------------------------------------------------------------------------
def test_envelope_round_trip_and_foreign_actions_ignored():
    ids = list(range(10))
    ann = Annotation(10, seq_hash(ids), _tiles(10, 5, "c"), anchors=(0, 5), namespace="t1")
    env = kv_hints_envelope(ann, "rid-1")
    assert env["actions"][0]["action_type"] == "irminsul.chunks"
    assert annotation_from_kv_hints(env) == ann
    other = {"protocol_version": "1", "message_id": "m", "actions": [
        {"action_id": "x", "action_type": "vendor.pin", "action_version": "1", "payload": {}}]}
    assert annotation_from_kv_hints(other) is None
    assert annotation_from_kv_hints(None) is None


def test_malformed_or_newer_annotation_is_ignored_not_raised():
    env = kv_hints_envelope(Annotation(4, "h", _tiles(4, 2, "c")), "m")
    env["actions"][0]["payload"]["chunks"] = [["a", 0, 3], ["b", 2, 4]]  # overlapping
    assert annotation_from_kv_hints(env) is None
    env["actions"][0]["action_version"] = "2"
    assert annotation_from_kv_hints(env) is None


# ---- SlotIndex -------------------------------------------------------------------------------
def test_index_verifies_ids_and_scope():
    ids = np.arange(100, 120, dtype=np.int32)
    chunks = _refs(ids, 4, _key)
    index = SlotIndex()
    assert index.record(ids, chunks, covered=18, scope=SCOPE) == 4  # the 5th ends at 20 > 18
    site = index.lookup(chunks[2].key, ids[8:12], SCOPE)
    assert site is not None and (site.start, site.end, site.position) == (8, 12, 8)
    assert site.prev_key == chunks[1].key
    assert np.array_equal(site.prefix_ids(), ids[:12])
    assert index.lookup(chunks[2].key, ids[8:12] + 1, SCOPE) is None  # same key, other tokens
    assert index.lookup(chunks[2].key, ids[8:12], ("tenant-b", "")) is None
    assert chunks[4].key not in index


def test_index_drops_oldest_prompt_and_forgets_stale_sites():
    index = SlotIndex(max_prompts=2)
    prompts = [np.arange(i * 100, i * 100 + 8, dtype=np.int32) for i in range(3)]
    for p in prompts:
        index.record(p, _refs(p, 4, _key), 8, SCOPE)
    assert index.lookup(_key(prompts[0][:4]), prompts[0][:4], SCOPE) is None
    site = index.lookup(_key(prompts[1][4:]), prompts[1][4:], SCOPE)
    assert site is not None
    index.forget(site)
    assert index.lookup(_key(prompts[1][:4]), prompts[1][:4], SCOPE) is None
    assert index.stats().prompts == 1
    with pytest.raises(ValueError):
        SlotIndex(max_prompts=0)


# ---- planning through the shared planner -------------------------------------------------------
def test_shared_planner_places_hits_after_sglang_prefix():
    stored = np.arange(1000, 1016, dtype=np.int32)  # 4 chunks of 4
    index = SlotIndex()
    index.record(stored, _refs(stored, 4, _key), 16, SCOPE)
    # new prompt: 4 exact-prefix tokens SGLang matched, then stored chunks 2 and 3, then new
    ids = np.concatenate([np.arange(4, dtype=np.int32), stored[8:16], np.arange(50, 54)])
    plan = _plan(index, ids, exact=4)
    assert plan.prefix_len == 4
    assert (plan.source[:4] == PREFIX).all() and (plan.source[4:12] == REUSED).all()
    assert (plan.source[12:] == NEW).all()
    run = first_run(plan, limit=len(ids) - 1)
    assert (run.start, run.length) == (4, 8)
    assert [(s.src_position, s.start, s.length) for s in run.segments] == [(8, 4, 4), (12, 8, 4)]
    counts = run_counts(plan, run)
    assert (counts.exact_prefix_tokens, counts.reused_tokens, counts.new_tokens) == (4, 8, 4)


def test_stale_sites_are_missed_and_forgotten():
    stored = np.arange(1000, 1008, dtype=np.int32)
    index = SlotIndex()
    index.record(stored, _refs(stored, 4, _key), 8, SCOPE)
    ids = np.concatenate([stored, np.arange(5, dtype=np.int32)])
    plan = _plan(index, ids, exact=0, resident=lambda s: 0)
    assert not (plan.source == REUSED).any()
    assert index.stats().chunks == 0


def test_hole_gives_two_rounds_and_only_the_first_run_is_placed():
    a, b = np.arange(1000, 1008, dtype=np.int32), np.arange(2000, 2008, dtype=np.int32)
    index = SlotIndex()
    for p in (a, b):
        index.record(p, _refs(p, 4, _key), 8, SCOPE)
    hole = np.arange(7, 11, dtype=np.int32)
    ids = np.concatenate([a, hole, b, np.arange(60, 64, dtype=np.int32)])  # hit, new, hit, new
    plan = _plan(index, ids, exact=0)
    rounds = split_rounds(plan)
    assert [tuple(r) for r in rounds] == [(0, 8, 12), (12, 20, 24)]
    run = first_run(plan, limit=len(ids) - 1)
    assert (run.start, run.length) == (0, 8)
    counts = run_counts(plan, run)
    assert counts.reused_tokens == 8 and counts.recomputed_tokens == 8  # b's hit is computed
    assert counts.prompt_tokens == len(ids)


def test_pic_carve_out_is_a_hole_at_the_start_of_a_run():
    a = np.arange(1000, 1012, dtype=np.int32)
    index = SlotIndex()
    index.record(a, _refs(a, 4, _key), 12, SCOPE)
    ids = np.concatenate([np.arange(3, 7, dtype=np.int32), a[4:], np.arange(70, 73)])
    plan = _plan(index, ids, exact=4, k=2)  # chunk a[4:8] follows another chunk than a[0:4]
    assert (plan.source[4:6] == RECOMPUTED).all() and (plan.source[6:12] == REUSED).all()
    assert first_run(plan, limit=len(ids) - 1).length == 0  # recompute first: nothing placed
    assert split_rounds(plan)[1].place_start == 6


def test_first_run_respects_limit_and_pages():
    stored = np.arange(1000, 1012, dtype=np.int32)
    index = SlotIndex()
    index.record(stored, _refs(stored, 4, _key), 12, SCOPE)
    ids = np.concatenate([np.arange(4, dtype=np.int32), stored[4:12], [9]]).astype(np.int32)
    plan = _plan(index, ids, exact=4)
    assert first_run(plan, limit=10).length == 6
    assert first_run(plan, limit=10, page_size=4).length == 4
    with pytest.raises(ValueError, match="page aligned"):
        first_run(plan, limit=10, page_size=3)


def test_chunker_keys_find_the_same_content_at_another_offset():
    """The real chunker: content after a different prefix is found again (CDC resyncs)."""
    rng = np.random.default_rng(0)
    doc = rng.integers(0, 30000, size=3000, dtype=np.int32)
    chunker = Chunker()
    first = np.concatenate([rng.integers(0, 30000, 100, dtype=np.int32), doc])
    index = SlotIndex()
    index.record(first, chunker.split(first), len(first), SCOPE)
    second = np.concatenate([rng.integers(0, 30000, 37, dtype=np.int32), doc, [1, 2, 3]])
    plan = make_plan(PlannerView(index, SCOPE, 0, lambda s: 1 << 30), second,
                     chunker.split(second), policy="pic", args=PolicyArgs(k=0))
    reused = np.flatnonzero(plan.source == REUSED)
    assert len(reused) > len(doc) // 2
    for p in plan.placements:  # every placed token is the token stored at its source
        src = p.entry.ids[p.offset : p.offset + p.length]
        assert np.array_equal(src, second[p.start : p.start + p.length])


def test_partial_eviction_keeps_the_chunks_still_held():
    ids = np.arange(500, 516, dtype=np.int32)
    index = SlotIndex()
    index.record(ids, _refs(ids, 4, _key), 16, SCOPE)
    held = {"n": 9}  # SGLang evicted the tail: tokens 9.. are gone
    view = PlannerView(index, SCOPE, 0, lambda site: held["n"])
    assert view.lookup(_key(ids[12:16]), ids[12:16]) is None
    assert view.lookup(_key(ids[4:8]), ids[4:8]) is not None  # ends at 8 <= 9: kept
    assert _key(ids[8:12]) not in index  # ends at 12 > 9: dropped with the missed one


# ---- `irminsul sglang` -------------------------------------------------------------------------
def test_sglang_command_adds_backend_and_whitelist():
    import click
    from click.testing import CliRunner

    from irminsul.engine_adapter.sglang.command import launch, sglang_command

    argv, env = launch(["--model-path", "m", "--port", "30000"], {"SGLANG_PLUGINS": "other"},
                       policy="pic", pic_k=2)
    assert argv[1:] == ["-m", "sglang.launch_server", "--model-path", "m", "--port", "30000",
                        "--radix-cache-backend", "irminsul"]
    assert env["SGLANG_PLUGINS"] == "other,irminsul" and env["IRMINSUL_SGLANG_PIC_K"] == "2"
    _, env = launch(["--radix-cache-backend=irminsul"], {})
    assert "SGLANG_PLUGINS" not in env  # unset: SGLang loads every plugin, ours included
    with pytest.raises(click.UsageError, match="conflicts"):
        launch(["--radix-cache-backend", "flexkv"], {})
    with pytest.raises(click.UsageError, match="IRMINSUL_SGLANG_PIC_K"):
        launch([], {"IRMINSUL_SGLANG_PIC_K": "x"})
    out = CliRunner().invoke(sglang_command, ["--dry-run", "--model-path", "m"],
                             catch_exceptions=False)
    assert out.exit_code == 0 and "--radix-cache-backend irminsul" in out.output


def test_composed_key_separates_every_scope_and_prefix():
    from irminsul.engine_adapter.sglang.composed import (
        COMPOSED_PREFIX,
        composed_key,
        is_composed_key,
    )

    secret = bytes(range(16))
    base = composed_key(secret, None, None, "", [1, 2, 3])
    assert is_composed_key(base) and base.startswith(COMPOSED_PREFIX)
    assert base == composed_key(secret, None, None, "", [1, 2, 3])  # deterministic per secret
    others = [
        composed_key(secret, "", None, "", [1, 2, 3]),  # "" is not None
        composed_key(secret, "lora", None, "", [1, 2, 3]),
        composed_key(secret, None, "salt", "", [1, 2, 3]),
        composed_key(secret, None, None, "tenant", [1, 2, 3]),
        composed_key(secret, None, None, "", [1, 2]),
        composed_key(secret, None, None, "", []),
        composed_key(bytes(16), None, None, "", [1, 2, 3]),
        composed_key(secret, "a", "b", "", [1]),
        composed_key(secret, "a", None, "b", [1]),  # framed: fields never run together
    ]
    assert len({base, *others}) == len(others) + 1
    assert not is_composed_key(None) and not is_composed_key("lora")
    with pytest.raises(ValueError, match="secret"):
        composed_key(b"short", None, None, "", [1])
