"""Server-sent events: the parser under every split, the encoder round trip, and readers over
real aiohttp response bodies."""

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from irminsul.proxy.errors import UpstreamStreamError
from irminsul.proxy.sse import (
    SSE_HEADERS,
    SSEEvent,
    SSEParser,
    aiter_chat_chunks,
    aiter_sse,
    encode_done,
    encode_event,
    encode_named,
)

WIRE = (
    "\ufeff: a comment\r\n"
    "retry: 1500\r\n"
    "event: message_start\r\n"
    "data: {\"a\":\r\n"
    "data:1}\r\n"
    "\r\n"
    "id: 7\n"
    "data: caf\u00e9 \u4e2d\u6587 \U0001f600\n"
    "\n"
    "event: lonely\n"  # an event type with no data is not dispatched
    "\n"
    "data\r"  # a field name alone: data is ""
    "\r"
    "data:  two spaces\n"
    "unknown: field\n"
    "\n"
).encode()
EXPECTED = [
    SSEEvent("message_start", '{"a":\n1}', None, 1500),
    SSEEvent(None, "caf\u00e9 \u4e2d\u6587 \U0001f600", "7", 1500),
    SSEEvent(None, "", "7", 1500),
    SSEEvent(None, " two spaces", "7", 1500),
]


def parse(chunks):
    p = SSEParser()
    out = [e for c in chunks for e in p.feed(c)]
    return out + p.close()


def test_parser_follows_the_spec():
    assert parse([WIRE]) == EXPECTED
    assert EXPECTED[0].json() == {"a": 1}


def test_every_single_split_gives_the_same_events():
    # includes splits inside CRLF pairs and inside multi-byte UTF-8 characters
    for i in range(len(WIRE) + 1):
        assert parse([WIRE[:i], WIRE[i:]]) == EXPECTED, i


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, len(WIRE)), max_size=12))
def test_any_splits_give_the_same_events(cuts):
    cuts = sorted(cuts)
    pieces = [WIRE[a:b] for a, b in zip([0, *cuts], [*cuts, len(WIRE)], strict=True)]
    assert parse(pieces) == EXPECTED


@settings(max_examples=150, deadline=None)
@given(st.text(), st.one_of(st.none(), st.text(alphabet=st.characters(
    blacklist_characters="\r\n", blacklist_categories=("Cs",)), min_size=1)))
def test_encode_then_parse_round_trips(data, event):
    wire = encode_event(data, event=event)
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    (got,) = parse([wire])
    assert got.data == expected
    assert got.event == (event if event is not None else None)


def test_encode_json_and_helpers():
    assert encode_event({"b": "é", "a": [1]}, event="x", id="3") == \
        'event: x\nid: 3\ndata: {"b":"é","a":[1]}\n\n'.encode()
    assert encode_done() == b"data: [DONE]\n\n"
    assert encode_named([("a", {"type": "a"}), ("b", {})]) == \
        b'event: a\ndata: {"type":"a"}\n\nevent: b\ndata: {}\n\n'
    with pytest.raises(ValueError):
        encode_event("x", event="bad\nname")


def test_close_dispatches_an_event_cut_before_its_blank_line():
    assert parse([b"data: 1\n\ndata: 2"]) == [SSEEvent(None, "1"), SSEEvent(None, "2")]
    assert parse([b"data: 3\r"]) == [SSEEvent(None, "3")]
    assert parse([b"event: only\n"]) == []


async def serve(aiohttp_server, body: bytes, pieces: int = 7):
    async def handler(request):
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        step = max(1, len(body) // pieces)
        for i in range(0, len(body), step):
            await resp.write(body[i:i + step])
        return resp

    app = web.Application()
    app.router.add_get("/s", handler)
    server = await aiohttp_server(app, host="127.0.0.1", port=0)
    return server.make_url("/s")


async def test_aiter_sse_over_a_real_response(aiohttp_server):
    url = await serve(aiohttp_server, WIRE)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = [e async for e in aiter_sse(resp)]
        async with session.get(url) as resp:
            from_reader = [e async for e in aiter_sse(resp.content)]
    assert events == EXPECTED and from_reader == EXPECTED


async def test_aiter_chat_chunks_stops_at_done(aiohttp_server):
    body = encode_event({"n": 1}) + b": keep-alive\n\n" + encode_event({"n": 2}) + \
        encode_done() + encode_event({"n": 3})
    url = await serve(aiohttp_server, body)
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert [c async for c in aiter_chat_chunks(resp)] == [{"n": 1}, {"n": 2}]


@pytest.mark.parametrize("bad, message", [
    (encode_event({"error": {"message": "out of memory", "code": 500}}), "out of memory"),
    (encode_event({"type": "error", "message": "boom"}, event="error"), "boom"),
    (b"data: not json\n\n", "non-JSON"),
    (b"data: [1, 2]\n\n", "non-object"),
])
async def test_aiter_chat_chunks_raises_on_error_payloads(aiohttp_server, bad, message):
    url = await serve(aiohttp_server, encode_event({"n": 1}) + bad, pieces=2)
    got = []
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        with pytest.raises(UpstreamStreamError) as e:
            async for chunk in aiter_chat_chunks(resp):
                got.append(chunk)
    assert got == [{"n": 1}] and message in e.value.message and e.value.status == 502
