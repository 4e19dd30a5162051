"""Error JSON in the OpenAI and Anthropic shapes, served by a real aiohttp server."""

import aiohttp
import pytest
from aiohttp import web

from irminsul.proxy.errors import (
    TranslationError,
    anthropic_error_body,
    anthropic_error_type,
    error_response,
    openai_error_body,
    openai_error_type,
    translation_error_response,
    upstream_error_message,
)


@pytest.mark.parametrize("status, anthropic_type, openai_type", [
    (400, "invalid_request_error", "invalid_request_error"),
    (401, "authentication_error", "authentication_error"),
    (403, "permission_error", "permission_error"),
    (404, "not_found_error", "not_found_error"),
    (413, "request_too_large", "invalid_request_error"),
    (422, "invalid_request_error", "invalid_request_error"),
    (429, "rate_limit_error", "rate_limit_error"),
    (500, "api_error", "server_error"),
    (502, "api_error", "server_error"),
    (504, "timeout_error", "server_error"),
    (529, "overloaded_error", "server_error"),
])
def test_status_maps_to_error_types(status, anthropic_type, openai_type):
    assert anthropic_error_type(status) == anthropic_type
    assert openai_error_type(status) == openai_type


def test_bodies():
    assert anthropic_error_body(429, "slow down") == {
        "type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    assert openai_error_body(400, "bad", param="model") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "model",
                  "code": None}}


@pytest.mark.parametrize("body, expected", [
    ({"error": {"message": "m1", "type": "x"}}, "m1"),
    ({"type": "error", "error": {"type": "api_error", "message": "m2"}}, "m2"),
    ({"detail": "m3"}, "m3"),
    ({"detail": [{"loc": ["body", "model"], "msg": "required"}]}, "required"),
    ({"object": "error", "message": "m4", "code": 400}, "m4"),
    ({"error": "m5"}, "m5"),
    (b'{"error": {"message": "m6"}}', "m6"),
    ("Bad Gateway\n", "Bad Gateway"),
    ("", "upstream answered HTTP 503"),
    ([1], "upstream answered HTTP 503"),
])
def test_upstream_error_message(body, expected):
    assert expected in upstream_error_message(503, body)


async def test_error_responses_over_http(aiohttp_server):
    async def anth(request):
        return translation_error_response(
            "anthropic", TranslationError("max_tokens: field required", param="max_tokens"))

    async def oai(request):
        return error_response("openai", 404, "no such model", param="model")

    app = web.Application()
    app.router.add_post("/a", anth)
    app.router.add_post("/o", oai)
    server = await aiohttp_server(app, host="127.0.0.1", port=0)
    async with aiohttp.ClientSession() as s:
        async with s.post(server.make_url("/a")) as r:
            assert r.status == 400
            assert await r.json() == {"type": "error", "error": {
                "type": "invalid_request_error", "message": "max_tokens: field required"}}
        async with s.post(server.make_url("/o")) as r:
            assert r.status == 404
            assert (await r.json())["error"] == {"message": "no such model",
                                                 "type": "not_found_error", "param": "model",
                                                 "code": None}
    with pytest.raises(ValueError):
        error_response("grpc", 400, "x")
