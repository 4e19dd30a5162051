"""The clip policy over HTTP on engines with and without an auxiliary model: an engine without
one refuses a clip request as the client's error (HTTP 400 with the API's error JSON) on
SGLang's /generate, the OpenAI and Anthropic endpoints, streamed or not, whether the request
names clip itself or through the proxy's annotation; its capability document leaves clip out,
and an engine with an aux/ folder lists it. Real servers started as `irminsul serve` starts
them (start_embedded on 127.0.0.1, port 0)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from support.models import aux_model, yarn_model  # noqa: F401  (fixtures)

from irminsul.chunking.config import ChunkerConfig
from irminsul.engine_adapter.contract import ANNOTATION_KEY, CAPABILITY_PATH, Annotation, seq_hash
from irminsul.engine_adapter.embedded.command import start_embedded
from irminsul.engine_adapter.embedded.config import POLICIES, EngineConfig

CHUNKER = ChunkerConfig(min_tokens=8, avg_tokens=32, max_tokens=128)
GREEDY = {"temperature": 0, "max_new_tokens": 2, "ignore_eos": True}


async def serve(model_dir: Path):
    return await start_embedded(EngineConfig(model_dir=str(model_dir), device="cpu",
                                             max_seq_len=2048, chunker=CHUNKER),
                                "127.0.0.1", 0)


@pytest.fixture
async def no_aux(yarn_model):  # noqa: F811
    runner, url = await serve(yarn_model)
    try:
        async with aiohttp.ClientSession(base_url=url) as http:
            yield http
    finally:
        await runner.cleanup()


def assert_clip_refused(status: int, body: dict) -> None:
    assert status == 400, body
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "irminsul_policy"
    assert "'clip' is not available" in err["message"] and "auxiliary model" in err["message"]


async def test_clip_request_without_aux_is_a_400(no_aux):
    clip = {"irminsul_policy": "clip", "irminsul_policy_args": {"r": 0.2}}
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2,
            "temperature": 0}
    for path, body in [
        ("/generate", {"text": "hello there", "sampling_params": GREEDY, **clip}),
        ("/generate", {"text": "hello there", "sampling_params": GREEDY, "stream": True, **clip}),
        ("/v1/chat/completions", {**chat, **clip}),
        ("/v1/chat/completions", {**chat, "stream": True, **clip}),
        ("/v1/completions", {"prompt": "hello", "max_tokens": 2, **clip}),
    ]:
        async with no_aux.post(path, json=body) as resp:
            assert resp.content_type == "application/json", path
            assert_clip_refused(resp.status, await resp.json())
    # Anthropic's shape on /v1/messages
    body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
            **clip}
    async with no_aux.post("/v1/messages", json=body) as resp:
        assert resp.status == 400
        err = await resp.json()
    assert err["type"] == "error" and "'clip' is not available" in err["error"]["message"]
    # the engine is fine: the same request with its default policy is served
    async with no_aux.post("/generate", json={"text": "hello there",
                                              "sampling_params": GREEDY}) as resp:
        assert resp.status == 200
        assert (await resp.json())["meta_info"]["irminsul"]["policy"] == "pic"


async def test_clip_from_the_annotation_without_aux_is_a_400(no_aux):
    ids = list(range(100, 140))
    body = {"input_ids": ids, "sampling_params": GREEDY}
    for policy, status in (("clip", 400), ("blend", 200)):
        # no chunks: the engine chunks itself; only the annotation's policy matters here
        ann = Annotation(len(ids), seq_hash(ids), (), policy=policy).to_json()
        async with no_aux.post("/generate", json={**body, ANNOTATION_KEY: ann}) as resp:
            got = await resp.json()
        if status == 400:
            assert_clip_refused(resp.status, got)
        else:
            assert resp.status == 200 and got["meta_info"]["irminsul"]["policy"] == policy


async def test_capabilities_list_clip_only_with_an_aux_model(no_aux, yarn_model,  # noqa: F811
                                                             aux_model, tmp_path):  # noqa: F811
    async with no_aux.get(CAPABILITY_PATH) as resp:
        caps = (await resp.json())["irminsul"]
    assert caps["policies"] == [p for p in POLICIES if p != "clip"]
    root = tmp_path / "with-aux"
    root.mkdir()
    for f in Path(yarn_model).iterdir():
        (root / f.name).symlink_to(f)
    (root / "aux").symlink_to(aux_model, target_is_directory=True)
    runner, url = await serve(root)
    try:
        async with aiohttp.ClientSession(base_url=url) as http:
            async with http.get(CAPABILITY_PATH) as resp:
                caps = (await resp.json())["irminsul"]
            assert caps["policies"] == list(POLICIES) and "clip" in caps["policies"]
            body = {"text": "hello there", "sampling_params": GREEDY,
                    "irminsul_policy": "clip"}
            async with http.post("/generate", json=body) as resp:
                assert resp.status == 200
                assert (await resp.json())["meta_info"]["irminsul"]["policy"] == "clip"
    finally:
        await runner.cleanup()
