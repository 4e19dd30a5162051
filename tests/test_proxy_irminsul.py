"""The proxy in front of an Irminsul-capable engine (the fake answering the capability probe),
and its prompt analysis in front of a stock one; both with the shipped tiny tokenizer."""

from __future__ import annotations

import aiohttp
import anthropic
import openai
import pytest
from support.fake_sglang import FAKE_FINGERPRINT, FakeSGLang
from support.proxy_harness import TINY_MODEL, read_rows, start_stack, tiny_tokenizer

from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.fingerprint import model_fingerprint
from irminsul.engine_adapter.contract import (
    ANNOTATION_KEY,
    SGLANG_HINT_KEY,
    Annotation,
    ReuseCounts,
)
from irminsul.proxy.identity import tenant_hash

CHUNKER = ChunkerConfig(min_tokens=8, avg_tokens=16, max_tokens=64)
TOOLS_DOC = "\n".join(f"Tool {i}: reads file number {i} and returns its lines." for i in range(40))


@pytest.fixture(scope="module")
def tok():
    tokenizer = tiny_tokenizer()
    assert tokenizer is not None, "examples/models/tiny-mla tokenizer is missing"
    return tokenizer


def conversation(header: str, turns: int = 2) -> list[dict]:
    msgs = [{"role": "system", "content": f"{header}\n\n{TOOLS_DOC}"}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"Question {i}: what does tool {i} read?"},
                 {"role": "assistant", "content": f"It reads file number {i}."}]
    return msgs + [{"role": "user", "content": "Thanks, now summarise."}]


async def test_annotation_attached_checked_and_savings_reported(aiohttp_server, tmp_path, tok):
    db = tmp_path / "s.db"
    fake = FakeSGLang(tokenizer=tok, irminsul=True, chunker=CHUNKER)
    stack = await start_stack(aiohttp_server, fake=fake, tokenizer=tok, db=str(db))
    info = stack.state.upstream.info
    assert (info.mode, info.model_fingerprint, info.chunker) == ("irminsul", FAKE_FINGERPRINT,
                                                                 CHUNKER)
    client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="k", max_retries=0)
    first = conversation("Current time: 09:00")
    r1 = await client.chat.completions.create(model="m", messages=first,
                                              extra_headers={"x-session-id": "s1"})
    ann = Annotation.from_json(fake.annotations[-1])
    ids = tok.encode_chat(first).ids
    assert ann.matches(ids) and ann.session == "s1" and ann.model_fingerprint == FAKE_FINGERPRINT
    assert len(ann.chunks) > 3 and all(8 <= c.end - c.start <= 64 for c in ann.chunks[:-1])
    assert r1.usage.prompt_tokens == len(ids)

    # the header changed: the exact prefix ends early, the chunks after it are reused
    second = conversation("Current time: 09:05")
    stream = await client.chat.completions.create(model="m", messages=second, stream=True,
                                                  extra_headers={"x-session-id": "s1"})
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)  # the proxy's usage chunk stayed with it
    r2 = await client.chat.completions.create(model="m", messages=second + [
        {"role": "assistant", "content": "Summary."}, {"role": "user", "content": "More."}],
        extra_headers={"x-session-id": "s1"})
    counts = ReuseCounts.from_json(r2.model_extra["usage"]["irminsul"]
                                   if "irminsul" in (r2.model_extra.get("usage") or {})
                                   else r2.usage.model_extra["irminsul"])
    assert r2.usage.prompt_tokens_details.cached_tokens == counts.saved_tokens
    assert counts.exact_prefix_tokens > 0 and counts.saved_tokens > counts.exact_prefix_tokens
    await stack.close()
    rows = read_rows(db)
    assert [r["upstream_mode"] for r in rows] == ["irminsul"] * 3
    assert rows[1]["reused_tokens"] > 0 and rows[1]["miss_cause"] == "system_changed"
    assert rows[1]["exact_prefix_tokens"] < 10  # the header is a few tokens in
    assert rows[2]["reused_tokens"] == counts.reused_tokens and rows[2]["turn"] == 3
    assert rows[1]["chunks_total"] - 2 <= rows[1]["chunks_hit"] < rows[1]["chunks_total"]


