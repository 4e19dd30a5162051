"""The proxy in front of a stock (exact-prefix) SGLang, driven by the official OpenAI SDK."""

from __future__ import annotations

import aiohttp
import openai
from support.proxy_harness import read_rows, start_stack

SYSTEM = {"role": "system", "content": "You are a terse assistant."}


def client_for(stack, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="sk-test-key", max_retries=0,
                              **kw)


async def test_chat_whole_and_streamed(aiohttp_server, tmp_path):
    db = tmp_path / "savings.db"
    stack = await start_stack(aiohttp_server, db=str(db))
    client = client_for(stack)
    messages = [SYSTEM, {"role": "user", "content": "Say hello."}]
    first = await client.chat.completions.create(model="m", messages=messages)
    assert first.choices[0].message.content == stack.fake.knobs.reply
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = await client.chat.completions.create(model="m", messages=messages)
    # the fake's radix-style accounting: all but the last token were already there
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1

    stream = await client.chat.completions.create(model="m", messages=messages, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == stack.fake.knobs.reply
    # the proxy asked for usage itself, and kept the usage-only chunk from this client
    assert stack.fake.received[-1].body["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)

    stream = await client.chat.completions.create(
        model="m", messages=messages, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == again.usage.prompt_tokens
    await stack.close()

    rows = read_rows(db)
    assert [(r["endpoint"], r["status"], r["stream"]) for r in rows] == [
        ("/v1/chat/completions", 200, 0)] * 2 + [("/v1/chat/completions", 200, 1)] * 2
    p = first.usage.prompt_tokens
    assert [r["exact_prefix_tokens"] for r in rows] == [0, p - 1, p - 1, p - 1]
    assert all(r["prompt_tokens"] == p and r["new_tokens"] == p - r["exact_prefix_tokens"]
               for r in rows)
    assert all(r["upstream_mode"] == "stock" and r["completion_tokens"] == 9 for r in rows)
    assert rows[0]["ttft_ms"] is None and all(r["ttft_ms"] > 0 for r in rows[2:])
    assert all(r["total_ms"] >= (r["ttft_ms"] or 0) for r in rows)
    assert len({r["tenant"] for r in rows}) == 1 and "sk-test-key" not in str(rows)


async def test_completions_and_generate(aiohttp_server, tmp_path):
    db = tmp_path / "savings.db"
    stack = await start_stack(aiohttp_server, db=str(db))
    client = client_for(stack)
    done = await client.completions.create(model="m", prompt="Once upon a time", max_tokens=3)
    assert done.choices[0].text == "Hello from the"
    stream = await client.completions.create(model="m", prompt="Once upon a time", stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == stack.fake.knobs.reply

    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base + "/generate", json={
                "text": "Once upon a time", "sampling_params": {"max_new_tokens": 2}}) as r:
            assert r.status == 200
            body = await r.json()
        assert body["text"] == "Hello from"
        assert body["meta_info"]["cached_tokens"] == body["meta_info"]["prompt_tokens"] - 1
        async with http.post(stack.base + "/generate",
                             json={"input_ids": [5, 6, 7, 8], "stream": True}) as r:
            raw = await r.read()
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]" and len(events) == 9 + 2  # pieces, final, DONE
    await stack.close()
    rows = read_rows(db)
    assert [r["endpoint"] for r in rows] == ["/v1/completions"] * 2 + ["/generate"] * 2
    assert [r["completion_tokens"] for r in rows] == [3, 9, 2, 9]
    assert rows[3]["prompt_tokens"] == 4 and rows[3]["ttft_ms"] > 0


async def test_tool_calls_and_unknown_fields_reach_the_client(aiohttp_server):
    stack = await start_stack(aiohttp_server, db=None)
    stack.fake.knobs.tool_calls = True
    client = client_for(stack)
    extra = {"thinking": {"type": "enabled"}, "context_management": {"edits": []},
             "output_config": {"effort": "low"}}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief.",
                                        "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "system", "content": "<total_tokens>9000 tokens left</total_tokens>"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    done = await client.chat.completions.create(model="m", messages=messages, tools=tools,
                                                prompt_cache_key="sess-42", extra_body=extra)
    call = done.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')
    sent = stack.fake.received[-1].body
    assert {k: sent[k] for k in extra} == extra and sent["messages"] == messages
    assert sent["prompt_cache_key"] == "sess-42"

    stream = await client.chat.completions.create(model="m", messages=messages, tools=tools,
                                                  stream=True, extra_body=extra)
    args = ""
    async for c in stream:
        for tc in c.choices[0].delta.tool_calls or () if c.choices else ():
            args += tc.function.arguments or ""
    assert args == '{"city": "Paris"}'
    await stack.close()


async def test_other_paths_are_relayed_unchanged(aiohttp_server):
    stack = await start_stack(aiohttp_server, db=None)
    models = await client_for(stack).models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert stack.fake.received == []  # GETs are not recorded as generation requests
    async with aiohttp.ClientSession() as http:
        for path in ("/health", "/model_info", "/get_model_info"):
            async with http.get(stack.base + path) as r:
                assert r.status == 200, path
        async with http.post(stack.base + "/v1/unknown/endpoint", json={"x": 1},
                             headers={"Authorization": "Bearer sk-abc"}) as r:
            assert r.status == 404  # the upstream's answer, relayed
        async with http.post(stack.base + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": "Bearer sk-abc", "x-api-key": "k2"}) as r:
            assert r.status == 200
    seen = stack.fake.received[-1].headers
    assert seen["Authorization"] == "Bearer sk-abc" and seen["x-api-key"] == "k2"
    await stack.close()


async def test_metrics_count_requests_and_tokens(aiohttp_server):
    stack = await start_stack(aiohttp_server, db=None)
    client = client_for(stack)
    messages = [SYSTEM, {"role": "user", "content": "count me"}]
    for _ in range(3):
        r = await client.chat.completions.create(model="m", messages=messages)
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base + "/v1/chat/completions", data=b"{nope") as resp:
            assert resp.status == 400
        async with http.get(stack.base + "/metrics") as resp:
            text = await resp.text()
    lines = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
             if ln and not ln.startswith("#")}
    ok = 'irminsul_proxy_requests_total{endpoint="/v1/chat/completions",mode="stock",status="200"}'
    bad = 'irminsul_proxy_requests_total{endpoint="/v1/chat/completions",mode="stock",status="400"}'
    assert lines[ok] == 3 and lines[bad] == 1
    p = r.usage.prompt_tokens
    assert lines['irminsul_proxy_prompt_tokens_total{endpoint="/v1/chat/completions"}'] == 3 * p
    assert lines['irminsul_proxy_saved_tokens_total{kind="exact_prefix"}'] == 2 * (p - 1)
    assert lines["irminsul_proxy_in_flight"] == 0
    await stack.close()
