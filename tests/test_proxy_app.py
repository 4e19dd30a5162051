"""The app's life cycle: an upstream started by the proxy itself (the embedded-engine hook), an
upstream that only comes up after the proxy, and a stream that falls silent."""

from __future__ import annotations

import socket

import aiohttp
import openai
import pytest
from aiohttp import web
from support.fake_sglang import FakeSGLang
from support.proxy_harness import read_rows, start_stack

from irminsul.proxy import upstream as upstream_module
from irminsul.proxy.app import create_app
from irminsul.proxy.config import ProxyConfig

MESSAGES = [{"role": "user", "content": "hello"}]


async def test_upstream_ctx_starts_the_engine_first_and_stops_it_last(aiohttp_server, tmp_path):
    events = []
    fake = FakeSGLang(irminsul=True)

    async def engine(app):
        runner = web.AppRunner(fake.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        events.append("engine up")
        yield f"127.0.0.1:{port}"
        events.append("engine down")
        await runner.cleanup()

    db = tmp_path / "s.db"
    app = create_app(ProxyConfig(upstream=None, db=str(db)), upstream_ctx=engine)
    proxy = await aiohttp_server(app)
    assert events == ["engine up"]
    base = str(proxy.make_url("/v1"))
    r = await openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0
                                 ).chat.completions.create(model="m", messages=MESSAGES)
    assert r.choices[0].message.content == fake.knobs.reply
    await proxy.close()
    assert events == ["engine up", "engine down"]
    rows = read_rows(db)
    assert [(r["upstream_mode"], r["status"]) for r in rows] == [("irminsul", 200)]
    with pytest.raises(ValueError, match="no upstream"):
        create_app(ProxyConfig(upstream=None))


async def test_an_upstream_that_comes_up_later_is_probed_again(aiohttp_server, monkeypatch):
    monkeypatch.setattr(upstream_module, "RETRY_PROBE_S", 0.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = await aiohttp_server(create_app(ProxyConfig(upstream=f"127.0.0.1:{port}", db=None)))
    up = proxy.app[upstream_module.UPSTREAM_KEY]
    assert not up.info.reachable
    url = str(proxy.make_url("/v1/chat/completions"))
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={"messages": MESSAGES}) as r:
            assert r.status == 502
        fake = FakeSGLang(irminsul=True)
        runner = web.AppRunner(fake.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with http.post(url, json={"messages": MESSAGES}) as r:
                assert r.status == 200
            assert up.info.reachable and up.info.mode == "irminsul"
        finally:
            await runner.cleanup()


async def test_silence_mid_stream_ends_it_with_a_timeout_event(aiohttp_server, tmp_path):
    db = tmp_path / "s.db"
    stack = await start_stack(aiohttp_server, db=str(db), upstream_timeout=0.2)
    stack.fake.knobs.chunk_delay = 0.5  # longer than the timeout, between two chunks
    client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIError, match="did not answer within"):
        # (on a loaded machine the silence may already come before the first chunk: a 504)
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        async for _ in stream:
            pass
    await stack.close()
    assert [(r["status"], r["stream"]) for r in read_rows(db)] == [(504, 1)]
