"""Faults: bad input, oversized bodies, an upstream that refuses, hangs, dies mid-stream, and a
client that goes away. Each one gives the client an answer in its API's shape, one row with
its status, and leaves the proxy serving."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import anthropic
import openai
import pytest
from support.fake_sglang import FakeSGLang
from support.proxy_harness import read_rows, start_stack

from irminsul.proxy.app import create_app
from irminsul.proxy.config import ProxyConfig

MESSAGES = [{"role": "user", "content": "hello"}]


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def post(url: str, **kw) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(url, **kw) as r:
        return r.status, await r.json(content_type=None)


async def still_serves(stack) -> None:
    status, body = await post(stack.base + "/v1/chat/completions", json={"messages": MESSAGES})
    assert status == 200 and body["choices"][0]["message"]["content"]


async def test_bad_requests_get_400_in_each_api_shape(aiohttp_server, tmp_path):
    db = tmp_path / "s.db"
    stack = await start_stack(aiohttp_server, db=str(db))
    chat = stack.base + "/v1/chat/completions"
    status, body = await post(chat, data=b'{"messages": [')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in body["error"]["message"]
    status, body = await post(chat, json=[1, 2])
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = await post(chat, json={"messages": "hello"})
    assert (status, body["error"]["param"]) == (400, "messages")
    status, body = await post(chat, json={"messages": MESSAGES, "stream": "yes"})
    assert (status, body["error"]["param"]) == (400, "stream")
    status, body = await post(stack.base + "/v1/completions", json={"model": "m"})
    assert (status, body["error"]["param"]) == (400, "prompt")
    status, body = await post(stack.base + "/generate", json={"sampling_params": {}})
    assert status == 400
    status, body = await post(stack.base + "/v1/messages", data=b"nope")
    assert status == 400 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    status, body = await post(stack.base + "/v1/messages", json={"model": "m", "messages": []})
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = await post(stack.base + "/v1/responses", json={"model": "m"})
    assert (status, body["error"]["param"]) == (400, "input")
    assert stack.fake.received == []  # nothing bad was forwarded
    await still_serves(stack)
    await stack.close()
    rows = read_rows(db)
    assert [r["status"] for r in rows] == [400] * 9 + [200]
    assert all(r["error"] and r["prompt_tokens"] is None for r in rows[:9])


async def test_body_over_the_limit_is_413(aiohttp_server, tmp_path):
    db = tmp_path / "s.db"
    stack = await start_stack(aiohttp_server, db=str(db), max_body_bytes=4096)
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    status, body = await post(stack.base + "/v1/chat/completions", json=big)
    assert status == 413 and "limit of 4096" in body["error"]["message"]
    status, body = await post(stack.base + "/v1/messages", json={**big, "max_tokens": 5})
    assert status == 413 and body["error"]["type"] == "request_too_large"
    await still_serves(stack)
    await stack.close()
    assert [r["status"] for r in read_rows(db)] == [413, 413, 200]


async def test_upstream_refusing_connections_is_502(aiohttp_server, tmp_path):
    db = tmp_path / "s.db"
    app = create_app(ProxyConfig(upstream=f"127.0.0.1:{free_port()}", db=str(db)))
    proxy = await aiohttp_server(app)
    base = str(proxy.make_url("")).rstrip("/")
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert err.value.status_code == 502 and "refused" in err.value.message
    ant = anthropic.AsyncAnthropic(base_url=base, api_key="k", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as err:
        await ant.messages.create(model="m", max_tokens=5, messages=MESSAGES)
    assert err.value.status_code == 502
    async with aiohttp.ClientSession() as http, http.get(base + "/v1/models") as r:
        assert r.status == 502
    await proxy.close()
    rows = read_rows(db)
    assert [(r["status"], r["upstream_mode"]) for r in rows] == [(502, "stock")] * 2
    assert "refused" in rows[0]["error"]


async def test_upstream_hang_is_504_and_the_upstream_request_is_dropped(aiohttp_server, tmp_path):
    db = tmp_path / "s.db"
    stack = await start_stack(aiohttp_server, db=str(db), upstream_timeout=0.3)
    stack.fake.knobs.hang = True
    client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert err.value.status_code == 504
    await asyncio.wait_for(stack.fake.cancel_event.wait(), 5)
    assert stack.fake.cancelled == 1
    stack.fake.knobs.hang = False
    await still_serves(stack)
    await stack.close()
    rows = read_rows(db)
    assert [r["status"] for r in rows] == [504, 200] and "timeout" in rows[0]["error"]


async def test_upstream_refusal_status_is_relayed(aiohttp_server, tmp_path):
    db = tmp_path / "s.db"
    stack = await start_stack(aiohttp_server, db=str(db))
    stack.fake.knobs.refuse_status = 503
    status, body = await post(stack.base + "/v1/chat/completions", json={"messages": MESSAGES})
    assert status == 503 and body["error"]["message"] == "refused by knob"
    ant = anthropic.AsyncAnthropic(base_url=stack.base, api_key="k", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as err:  # translated: Anthropic error shape
        await ant.messages.create(model="m", max_tokens=5, messages=MESSAGES)
    assert err.value.status_code == 503 and err.value.body["error"]["message"] == "refused by knob"
    await stack.close()
    assert [r["status"] for r in read_rows(db)] == [503, 503]


async def test_upstream_dying_mid_stream_ends_with_an_error_event(aiohttp_server, tmp_path):
    db = tmp_path / "s.db"
    stack = await start_stack(aiohttp_server, db=str(db))
    stack.fake.knobs.die_after_chunks = 3
    client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="k", max_retries=0)
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    got = []
    with pytest.raises(openai.APIError) as err:
        async for c in stream:
            got.append(c.choices[0].delta.content)
    assert got == ["", "Hello", " from"] and "upstream stream failed" in err.value.message

    ant = anthropic.AsyncAnthropic(base_url=stack.base, api_key="k", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as err:
        async with ant.messages.stream(model="m", max_tokens=50, messages=MESSAGES) as s:
            async for _ in s:
                pass
    assert "upstream stream failed" in str(err.value)
    stack.fake.knobs.die_after_chunks = None
    await still_serves(stack)
    await stack.close()
    rows = read_rows(db)
    assert [(r["status"], r["stream"]) for r in rows] == [(502, 1), (502, 1), (200, 0)]
    assert rows[0]["ttft_ms"] > 0 and rows[0]["prompt_tokens"] is None


async def test_client_disconnect_cancels_the_upstream_request(aiohttp_server, tmp_path):
    db = tmp_path / "s.db"
    fake = FakeSGLang()
    fake.knobs.stream_forever, fake.knobs.chunk_delay = True, 0.01
    stack = await start_stack(aiohttp_server, fake=fake, db=str(db))
    async with aiohttp.ClientSession() as http:
        resp = await http.post(stack.base + "/v1/chat/completions",
                               json={"messages": MESSAGES, "stream": True})
        assert resp.status == 200
        for _ in range(3):
            assert (await resp.content.readline()).startswith(b"data: ")
            await resp.content.readline()
        resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(fake.cancel_event.wait(), 5)
    assert fake.cancelled == 1
    fake.knobs.stream_forever = False
    await still_serves(stack)
    await stack.close()
    rows = read_rows(db)
    assert [r["status"] for r in rows] == [499, 200] and "disconnect" in rows[0]["error"]
