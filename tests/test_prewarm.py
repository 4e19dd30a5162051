"""--prewarm (proxy/prewarm.py): where pre-warm requests end, the request's honest split, and
the whole path through a real proxy in front of the SGLang-shaped test server: the pre-warm
/generate request with the prompt's token IDs up to the seen run, then the request itself,
whose usage (to the client and in the savings log) does not count the pre-warmed head as
saved."""

from __future__ import annotations

import asyncio
import itertools
import json
import random

import aiohttp
import pytest
from support.fake_sglang import FakeSGLang
from support.proxy_harness import read_rows, start_stack, tiny_tokenizer

from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.keys import Chunker
from irminsul.chunking.runs import cuts
from irminsul.engine_adapter.contract import ChunkRef
from irminsul.proxy import trace_content
from irminsul.proxy.prewarm import Prewarmed, Warmed, _read


def _chunks(*bounds):
    return tuple(ChunkRef(f"k{a}", a, b) for a, b in itertools.pairwise(bounds))


def test_cuts_end_where_a_long_seen_run_follows_unseen_tokens():
    chunks = _chunks(0, 10, 20, 300, 600, 610, 900, 1200)
    seen = [(0, 10), (20, 300), (300, 600), (610, 900), (900, 1200)]
    # the leading run is the exact prefix's business; (10, 20) and (600, 610) are new
    assert cuts(chunks, seen, limit=4, min_tokens=256) == (20, 610)
    assert cuts(chunks, seen, limit=1, min_tokens=256) == (20,)
    assert cuts(chunks, seen, limit=0, min_tokens=256) == ()
    assert cuts(chunks, seen, limit=4, min_tokens=581) == (610,)  # 20..600 is 580 long
    assert cuts(chunks, seen, limit=4, min_tokens=256, k=16) == (36, 626)  # pic's carve-out
    assert cuts(chunks, seen, limit=4, min_tokens=256, k=10_000) == (599, 1199)  # inside it
    assert cuts(chunks, [], limit=4, min_tokens=1) == ()
    assert cuts(chunks, [(c.start, c.end) for c in chunks], limit=4, min_tokens=1) == ()


def test_split_counts_every_computed_token_as_new():
    usage = {"prompt_tokens": 1000, "completion_tokens": 3,
             "prompt_tokens_details": {"cached_tokens": 120}}
    # the pre-warm of 120 tokens found 40 in cache and computed 80; the request then found
    # its 120 "cached": of those, only the 40 were saved
    got = Prewarmed([Warmed(120, 40)]).split(usage)["irminsul"]
    assert (got["exact_prefix_tokens"], got["reused_tokens"], got["new_tokens"]) == (40, 0, 960)
    # a pre-warm that placed 50 tokens (the backend's meta_info) computed 30 of its 120
    got = Prewarmed([Warmed(120, 40, 50)]).split(usage)["irminsul"]
    assert (got["exact_prefix_tokens"], got["reused_tokens"], got["new_tokens"]) == (40, 50, 910)
    # two pre-warms; the request's own cached part is the last one's prompt
    usage2 = {**usage, "prompt_tokens_details": {"cached_tokens": 400}}
    got = Prewarmed([Warmed(120, 40, 50), Warmed(400, 119, 200)]).split(usage2)["irminsul"]
    assert got["new_tokens"] == 30 + 81 + 600 and got["reused_tokens"] == 960 - 711
    assert sum(got[k] for k in ("exact_prefix_tokens", "reused_tokens", "recomputed_tokens",
                                "new_tokens")) == 1000
    # nothing to go on: usage unchanged
    assert "irminsul" not in Prewarmed().split(usage)
    assert "irminsul" not in Prewarmed([Warmed(120, 40)]).split({"prompt_tokens": 1000})


def test_a_prewarm_answer_is_read_from_either_place_of_the_split():
    split = {"prompt_tokens": 120, "exact_prefix_tokens": 40, "reused_tokens": 50,
             "new_tokens": 30}
    plain = {"meta_info": {"prompt_tokens": 120, "cached_tokens": 40}}
    assert _read(plain) == Warmed(120, 40, 0)  # plain SGLang: nothing placed
    backend = {"meta_info": {**plain["meta_info"], "cached_tokens_details": {"irminsul": split}}}
    assert _read(backend) == Warmed(120, 40, 50)  # SGLang with the irminsul backend
    engine = {"meta_info": {**plain["meta_info"], "irminsul": split}}
    assert _read(engine) == Warmed(120, 40, 50)  # an engine speaking the wire contract
    for bad in ({}, {"meta_info": {"prompt_tokens": 10, "cached_tokens": 11}}, [],
                {"meta_info": {"prompt_tokens": 10}}):
        assert _read(bad) is None


def _conversation(header: str, question: str) -> list[dict]:
    rng = random.Random(5)
    return [{"role": "system", "content": "You answer from the documents. "
             + trace_content.prose(rng, 60)},
            {"role": "user", "content": header},
            {"role": "user", "content": "# Notes\n\n" + trace_content.prose(rng, 500)},
            {"role": "user", "content": "# More notes\n\n" + trace_content.prose(rng, 500)},
            {"role": "user", "content": question}]


async def _wait_seen(stack, at_least: int) -> None:
    for _ in range(500):
        if len(stack.state.pipeline.seen) >= at_least:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the proxy never analysed the first request")


