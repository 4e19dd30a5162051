"""`irminsul replay` against real local servers (the fake SGLang, and the proxy in front of it),
rows in a temporary SQLite savings log; reading recorded traffic; CLI errors."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from click.testing import CliRunner
from support.fake_sglang import FakeSGLang
from support.proxy_harness import read_rows, start_stack, tiny_tokenizer

from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.keys import Chunker
from irminsul.proxy.oracle import OracleConfig, analyze, trace_items
from irminsul.proxy.replay import ReplayConfig, replay_command, replay_to_db
from irminsul.proxy.trace_io import load_trace, read_trace
from irminsul.proxy.traces import TraceConfig, generate, write_trace

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "traces"
SMALL = {"skills": 2, "skill_tokens": 60, "memory_tokens": 30, "tool_tokens": 150,
         "doc_tokens": 100, "tools": 3, "tool_desc_tokens": 20}


def small_trace(tmp_path, family="reorder", **kw) -> Path:
    path = tmp_path / f"{family}.jsonl"
    write_trace(generate(TraceConfig.preset(family, **{**SMALL, **kw})), path)
    return path


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


async def test_replay_logs_every_request_with_the_servers_counts(aiohttp_server, tmp_path):
    fake = FakeSGLang(messages_api=True)
    server = await aiohttp_server(fake.app())
    requests = load_trace(EXAMPLES / "mixed.jsonl")
    assert {r.api for r in requests} == {"openai", "anthropic"}
    db = tmp_path / "replay.db"
    config = ReplayConfig(str(server.make_url("")), "run-a", concurrency=1, max_tokens=4)
    summary = await replay_to_db(requests, config, db)
    assert (summary.requests, summary.failed, summary.upstream_mode) == (len(requests), 0, "stock")

    rows = read_rows(db)
    assert len(rows) == len(requests) == len(fake.history)
    # one session at a time: rows and the fake's requests are in the same order
    for i, (row, got) in enumerate(zip(rows, fake.received)):
        assert got.headers["x-session-id"] == row["session"]
        assert got.body["stream"] is True and got.body["max_tokens"] == 4
        if row["endpoint"] == "/v1/chat/completions":
            assert got.body["stream_options"] == {"include_usage": True}
        exact = max((common_prefix(fake.history[i], h) for h in fake.history[:i]), default=0)
        assert row["prompt_tokens"] == len(fake.history[i])
        assert row["exact_prefix_tokens"] == exact
        assert row["completion_tokens"] == 4 and row["status"] == 200 and row["error"] is None
        assert 0 < row["ttft_ms"] <= row["total_ms"]
    assert {(r["source"], r["run"], r["upstream_mode"], r["stream"]) for r in rows} == {
        ("replay", "run-a", "stock", 1)}
    by_key = {(r.session, r.turn): r for r in requests}
    for row in rows:
        req = by_key[(row["session"], row["turn"])]
        assert (row["family"], row["endpoint"]) == (req.family, req.endpoint)
    assert any(r["exact_prefix_tokens"] > 0 for r in rows)


async def test_sessions_run_concurrently_each_in_order(aiohttp_server, tmp_path):
    fake = FakeSGLang()
    fake.knobs.chunk_delay = 0.002
    server = await aiohttp_server(fake.app())
    requests = load_trace(small_trace(tmp_path, sessions=4, turns=3))
    config = ReplayConfig(str(server.make_url("")), "conc", concurrency=3)
    await replay_to_db(requests, config, tmp_path / "c.db")
    sessions = [g.headers["x-session-id"] for g in fake.received]
    assert len(set(sessions[:3])) == 3  # three sessions started at once
    turns: dict[str, list[int]] = {}
    for g in fake.received:
        sent = [r for r in requests if r.body["messages"] == g.body["messages"]]
        turns.setdefault(g.headers["x-session-id"], []).append(sent[0].turn)
    assert all(t == sorted(t) and len(t) == 3 for t in turns.values()) and len(turns) == 4
    assert len(read_rows(tmp_path / "c.db")) == 12


async def test_through_the_proxy_reuse_matches_the_oracle(aiohttp_server, tmp_path):
    tok = tiny_tokenizer()
    assert tok is not None, "examples/models/tiny-mla tokenizer is missing"
    chunker = ChunkerConfig(min_tokens=16, avg_tokens=64, max_tokens=256)
    fake = FakeSGLang(tokenizer=tok, irminsul=True, chunker=chunker)
    stack = await start_stack(aiohttp_server, fake=fake, tokenizer=tok, db=None)
    requests = load_trace(small_trace(tmp_path, "rag", sessions=2, turns=3, docs=3))
    db = tmp_path / "proxy-replay.db"
    summary = await replay_to_db(requests, ReplayConfig(stack.base, "via-proxy", concurrency=1,
                                                        max_tokens=2), db)
    await stack.close()
    assert summary.failed == 0 and summary.upstream_mode == "irminsul"
    rows = read_rows(db)
    # the engine's own accounting, as the proxy relayed it, equals the offline analysis
    order = [(r["session"], r["turn"]) for r in rows]
    ordered = sorted(requests, key=lambda r: order.index((r.session, r.turn)))
    expect = analyze(trace_items(ordered, tok), Chunker(chunker),
                     OracleConfig(prefix_scope="global"))
    assert [r["prompt_tokens"] for r in rows] == [e.prompt_tokens for e in expect]
    assert [r["exact_prefix_tokens"] for r in rows] == [e.exact_prefix_tokens for e in expect]
    assert [r["reused_tokens"] for r in rows] == [e.content for e in expect]
    assert sum(r["reused_tokens"] for r in rows) > 0
    assert all(r["new_tokens"] is not None and r["policy"] == "pic" for r in rows)


async def test_failures_are_rows_and_the_replay_goes_on(aiohttp_server, tmp_path):
    fake = FakeSGLang()
    server = await aiohttp_server(fake.app())
    requests = load_trace(small_trace(tmp_path, sessions=2, turns=2))
    base = str(server.make_url(""))
    fake.knobs.refuse_status = 503
    s1 = await replay_to_db(requests, ReplayConfig(base, "refused"), tmp_path / "f.db")
    fake.knobs.refuse_status = None
    fake.knobs.die_after_chunks = 2
    s2 = await replay_to_db(requests, ReplayConfig(base, "dies"), tmp_path / "f.db")
    await server.close()  # nothing listens there any more
    s3 = await replay_to_db(requests, ReplayConfig(base, "gone", timeout_s=5), tmp_path / "f.db")
    assert s1.failed == s2.failed == s3.failed == len(requests) == 4
    rows = read_rows(tmp_path / "f.db")
    by_run = {run: [r for r in rows if r["run"] == run] for run in ("refused", "dies", "gone")}
    assert all(len(v) == 4 for v in by_run.values())
    assert all(r["status"] == 503 and "refused by knob" in r["error"] for r in by_run["refused"])
    assert all(r["status"] == 200 and "stream broken" in r["error"] for r in by_run["dies"])
    assert all(r["status"] is None and r["error"] for r in by_run["gone"])


async def test_recorded_traffic_in_both_shapes(aiohttp_server, tmp_path):
    # what the proxy's --record writes, produced by a real proxy
    record = tmp_path / "rec.jsonl"
    stack = await start_stack(aiohttp_server, db=None, record=str(record))
    bodies = [{"model": "m", "messages": [{"role": "user", "content": f"Hi {i}"}],
               "max_tokens": 3} for i in range(3)]
    async with aiohttp.ClientSession() as http:
        for i, body in enumerate(bodies):
            async with http.post(stack.base + "/v1/chat/completions", json=body,
                                 headers={"x-session-id": f"s{i % 2}"}) as resp:
                assert resp.status == 200
    await stack.close()
    with record.open("a") as f:  # other line types and endpoints are passed over
        f.write(json.dumps({"type": "response", "body": {}}) + "\n")
        f.write(json.dumps({"type": "request", "endpoint": "/v1/responses", "session": "s9",
                            "body": {"input": "x"}}) + "\n")
    recorded = read_trace(record)
    assert [r.body for r in recorded.requests] == bodies
    assert [(r.session, r.turn) for r in recorded.requests] == [("s0", 0), ("s1", 0), ("s0", 1)]
    assert recorded.skipped == ("line 5: endpoint /v1/responses",)

    # bare OpenAI chat bodies, one per line: sessions derived as the proxy derives them
    bare = tmp_path / "bare.jsonl"
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}]
    lines = [{"model": "m", "messages": convo},
             {"model": "m", "messages": [convo[0], {"role": "user", "content": "Other"}]},
             {"model": "m", "messages": [*convo, {"role": "assistant", "content": "A1"},
                                         {"role": "user", "content": "Q2"}]}]
    bare.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    plain = load_trace(bare)
    assert [r.turn for r in plain] == [0, 0, 1] and plain[0].session == plain[2].session
    assert plain[0].session != plain[1].session and plain[0].session.startswith("derived-")

    fake = FakeSGLang()
    server = await aiohttp_server(fake.app())
    db = tmp_path / "rec.db"
    await replay_to_db(recorded.requests + plain, ReplayConfig(str(server.make_url("")), "rec"), db)
    rows = read_rows(db)
    assert len(rows) == 6 and all(r["status"] == 200 and r["family"] is None for r in rows)


@pytest.mark.parametrize("content, message", [
    (None, "no such trace file"),
    ('{"session": "s", "endpoint": "/v1/chat/completions", "body": {"messages": []}}\n{oops\n',
     "line 2: not valid JSON"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('{"session": "s", "body": "text"}\n', "line 1: 'body' must be a JSON object"),
    ('{"hello": 1}\n', "line 1: neither a trace line"),
    ('{"session": "", "body": {}}\n', "line 1: 'session' must be a non-empty string"),
    ("\n\n", "no requests replay can send"),
])
def test_cli_names_the_problem_with_a_trace_file(tmp_path, content, message):
    path = tmp_path / "t.jsonl"
    if content is not None:
        path.write_text(content)
    result = CliRunner().invoke(replay_command, [str(path), "--base-url", "http://127.0.0.1:9",
                                                 "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x.db").exists()  # nothing was sent, nothing logged


def test_cli_replays_a_sample_into_the_db(tmp_path):
    """The command end to end, against a fake engine served from its own thread."""
    fake = FakeSGLang(messages_api=True)
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    runner = web.AppRunner(fake.app())

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        ready.set()
        loop.run_until_complete(stop.wait())
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    port = runner.addresses[0][1]
    try:
        db = tmp_path / "cli.db"
        result = CliRunner().invoke(replay_command, [
            str(EXAMPLES / "rag.jsonl"), "--base-url", f"127.0.0.1:{port}", "--run", "cli",
            "--db", str(db), "--limit", "4", "--max-tokens", "2", "--concurrency", "2"])
        assert result.exit_code == 0, result.output
        assert "4 requests of 2 sessions" in result.output and "0 failed" in result.output
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
    rows = read_rows(db)
    assert len(rows) == 4 and {r["run"] for r in rows} == {"cli"}
    assert {r["family"] for r in rows} == {"rag"} and all(r["completion_tokens"] == 2 for r in rows)


def _textless_app(finish: bool) -> web.Application:
    """A server whose streamed answers carry no text: OpenAI's role chunk then, when ``finish``,
    the chunk that ends the answer; Anthropic's events likewise (a model whose first token is a
    stop token, or decodes to half a UTF-8 character, answers like this)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
        if finish:
            chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        chunks.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 1}})
        for c in chunks:
            await resp.write(f"data: {json.dumps(c)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def messages(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = [("message_start", {"type": "message_start", "message": {
            "usage": {"input_tokens": 7, "output_tokens": 0}}})]
        if finish:
            events.append(("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}))
        events.append(("message_stop", {"type": "message_stop"}))
        for name, data in events:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    return app


@pytest.mark.parametrize("finish", [True, False])
async def test_an_answer_without_text_has_a_ttft_when_it_ended(aiohttp_server, tmp_path, finish):
    server = await aiohttp_server(_textless_app(finish))
    requests = load_trace(EXAMPLES / "mixed.jsonl")[:6]
    assert {r.api for r in requests} == {"openai", "anthropic"}
    db = tmp_path / "t.db"
    await replay_to_db(requests, ReplayConfig(str(server.make_url("")), "textless"), db)
    rows = read_rows(db)
    assert len(rows) == 6 and all(r["error"] is None for r in rows)
    if finish:  # the end of the answer is when its (only) token came
        assert all(0 < r["ttft_ms"] <= r["total_ms"] for r in rows)
    else:  # no token was ever shown: no TTFT rather than an invented one
        assert all(r["ttft_ms"] is None for r in rows)


async def test_the_proxy_logs_the_same_ttft_for_an_answer_without_text(aiohttp_server, tmp_path):
    from irminsul.proxy.app import create_app
    from irminsul.proxy.config import ProxyConfig

    upstream = await aiohttp_server(_textless_app(finish=True))
    proxy_db = tmp_path / "proxy.db"
    app = create_app(ProxyConfig(upstream=str(upstream.make_url("")), db=str(proxy_db)),
                     tokenizer=tiny_tokenizer())
    proxy = await aiohttp_server(app)
    requests = load_trace(EXAMPLES / "mixed.jsonl")[:6]
    await replay_to_db(requests, ReplayConfig(str(proxy.make_url("")), "via"), tmp_path / "r.db")
    await proxy.close()  # the proxy writes its rows after answering: closing flushes them
    rows = read_rows(proxy_db)
    assert len(rows) == 6 and all(r["error"] is None for r in rows)
    assert all(0 < r["ttft_ms"] <= r["total_ms"] for r in rows)
