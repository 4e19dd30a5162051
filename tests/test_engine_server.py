"""The embedded engine's HTTP server over raw HTTP: SGLang's /generate, the OpenAI shapes,
reuse accounting, annotations, cache control, probes, cancellation and bad input.

One real Engine on the tiny random checkpoint serves every test (module scope); each test gets
its own server (a real aiohttp server on 127.0.0.1, port 0) and flushes the cache where the
counts it checks depend on what is stored.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import sys

import aiohttp
import pytest
from click.testing import CliRunner
from support.models import yarn_model  # noqa: F401  (fixture)

from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.keys import Chunker
from irminsul.engine_adapter.contract import (
    ANNOTATION_KEY,
    CAPABILITY_PATH,
    SGLANG_HINT_KEY,
    Annotation,
    ReuseCounts,
    capabilities,
    seq_hash,
)
from irminsul.engine_adapter.embedded.command import ByteSize, serve_command, start_embedded
from irminsul.engine_adapter.embedded.config import POLICIES, EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine
from irminsul.engine_adapter.embedded.proxy_upstream import embedded_upstream_ctx
from irminsul.engine_adapter.embedded.server import ENGINE_SERVER, create_engine_app
from irminsul.proxy.app import create_app
from irminsul.proxy.config import ProxyConfig
from irminsul.proxy.sse import SSEParser

MAX_SEQ = 2048
# Small chunks so that prompts of a few hundred tokens hold several of them.
CHUNKER = ChunkerConfig(min_tokens=8, avg_tokens=32, max_tokens=128)
DOC = "\n".join(f"def function_{i}(value):\n    return value * {i} + {i * i}" for i in range(20))
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(yarn_model):  # noqa: F811
    return Engine(EngineConfig(model_dir=str(yarn_model), device="cpu", max_seq_len=MAX_SEQ,
                               chunker=CHUNKER))


@pytest.fixture
async def http(aiohttp_server, engine):
    server = await aiohttp_server(create_engine_app(engine))
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as session:
        yield session


async def post(http, path, body):
    async with http.post(path, json=body) as resp:
        return resp.status, await resp.json()


async def events(http, path, body) -> list[str]:
    """The data fields of every SSE event of a streamed response, [DONE] included."""
    async with http.post(path, json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        parser = SSEParser()
        out = [e.data for e in parser.feed(await resp.read())]
        return out + [e.data for e in parser.close()]


async def flush(http):
    async with http.post("/flush_cache") as resp:
        assert resp.status == 200


async def stats(http):
    async with http.get("/irminsul/stats") as resp:
        assert resp.status == 200
        return await resp.json()


def assert_counts(counts: dict, prompt_tokens: int) -> ReuseCounts:
    parsed = ReuseCounts.from_json(counts)  # raises if the parts do not add up
    assert parsed.prompt_tokens == prompt_tokens
    return parsed


# ---- /generate --------------------------------------------------------------------------------


async def test_generate_text_is_greedy_deterministic_and_matches_input_ids(http, engine):
    body = {"text": DOC[:200], "sampling_params": GREEDY}
    await flush(http)
    status, first = await post(http, "/generate", body)
    assert status == 200
    await flush(http)
    _, again = await post(http, "/generate", body)
    assert again["text"] == first["text"] and again["output_ids"] == first["output_ids"]

    ids = engine.tokenizer.encode_prompt(DOC[:200]).ids
    meta = first["meta_info"]
    assert meta["prompt_tokens"] == len(ids)
    assert meta["completion_tokens"] == len(first["output_ids"]) == 8
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert first["text"] == engine.tokenizer.decode(first["output_ids"])
    counts = assert_counts(meta["irminsul"], len(ids))
    assert meta["cached_tokens"] == counts.exact_prefix_tokens == 0  # flushed before
    assert meta["e2e_latency"] > 0

    await flush(http)
    _, by_ids = await post(http, "/generate",
                           {"input_ids": ids.tolist(), "sampling_params": GREEDY})
    assert by_ids["output_ids"] == first["output_ids"]
    assert by_ids["text"] == first["text"]


async def test_generate_stream_is_cumulative_and_ends_with_done(http):
    body = {"text": DOC[:200], "sampling_params": GREEDY}
    await flush(http)
    _, whole = await post(http, "/generate", body)
    await flush(http)
    data = await events(http, "/generate", {**body, "stream": True})
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(chunks) >= 8  # one per token at least: decoding is streamed, not batched
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last["text"] == whole["text"] and last["output_ids"] == whole["output_ids"]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert_counts(last["meta_info"]["irminsul"], whole["meta_info"]["prompt_tokens"])


async def test_stop_token_and_stop_string_end_the_output(http, engine):
    body = {"text": DOC[:120], "sampling_params": {**GREEDY, "max_new_tokens": 16}}
    await flush(http)
    _, full = await post(http, "/generate", body)
    ids = full["output_ids"]
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # first occurrence
    await flush(http)
    _, by_id = await post(http, "/generate", {
        **body, "sampling_params": {**body["sampling_params"], "stop_token_ids": [ids[k]]}})
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[k]}
    assert by_id["output_ids"] == ids[: k + 1]  # the stop token is generated, counted ...
    assert by_id["text"] == engine.tokenizer.decode(ids[:k])  # ... but not in the text

    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    await flush(http)
    _, by_str = await post(http, "/generate", {
        **body, "sampling_params": {**body["sampling_params"], "stop": [stop]}})
    assert by_str["text"] == text[: text.find(stop)]
    assert by_str["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


# ---- reuse accounting, annotations, policy override -------------------------------------------


async def test_content_moved_behind_a_new_header_is_reused(http):
    await flush(http)
    first_body = {"text": "# run 1\n" + DOC, "sampling_params": {**GREEDY, "max_new_tokens": 1}}
    _, first = await post(http, "/generate", first_body)
    meta = first["meta_info"]
    first_counts = assert_counts(meta["irminsul"], meta["prompt_tokens"])
    assert first_counts.reused_tokens == 0

    second_body = {"text": "# a different, longer header for run 2\n" + DOC,
                   "sampling_params": {**GREEDY, "max_new_tokens": 1},
                   "irminsul_policy": "pic", "irminsul_policy_args": {"k": 2}}
    _, second = await post(http, "/generate", second_body)
    meta = second["meta_info"]
    counts = assert_counts(meta["irminsul"], meta["prompt_tokens"])
    assert counts.policy == "pic"
    assert counts.reused_tokens > 0 and counts.chunks_hit > 0
    assert meta["cached_tokens"] == counts.exact_prefix_tokens  # exact prefix only
    assert counts.exact_prefix_tokens < 5  # the header changed right after the BOS
    assert counts.reused_tokens > counts.prompt_tokens // 2


async def test_annotation_is_used_when_it_matches_and_ignored_when_not(http, engine):
    prompt = engine.tokenizer.encode_prompt(DOC[:300])
    chunks = Chunker(engine.config.chunker).split(
        prompt.ids, anchors=prompt.anchors, model_fingerprint=engine.model_fingerprint)
    good = Annotation(len(prompt.ids), seq_hash(prompt.ids), chunks, prompt.anchors,
                      model_fingerprint=engine.model_fingerprint)
    wrong = Annotation(good.num_tokens, "0" * 16, chunks, model_fingerprint=good.model_fingerprint)
    body = {"text": DOC[:300], "sampling_params": GREEDY}

    await flush(http)
    _, plain = await post(http, "/generate", body)
    outputs = {}
    for name, extra in [("good", {ANNOTATION_KEY: good.to_json()}),
                        ("hint", {SGLANG_HINT_KEY: good.to_json()}),
                        ("wrong", {ANNOTATION_KEY: wrong.to_json()})]:
        before = (await stats(http))["engine"]
        await flush(http)
        status, out = await post(http, "/generate", {**body, **extra})
        assert status == 200
        after = (await stats(http))["engine"]
        used = after["annotations_used"] - before["annotations_used"]
        ignored = after["annotations_ignored"] - before["annotations_ignored"]
        assert (used, ignored) == ((0, 1) if name == "wrong" else (1, 0)), name
        outputs[name] = out["text"]
    assert outputs == dict.fromkeys(outputs, plain["text"])  # correct output either way


async def test_policy_comes_from_the_annotation_unless_the_request_names_one(http, engine):
    ids = engine.tokenizer.encode_prompt("hello there").ids
    ann = Annotation(len(ids), seq_hash(ids), (), policy="prefix").to_json()
    body = {"text": "hello there", "sampling_params": {**GREEDY, "max_new_tokens": 1}}
    _, out = await post(http, "/generate", {**body, ANNOTATION_KEY: ann})
    assert out["meta_info"]["irminsul"]["policy"] == "prefix"
    _, out = await post(http, "/generate", {**body, ANNOTATION_KEY: ann,
                                            "irminsul_policy": "full"})
    assert out["meta_info"]["irminsul"]["policy"] == "full"
    _, out = await post(http, "/generate", body)
    assert out["meta_info"]["irminsul"]["policy"] == engine.config.policy


@pytest.mark.parametrize("bad", [{"wire_version": 99}, {"wire_version": 1, "chunks": "x"},
                                 "not an object", {"wire_version": 1, "num_tokens": 3,
                                                   "seq_hash": "x", "chunks": [["k", 0, 2]]}])
async def test_malformed_annotation_is_counted_and_ignored(http, bad):
    before = (await stats(http))["server"]
    status, out = await post(http, "/generate", {"text": "hello", ANNOTATION_KEY: bad,
                                                 "sampling_params": GREEDY})
    assert status == 200 and len(out["output_ids"]) == 8
    after = (await stats(http))["server"]
    assert after["annotations_malformed"] == before["annotations_malformed"] + 1
    assert after["annotations_seen"] == before["annotations_seen"] + 1


async def test_extra_key_partitions_the_cache_without_an_annotation(http):
    """As in SGLang, a request's extra_key partitions the cache: the same text under another
    extra_key gets neither the exact prefix nor content hits; under its own it does."""
    await flush(http)
    body = {"text": DOC[:400], "sampling_params": {**GREEDY, "max_new_tokens": 1},
            "irminsul_policy": "pic"}
    await post(http, "/generate", {**body, "extra_key": "tenant-a"})
    _, other = await post(http, "/generate", {**body, "extra_key": "tenant-b"})
    counts = assert_counts(other["meta_info"]["irminsul"], other["meta_info"]["prompt_tokens"])
    assert counts.exact_prefix_tokens == 0 and counts.reused_tokens == 0
    _, plain = await post(http, "/generate", body)  # no extra_key: its own partition too
    assert plain["meta_info"]["cached_tokens"] == 0
    _, same = await post(http, "/generate", {**body, "extra_key": "tenant-a"})
    assert same["meta_info"]["cached_tokens"] > 0


async def test_flush_cache_empties_the_store(http):
    body = {"text": DOC[:300], "sampling_params": {**GREEDY, "max_new_tokens": 1}}
    await post(http, "/generate", body)
    assert (await stats(http))["store"]["entries"] > 0
    _, again = await post(http, "/generate", body)
    assert again["meta_info"]["cached_tokens"] > 0
    await flush(http)
    store = (await stats(http))["store"]
    assert store["entries"] == 0 and store["bytes"] == 0
    _, fresh = await post(http, "/generate", body)
    assert fresh["meta_info"]["cached_tokens"] == 0


# ---- OpenAI shapes over raw HTTP (the SDKs are in test_engine_server_sdk.py) -------------------


async def test_chat_stream_chunks_and_usage(http):
    body = {"model": "m", "messages": [{"role": "system", "content": DOC[:200]},
                                       {"role": "user", "content": "hi"}],
            "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    data = await events(http, "/v1/chat/completions", body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("length", "stop") and set(finishes[:-1]) == {None}
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and all(c["usage"] is None for c in chunks[:-1])
    counts = assert_counts(usage["irminsul"], usage["prompt_tokens"])
    assert usage["prompt_tokens_details"]["cached_tokens"] == counts.exact_prefix_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_completions_prompt_string_and_token_ids(http, engine):
    ids = engine.tokenizer.encode_prompt(DOC[:100]).ids.tolist()
    outs = []
    for prompt in (DOC[:100], ids):
        await flush(http)
        status, out = await post(http, "/v1/completions", {
            "model": "m", "prompt": prompt, "max_tokens": 5, "temperature": 0})
        assert status == 200 and out["object"] == "text_completion"
        assert out["usage"]["prompt_tokens"] == len(ids)
        outs.append(out["choices"][0]["text"])
    assert outs[0] == outs[1]


# ---- probes -----------------------------------------------------------------------------------


async def test_health_model_info_models_and_capabilities(http, engine):
    async with http.get("/health") as resp:
        assert resp.status == 200
    for path in ("/model_info", "/get_model_info"):
        async with http.get(path) as resp:
            info = await resp.json()
        assert info["model_path"] == engine.config.model_dir
        assert info["tokenizer_path"] == engine.config.model_dir
        assert info["is_generation"] is True
    async with http.get("/v1/models") as resp:
        models = await resp.json()
    assert [m["id"] for m in models["data"]] == [engine.model_name]
    async with http.get(CAPABILITY_PATH) as resp:
        assert resp.status == 200
        caps = await resp.json()
    assert caps == capabilities(engine="embedded", model=engine.model_name,
                                model_fingerprint=engine.model_fingerprint,
                                chunker=CHUNKER.to_json(),
                                policies=[p for p in POLICIES if p != "clip"],  # no aux/
                                default_policy="pic")


# ---- cancellation -----------------------------------------------------------------------------


async def generated_since(http, before: int) -> int:
    """Tokens generated since ``before``, after a follow-up request that queues behind
    whatever is still running (so the count is final when it answers)."""
    status, _ = await post(http, "/generate", {"text": "x", "sampling_params": {
        "max_new_tokens": 1, "temperature": 0}})
    assert status == 200
    return (await stats(http))["engine"]["generated_tokens"] - before - 1


LONG = {"text": "hello", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True,
                                             "temperature": 0}}


async def test_disconnected_stream_stops_the_engine(http):
    before = (await stats(http))["engine"]["generated_tokens"]
    resp = await http.post("/generate", json={**LONG, "stream": True})
    assert (await resp.content.readline()).startswith(b"data: ")
    resp.close()  # drops the connection
    assert await generated_since(http, before) < 1000


async def test_disconnected_request_stops_the_engine(http):
    before = (await stats(http))["engine"]["generated_tokens"]
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(http.post("/generate", json=LONG), timeout=0.3)
    assert await generated_since(http, before) < 1000


async def test_concurrent_requests_queue_and_all_finish(http):
    bodies = [{"text": f"{DOC[:50]} #{i}", "sampling_params": GREEDY} for i in range(3)]
    results = await asyncio.gather(*(post(http, "/generate", b) for b in bodies))
    assert [status for status, _ in results] == [200] * 3
    assert [len(out["output_ids"]) for _, out in results] == [8] * 3


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,needle", [
    ("/generate", {"sampling_params": GREEDY}, "exactly one of"),
    ("/generate", {"text": "a", "input_ids": [1]}, "exactly one of"),
    ("/generate", {"input_ids": [5, 4096]}, "input_ids"),
    ("/generate", {"text": ["a", "b"]}, "batches"),
    ("/generate", {"text": "a", "sampling_params": {"temperature": -1}}, "temperature"),
    ("/generate", {"text": "a", "sampling_params": {"top_p": 0}}, "top_p"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": "9"}}, "max_new_tokens"),
    ("/generate", {"text": "a", "sampling_params": {"stop": [""]}}, "stop"),
    ("/generate", {"text": "a", "irminsul_policy": "magic"}, "magic"),
    ("/generate", {"text": "a", "irminsul_policy": "pic",
                   "irminsul_policy_args": {"k": -1}}, "k must be"),
    ("/generate", {"input_ids": [5] * MAX_SEQ}, str(MAX_SEQ)),
    ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "m", "n": 2,
                              "messages": [{"role": "user", "content": "a"}]}, "'n'"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "wizard", "content": "a"}]},
     "wizard"),
    ("/v1/chat/completions", {"model": "m", "logprobs": True,
                              "messages": [{"role": "user", "content": "a"}]}, "logprobs"),
    ("/v1/chat/completions", {"model": "m", "regex": "[ab]+",
                              "messages": [{"role": "user", "content": "a"}]}, "regex"),
    ("/v1/chat/completions", {"model": "m", "response_format": {"type": "json_object"},
                              "messages": [{"role": "user", "content": "a"}]}, "json_object"),
    ("/v1/completions", {"model": "m", "prompt": ["a", "b"]}, "one prompt"),
    ("/v1/responses", {"model": "m", "input": "a", "previous_response_id": "r"},
     "previous_response_id"),
])
async def test_bad_input_is_a_400_with_openai_error_json(http, path, body, needle):
    status, out = await post(http, path, body)
    assert status == 400
    assert out["error"]["type"] == "invalid_request_error"
    assert needle in out["error"]["message"]


async def test_bad_json_and_bad_anthropic_body(http):
    async with http.post("/generate", data=b"{not json") as resp:
        assert resp.status == 400
        assert "not valid JSON" in (await resp.json())["error"]["message"]
    status, out = await post(http, "/v1/messages", {"model": "m", "messages": [
        {"role": "user", "content": "a"}]})
    assert status == 400
    assert out["type"] == "error" and out["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in out["error"]["message"]


# ---- the `irminsul serve` command and the proxy's embedded mode -------------------------------


async def test_start_embedded_serves_until_cleanup(yarn_model):  # noqa: F811
    config = EngineConfig(model_dir=str(yarn_model), device="cpu")
    runner, url = await start_embedded(config)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/health") as resp:
                assert resp.status == 200
            async with s.get(f"{url}{CAPABILITY_PATH}") as resp:
                assert (await resp.json())["irminsul"]["default_policy"] == config.policy
    finally:
        await runner.cleanup()
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectionError):
            await s.get(f"{url}/health")


async def test_serve_command_listens_and_stops_on_sigterm(yarn_model):  # noqa: F811
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "irminsul.cli", "serve", "--model", str(yarn_model),
        "--device", "cpu", "--port", "0", "--cache-bytes", "64M", "--policy", "blend",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        url = re.search(r"at (http://\S+)", line).group(1)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}{CAPABILITY_PATH}") as resp:
                assert (await resp.json())["irminsul"]["default_policy"] == "blend"
            async with s.get(f"{url}/irminsul/stats") as resp:
                assert (await resp.json())["store"]["capacity_bytes"] == 64 << 20
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("args,needle", [
    (["--cache-bytes", "12Q"], "not a byte size"),
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--pic-k", "-1"], "--pic-k"),
    (["--policy", "lru"], "--policy"),
])
def test_serve_command_rejects_bad_values(args, needle):
    result = CliRunner().invoke(serve_command, args)
    assert result.exit_code == 2
    assert needle in result.output


def test_byte_sizes():
    size = ByteSize()
    assert [size.convert(v, None, None) for v in ("1024", "512M", "8G", "8GiB", "2k")] == [
        1024, 512 << 20, 8 << 30, 8 << 30, 2048]


# ---- failures -----------------------------------------------------------------------------


class FailingEngine:
    """The real engine, except that generation raises after its first token (a fault double:
    the server must answer 500 / an error event and keep serving)."""

    def __init__(self, engine):
        self._engine = engine
        self.fail = True

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, ids, params, **kw):
        outputs = self._engine.generate(ids, params, **kw)
        for i, out in enumerate(outputs):
            if self.fail and i == 1:
                outputs.close()
                raise RuntimeError("simulated device fault")
            yield out


async def test_engine_failure_is_a_500_and_the_worker_lives_on(aiohttp_server, engine):
    failing = FailingEngine(engine)
    app = create_engine_app(failing)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as http:
        status, out = await post(http, "/generate", {"text": "hi", "sampling_params": GREEDY})
        assert status == 500 and "simulated device fault" in out["error"]["message"]
        data = await events(http, "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True})
        assert data[-1] == "[DONE]"
        assert "simulated device fault" in json.loads(data[-2])["error"]["message"]
        status, out = await post(http, "/v1/messages", {
            "model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert status == 500 and out["type"] == "error"
        failing.fail = False
        status, out = await post(http, "/generate", {"text": "hi", "sampling_params": GREEDY})
        assert status == 200 and len(out["output_ids"]) == 8
        await app[ENGINE_SERVER].worker.stop()
        async with http.get("/health") as resp:
            assert resp.status == 503
        status, out = await post(http, "/generate", {"text": "hi"})
        assert status == 503 and "not running" in out["error"]["message"]


async def test_proxy_embedded_mode_forwards_to_the_engine(
        aiohttp_server, yarn_model, tmp_path):  # noqa: F811
    config = ProxyConfig(model_dir=str(yarn_model), db=str(tmp_path / "savings.db"))
    engine_config = EngineConfig(model_dir=str(yarn_model), device="cpu")
    app = create_app(config, upstream_ctx=embedded_upstream_ctx(config,
                                                                engine_config=engine_config))
    proxy = await aiohttp_server(app)
    async with aiohttp.ClientSession(base_url=str(proxy.make_url(""))) as http:
        body = {"model": "m", "messages": [{"role": "user", "content": DOC[:300]}],
                "max_tokens": 3, "temperature": 0}
        for _ in range(2):
            status, out = await post(http, "/v1/chat/completions", body)
            assert status == 200, out
        counts = assert_counts(out["usage"]["irminsul"], out["usage"]["prompt_tokens"])
        assert counts.exact_prefix_tokens > 0  # the engine behind the proxy kept the first