@pytest.mark.parametrize("stream", [True, False])
async def test_prewarm_through_the_proxy(aiohttp_server, tmp_path, stream):
    tok = tiny_tokenizer()
    fake = FakeSGLang(tokenizer=tok)  # plain SGLang's accounting: the exact prefix only
    db = tmp_path / "rows.db"
    stack = await start_stack(aiohttp_server, fake=fake, tokenizer=tok, db=str(db), prewarm=2,
                              isolate_tenants=True)
    first = _conversation("Current time: 2025-01-01 10:00. Working directory: /srv/a", "Sum up.")
    second = _conversation("Current time: 2025-01-02 11:30. Working directory: /srv/b", "Why?")
    headers = {"Authorization": "Bearer key-1"}
    async with aiohttp.ClientSession() as http:
        url = stack.base + "/v1/chat/completions"
        async with http.post(url, json={"model": "m", "messages": first, "max_tokens": 2},
                             headers=headers) as r:
            assert r.status == 200
        await _wait_seen(stack, 3)
        assert len(fake.received) == 1  # nothing seen before the first request: no pre-warm
        body = {"model": "m", "messages": second, "max_tokens": 2, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        async with http.post(url, json=body, headers=headers) as r:
            assert r.status == 200
            if stream:
                usage = [json.loads(line[6:]) for line in (await r.text()).splitlines()
                         if line.startswith("data: {") and '"usage"' in line][-1]["usage"]
            else:
                usage = (await r.json())["usage"]
    await stack.close()

    prompt = tok.encode_chat(second)
    ids, doc_start = list(prompt.ids), prompt.message_starts[2]
    warm, main = fake.received[1], fake.received[2]
    assert warm.path == "/generate" and main.path == "/v1/chat/completions"
    # the pre-warm ends where the backend's own next chunk (cut over token IDs alone, as a
    # chat request reaches it) repeats one of the first prompt's: just inside the documents
    cut = len(warm.body["input_ids"])
    assert warm.body["input_ids"] == ids[:cut]
    chunker = Chunker(ChunkerConfig())
    bare_a = {tuple(fake.history[0][c.start:c.end]) for c in chunker.split(fake.history[0])}
    bare_b = {c.start: tuple(ids[c.start:c.end]) for c in chunker.split(ids)}
    assert doc_start <= cut < doc_start + 2 * ChunkerConfig().max_tokens
    assert bare_b[cut] in bare_a
    assert warm.body["sampling_params"] == {"max_new_tokens": 0}
    assert warm.body["extra_key"] == main.body["extra_key"]  # the tenant's partition
    assert warm.body["extra_key"].startswith("irminsul-tenant:")
    # the first request's exact prefix ends in the header: that, and only that, was saved
    exact = next(i for i, (a, b) in enumerate(zip(fake.history[0], ids)) if a != b)
    assert 0 < exact < doc_start <= cut
    assert usage["prompt_tokens"] == len(ids)
    assert usage["prompt_tokens_details"]["cached_tokens"] == exact  # not doc_start
    split = usage["irminsul"]
    assert (split["exact_prefix_tokens"], split["reused_tokens"]) == (exact, 0)
    assert split["new_tokens"] == len(ids) - exact
    rows = read_rows(db)
    assert len(rows) == 2
    assert (rows[1]["exact_prefix_tokens"], rows[1]["reused_tokens"], rows[1]["new_tokens"]) == (
        exact, 0, len(ids) - exact)


async def test_kv_hints_carry_the_annotation_on_generate(aiohttp_server):
    """--kv-hints: a /generate request reaches SGLang with the chunk annotation in its kv_hints
    envelope (the backend's reader accepts it and it matches the prompt's tokens); a client's
    own envelope keeps its actions; without the flag nothing is added."""
    from irminsul.engine_adapter.sglang.hints import annotation_from_kv_hints

    tok = tiny_tokenizer()
    text = "# Notes\n\n" + trace_content.prose(random.Random(3), 300) + "\n\n# Ask\n\nWhy?"
    ids = [int(t) for t in tok.encode_prompt(text).ids]
    theirs = {"protocol_version": "1", "message_id": "c1", "actions": [
        {"action_id": "x", "action_type": "other.hint", "action_version": "1", "payload": {}}]}
    for flag in (True, False):
        fake = FakeSGLang(tokenizer=tok)
        stack = await start_stack(aiohttp_server, fake=fake, tokenizer=tok, db=None,
                                  kv_hints=flag, isolate_tenants=True)
        async with aiohttp.ClientSession() as http:
            for body in ({"text": text}, {"input_ids": ids}, {"text": text, "kv_hints": theirs}):
                async with http.post(stack.base + "/generate", headers={"x-api-key": "k"},
                                     json={**body, "sampling_params": {"max_new_tokens": 2}}) as r:
                    assert r.status == 200
                    await r.read()
        await stack.close()
        sent = [g.body.get("kv_hints") for g in fake.received]
        if not flag:
            assert sent == [None, None, theirs]
            continue
        for i, hints in enumerate(sent):
            ann = annotation_from_kv_hints(hints)
            assert ann is not None and ann.matches(ids) and ann.namespace  # and the tenant
            # text has its section start as an anchor; bare token IDs carry none
            assert len(ann.anchors) == (0 if i == 1 else 1)
        assert sent[2]["message_id"] == "c1" and sent[2]["actions"][0] == theirs["actions"][0]
        assert [a["action_type"] for a in sent[2]["actions"]] == ["other.hint", "irminsul.chunks"]