async def test_generate_gets_the_annotation_not_kv_hints_and_anthropic_gets_savings(aiohttp_server, tok):
    fake = FakeSGLang(tokenizer=tok, irminsul=True, chunker=CHUNKER)
    stack = await start_stack(aiohttp_server, fake=fake, tokenizer=tok, db=None)
    text = "The quick brown fox jumps over the lazy dog. " * 20
    async with aiohttp.ClientSession() as http:
        for prefix in ("A. ", "B. "):
            async with http.post(stack.base + "/generate", json={"text": prefix + text}) as r:
                body = await r.json()
    ann = fake.annotations[-1]
    assert fake.received[-1].body[ANNOTATION_KEY] == ann
    assert SGLANG_HINT_KEY not in fake.received[-1].body  # SGLang would refuse it there
    assert Annotation.from_json(ann).matches(tok.encode_prompt("B. " + text).ids)
    meta = body["meta_info"]
    assert meta["cached_tokens"] == ReuseCounts.from_json(meta["irminsul"]).saved_tokens > 0

    client = anthropic.AsyncAnthropic(base_url=stack.base, api_key="k", max_retries=0)
    msgs = [{"role": "user", "content": text}]
    for system in ("Header one.", "Header two."):
        msg = await client.messages.create(model="m", max_tokens=5, system=system,
                                           messages=msgs)
    split = ReuseCounts.from_json(msg.usage.model_extra["irminsul"])
    assert msg.usage.cache_read_input_tokens == split.saved_tokens > split.exact_prefix_tokens
    assert msg.usage.input_tokens == split.prompt_tokens - split.saved_tokens
    await stack.close()


async def test_stock_mode_rows_explain_misses_and_potential_reuse(aiohttp_server, tmp_path, tok):
    db = tmp_path / "s.db"
    stack = await start_stack(aiohttp_server, fake=FakeSGLang(tokenizer=tok), tokenizer=tok,
                              db=str(db), chunker=CHUNKER, log_prompts=True,
                              model_dir=str(TINY_MODEL))
    assert stack.state.pipeline.model_fingerprint == model_fingerprint(TINY_MODEL)
    client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="sk-a", max_retries=0)
    for header in ("Current time: 09:00", "Current time: 09:05"):
        await client.chat.completions.create(model="m", messages=conversation(header),
                                             extra_headers={"x-session-id": "s2"})
    other = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="sk-b", max_retries=0)
    await other.chat.completions.create(model="m", messages=conversation("Current time: 10:00"),
                                        extra_headers={"x-session-id": "s3"})
    await stack.close()
    rows = read_rows(db)
    first, second, third = rows
    assert (first["turn"], first["miss_cause"], first["chunks_hit"]) == (1, "first_request", 0)
    assert second["turn"] == 2 and second["miss_cause"] == "system_changed"
    assert second["exact_prefix_tokens"] == second["diverge_offset"]
    assert second["potential_reuse_tokens"] > 0.8 * (second["prompt_tokens"]
                                                      - second["exact_prefix_tokens"])
    assert second["prompt"] == tok.encode_chat(conversation("Current time: 09:05")).text
    assert third["tenant"] == tenant_hash("sk-b") and third["potential_reuse_tokens"] > 0
    # FLOPs saved by the exact prefix, from the model's config.json
    assert first["flops_saved"] == 0 < second["flops_saved"] and second["energy_saved_j"] > 0


@pytest.mark.parametrize("isolate", [True, False])
async def test_isolated_tenants_share_no_chunks(aiohttp_server, tmp_path, tok, isolate):
    db = tmp_path / "s.db"
    stack = await start_stack(aiohttp_server, fake=FakeSGLang(tokenizer=tok), tokenizer=tok,
                              db=str(db), chunker=CHUNKER, isolate_tenants=isolate)
    for key in ("sk-a", "sk-b", "sk-a"):
        client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key=key, max_retries=0)
        await client.chat.completions.create(model="m", messages=conversation(f"Key {key}"))
    await stack.close()
    _, b, a2 = read_rows(db)
    if isolate:
        assert b["chunks_hit"] == 0 and b["potential_reuse_tokens"] == 0
    else:
        assert b["chunks_hit"] > 0 and b["potential_reuse_tokens"] > 0
    assert a2["chunks_hit"] == a2["chunks_total"]  # a tenant's own chunks are found again
    # SGLang's own radix cache is partitioned too: extra_key per tenant, none without isolation
    keys = [g.body.get("extra_key") for g in stack.fake.received]
    if isolate:
        assert keys == [f"irminsul-tenant:{tenant_hash(k)}" for k in ("sk-a", "sk-b", "sk-a")]
    else:
        assert keys == [None, None, None]


async def test_isolated_tenant_keeps_its_extra_key_partition(aiohttp_server, tok):
    """A client's own extra_key stays inside its tenant's partition, on the native and the
    translated (Anthropic -> chat) paths; a request without an API key gets none."""
    stack = await start_stack(aiohttp_server, fake=FakeSGLang(tokenizer=tok), tokenizer=tok,
                              db=None, chunker=CHUNKER, isolate_tenants=True)
    client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="sk-a", max_retries=0)
    await client.chat.completions.create(model="m", messages=conversation("x"),
                                         extra_body={"extra_key": "lora-1"})
    ant = anthropic.AsyncAnthropic(base_url=stack.base, api_key="sk-b", max_retries=0)
    await ant.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    async with aiohttp.ClientSession() as http, http.post(stack.base + "/v1/chat/completions",
                         json={"model": "m", "messages": conversation("y")}) as r:
        assert r.status == 200
    await stack.close()
    native, translated, keyless = stack.fake.received
    assert native.body["extra_key"] == f"irminsul-tenant:{tenant_hash('sk-a')}:lora-1"
    assert translated.path == "/v1/chat/completions"
    assert translated.body["extra_key"] == f"irminsul-tenant:{tenant_hash('sk-b')}"
    assert "extra_key" not in keyless.body


async def test_native_streams_report_saved_tokens(aiohttp_server, tok):
    fake = FakeSGLang(tokenizer=tok, irminsul=True, chunker=CHUNKER, responses_api=True,
                      messages_api=True)
    stack = await start_stack(aiohttp_server, fake=fake, tokenizer=tok, db=None)
    text = "The quick brown fox jumps over the lazy dog. " * 20
    client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="k", max_retries=0)
    for prefix in ("A. ", "B. "):
        stream = await client.responses.create(model="m", input=prefix + text, stream=True)
        events = [ev async for ev in stream]
    assert Annotation.from_json(fake.annotations[-1]).matches(
        tok.encode_chat([{"role": "user", "content": "B. " + text}]).ids)
    usage = events[-1].response.usage
    split = ReuseCounts.from_json(usage.model_extra["irminsul"])
    assert usage.input_tokens_details.cached_tokens == split.saved_tokens > split.exact_prefix_tokens

    ant = anthropic.AsyncAnthropic(base_url=stack.base, api_key="k", max_retries=0)
    async with ant.messages.stream(model="m", max_tokens=9, system="Another header.",
                                   messages=[{"role": "user", "content": text}]) as s:
        final = await s.get_final_message()
    assert fake.received[-1].path == "/v1/messages"
    split = ReuseCounts.from_json(final.usage.model_extra["irminsul"])
    assert final.usage.cache_read_input_tokens == split.saved_tokens > split.exact_prefix_tokens
    assert final.usage.input_tokens == split.prompt_tokens - split.saved_tokens
    await stack.close()
