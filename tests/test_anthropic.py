"""Anthropic Messages <-> OpenAI chat: request translation, and responses as the official
`anthropic` SDK parses them from a real server (streamed and not)."""

import json

import anthropic
import pytest
from support.translation import Script, script_chunks, script_completion, start_pair

from irminsul.proxy.anthropic import (
    TOOL_ERROR_PREFIX,
    anthropic_usage,
    chat_to_message,
    messages_to_chat,
)
from irminsul.proxy.anthropic_stream import MessageStream
from irminsul.proxy.errors import TranslationError
from irminsul.proxy.translation import RAW_ARGUMENTS_KEY, TokenCounts

TOOLS = [
    {"name": "read_file", "description": "Read a file",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}},
                      "required": ["path"]},
     "cache_control": {"type": "ephemeral"}},
    {"name": "grep", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}},
]
CALLS = (("call_a1", "read_file", '{"path": "src/main.py"}'),
         ("call_b2", "grep", '{"q": "def \\"main\\"", "n": [1, 2]}'))


def base(**kw):
    body = {"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return body


# ---- request translation -------------------------------------------------------------------


def test_system_blocks_and_inline_system_messages_merge_in_order():
    req = messages_to_chat(base(
        system=[{"type": "text", "text": "You are X.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": "q1"},
                  {"role": "system", "content": "Late rule."},
                  {"role": "assistant", "content": "a1"},
                  {"role": "user", "content": [{"type": "text", "text": "q2"}]}]))
    msgs = req.body["messages"]
    assert msgs[0] == {"role": "system", "content": "You are X.\n\nBe brief.\n\nLate rule."}
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[3]["content"] == "q2"


def test_tool_use_and_tool_result_become_tool_calls_and_tool_messages():
    req = messages_to_chat(base(tools=TOOLS, messages=[
        {"role": "user", "content": "read it"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Reading."},
            {"type": "tool_use", "id": "toolu_1", "name": "read_file",
             "input": {"path": "a.py"}},
            {"type": "tool_use", "id": "toolu_2", "name": "grep", "input": {"q": "x"}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "here you go"},
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": "line1"}, {"type": "text", "text": "line2"}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "no match",
             "is_error": True}]}]))
    msgs = req.body["messages"]
    assistant = msgs[1]
    assert assistant["content"] == "Reading."
    assert [c["id"] for c in assistant["tool_calls"]] == ["toolu_1", "toolu_2"]
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"path": "a.py"}
    assert assistant["tool_calls"][1]["function"]["name"] == "grep"
    # tool messages come first, right after the assistant's calls; the text follows
    assert msgs[2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "line1\nline2"}
    assert msgs[3] == {"role": "tool", "tool_call_id": "toolu_2",
                       "content": TOOL_ERROR_PREFIX + "no match"}
    assert msgs[4] == {"role": "user", "content": "here you go"}
    assert len(msgs) == 5
    assert any("thinking" in d for d in req.dropped)
    tool = req.body["tools"][0]
    assert tool == {"type": "function", "function": {
        "name": "read_file", "description": "Read a file",
        "parameters": TOOLS[0]["input_schema"]}}
    assert "description" not in req.body["tools"][1]["function"]


def test_pure_tool_call_turn_has_null_content_and_several_text_blocks_stay_parts():
    req = messages_to_chat(base(messages=[
        {"role": "user", "content": [{"type": "text", "text": "<reminder>"},
                                     {"type": "text", "text": "do it"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]))
    msgs = req.body["messages"]
    assert msgs[0]["content"] == [{"type": "text", "text": "<reminder>"},
                                  {"type": "text", "text": "do it"}]
    assert msgs[1]["content"] is None and msgs[1]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert msgs[2] == {"role": "tool", "tool_call_id": "t", "content": ""}
    assert len(msgs) == 3  # no empty user message after a tool-result-only turn


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "grep", "disable_parallel_tool_use": True},
     {"tool_choice": {"type": "function", "function": {"name": "grep"}},
      "parallel_tool_calls": False}),
])
def test_tool_choice(choice, expected):
    body = messages_to_chat(base(tools=TOOLS, tool_choice=choice)).body
    assert {k: body[k] for k in expected} == expected
    if "parallel_tool_calls" not in expected:
        assert "parallel_tool_calls" not in body


def test_sampling_stream_and_session_fields():
    req = messages_to_chat(base(temperature=0.3, top_p=0.9, top_k=20, stop_sequences=["END"],
                                stream=True, metadata={"user_id": "user_abc_session_1"}))
    b = req.body
    assert (b["max_tokens"], b["temperature"], b["top_p"], b["top_k"]) == (64, 0.3, 0.9, 20)
    assert b["stop"] == ["END"] and b["stream"] is True
    assert b["stream_options"] == {"include_usage": True}
    assert req.stream and req.session_hint == "user_abc_session_1" and b["user"] == req.session_hint
    plain = messages_to_chat(base()).body
    assert not {"stream", "stop", "top_k", "user", "tools", "tool_choice"} & plain.keys()


def test_unknown_fields_real_clients_send_are_dropped():
    extras = {"thinking": {"type": "enabled", "budget_tokens": 1024},
              "context_management": {"edits": []}, "output_config": {"effort": "high"},
              "betas": ["x"], "service_tier": "auto", "container": "c1", "mcp_servers": [],
              "anthropic_beta": ["y"]}
    req = messages_to_chat(base(**extras, tools=TOOLS + [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]))
    assert not set(extras) & req.body.keys()
    assert {f"field {k}" for k in extras} <= set(req.dropped)
    assert [t["function"]["name"] for t in req.body["tools"]] == ["read_file", "grep"]


def test_images_become_a_note_or_an_error():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBOR"}}
    msgs = [{"role": "user", "content": [image, {"type": "text", "text": "what is this?"}]}]
    req = messages_to_chat(base(messages=msgs))
    parts = req.body["messages"][0]["content"]
    assert "image omitted" in parts[0]["text"] and parts[1]["text"] == "what is this?"
    with pytest.raises(TranslationError) as e:
        messages_to_chat(base(messages=msgs), media="error")
    assert e.value.status == 400 and e.value.param == "messages.0.content.0"


@pytest.mark.parametrize("change, param", [
    ({"model": None}, "model"),
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
     "messages.0.content.0.tool_use_id"),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({"tool_choice": {"type": "sometimes"}, "tools": TOOLS}, "tool_choice"),
])
def test_missing_or_bad_fields_raise_400_naming_them(change, param):
    body = {k: v for k, v in {**base(), **change}.items() if v is not None}
    with pytest.raises(TranslationError) as e:
        messages_to_chat(body)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.message.startswith(param)


# ---- response translation (no server) ------------------------------------------------------


def test_usage_excludes_cache_reads_and_carries_the_extension():
    ext = {"prompt_tokens": 100, "reused_tokens": 60}
    assert anthropic_usage(100, 7, 30, irminsul=ext) == {
        "input_tokens": 70, "output_tokens": 7, "cache_read_input_tokens": 30,
        "cache_creation_input_tokens": 0, "irminsul": ext}
    assert anthropic_usage(10, 1, 50)["input_tokens"] == 0  # cached is clamped to the prompt


def test_unparsable_arguments_keep_the_raw_text_and_round_trip():
    script = Script(tool_calls=(("call_1", "f", '{"a": 1'),), finish_reason="tool_calls")
    msg = chat_to_message(script_completion(script), model="m")
    block = msg["content"][0]
    assert block["input"] == {RAW_ARGUMENTS_KEY: '{"a": 1'}
    back = messages_to_chat(base(messages=[{"role": "user", "content": "x"},
                                           {"role": "assistant", "content": [block]}]))
    assert back.body["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1'


def test_explicit_counts_override_the_upstream_usage():
    script = Script(text="ok", prompt_tokens=50, completion_tokens=2, cached_tokens=0)
    msg = chat_to_message(script_completion(script), counts=TokenCounts(50, 2, 40))
    assert msg["usage"]["cache_read_input_tokens"] == 40 and msg["usage"]["input_tokens"] == 10


def test_stream_event_order_matches_the_official_api():
    script = Script(text="Let me look.", tool_calls=CALLS, finish_reason="tool_calls",
                    prompt_tokens=30, completion_tokens=9)
    ms = MessageStream(model="m")
    events = [e for c in script_chunks(script) for e in ms.feed(c)] + ms.finish()
    names = [n for n, _ in events]
    text_deltas = -(-len(script.text) // script.piece)
    arg_deltas = [-(-len(a) // script.piece) for _, _, a in CALLS]
    assert names == (
        ["message_start", "ping"]
        + ["content_block_start"] + ["content_block_delta"] * text_deltas
        + ["content_block_stop"]
        + ["content_block_start"] + ["content_block_delta"] * arg_deltas[0]
        + ["content_block_stop"]
        + ["content_block_start"] + ["content_block_delta"] * arg_deltas[1]
        + ["content_block_stop"]
        + ["message_delta", "message_stop"])
    starts = [d for n, d in events if n == "content_block_start"]
    assert [d["index"] for d in starts] == [0, 1, 2]
    assert starts[1]["content_block"] == {"type": "tool_use", "id": "call_a1",
                                          "name": "read_file", "input": {}}
    assert all(n == d["type"] for n, d in events)
    open_index = None  # deltas and the stop name the block that is open
    for name, data in events:
        if name == "content_block_start":
            assert open_index is None
            open_index = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == open_index
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
    assert ms.finish() == []  # finishing twice sends nothing more


def test_stream_tool_calls_in_odd_upstream_shapes():
    def chunk(calls=None, finish=None):
        return {"choices": [{"index": 0, "delta": {"tool_calls": calls} if calls else {},
                             "finish_reason": finish}]}

    ms = MessageStream(model="m")
    events = ms.feed(chunk([{"index": 0, "id": "c0", "function": {"arguments": '{"a"'}}]))
    assert [n for n, _ in events] == ["message_start", "ping"]  # held until the name comes
    events = ms.feed(chunk([{"index": 0, "function": {"name": "f", "arguments": ": 1}"}}]))
    assert [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"] == \
        ['{"a"', ": 1}"]
    # a whole call in one chunk, then a late fragment of the closed first call
    events = ms.feed(chunk([{"index": 1, "id": "c1", "type": "function",
                             "function": {"name": "g", "arguments": "{}"}}]))
    assert [n for n, _ in events] == ["content_block_stop", "content_block_start",
                                      "content_block_delta"]
    assert ms.feed(chunk([{"index": 0, "function": {"arguments": " "}}])) == []
    assert ms.dropped_fragments == 1
    ms.feed(chunk([{"index": 2, "id": "c2", "function": {"arguments": "{}"}}], "tool_calls"))
    tail = ms.finish()
    start = next(d for n, d in tail if n == "content_block_start")
    assert start["content_block"]["id"] == "c2" and start["content_block"]["name"] == ""
    assert tail[-2][1]["delta"]["stop_reason"] == "tool_use"


# ---- through the official SDK --------------------------------------------------------------


def client(url):
    return anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)


async def test_sdk_create_text_with_usage(aiohttp_server):
    ext = {"prompt_tokens": 120, "exact_prefix_tokens": 20, "reused_tokens": 80}
    script = Script(text="Hello there, world!", prompt_tokens=120, completion_tokens=5,
                    cached_tokens=20, irminsul=ext)
    url, state = await start_pair(aiohttp_server, script)
    msg = await client(url).messages.create(model="claude-x", max_tokens=50,
                                            messages=[{"role": "user", "content": "hi"}])
    assert msg.id.startswith("msg_") and msg.model == "claude-x" and msg.role == "assistant"
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == script.text
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (100, 5)
    assert msg.usage.cache_read_input_tokens == 20 and msg.usage.cache_creation_input_tokens == 0
    assert msg.usage.model_extra["irminsul"] == ext
    assert state["bodies"][0]["max_tokens"] == 50 and "stream" not in state["bodies"][0]


async def test_sdk_stream_rebuilds_text_and_tool_inputs(aiohttp_server):
    script = Script(text="Let me look.", tool_calls=CALLS, finish_reason="tool_calls",
                    prompt_tokens=40, completion_tokens=21, cached_tokens=8)
    url, state = await start_pair(aiohttp_server, script)
    texts = []
    async with client(url).messages.stream(model="claude-x", max_tokens=50, tools=TOOLS,
                                           messages=[{"role": "user", "content": "go"}]) as s:
        async for event in s:
            if event.type == "text":
                texts.append(event.text)
        final = await s.get_final_message()
    assert "".join(texts) == script.text and len(texts) > 1
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[0].text == script.text
    for block, (call_id, name, args) in zip(final.content[1:], CALLS, strict=True):
        assert (block.id, block.name, block.input) == (call_id, name, json.loads(args))
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (32, 21)
    assert final.usage.cache_read_input_tokens == 8
    upstream = state["bodies"][0]
    assert upstream["stream"] is True and upstream["stream_options"] == {"include_usage": True}

    # the same answer, not streamed, parses to the same content
    again = await client(url).messages.create(model="claude-x", max_tokens=50, tools=TOOLS,
                                              messages=[{"role": "user", "content": "go"}])
    assert [b.model_dump() for b in again.content] == [b.model_dump() for b in final.content]
    assert again.usage.model_dump() == final.usage.model_dump()


async def test_sdk_tool_round_trip_keeps_ids_and_arguments(aiohttp_server):
    script = Script(tool_calls=CALLS[:1], finish_reason="tool_calls")
    url, state = await start_pair(aiohttp_server, script)
    c = client(url)
    first = await c.messages.create(model="claude-x", max_tokens=50, tools=TOOLS,
                                    messages=[{"role": "user", "content": "read main"}])
    use = first.content[0]
    state["script"] = Script(text="It defines main().")
    second = await c.messages.create(
        model="claude-x", max_tokens=50, tools=TOOLS,
        system=[{"type": "text", "text": "Sys", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "read main"}, first.to_param(),
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": "def main(): ..."}]}],
        extra_body={"thinking": {"type": "enabled", "budget_tokens": 2000},
                    "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}})
    assert second.content[0].text == "It defines main()."
    sent = state["bodies"][1]["messages"]
    assert sent[0] == {"role": "system", "content": "Sys"}
    call = sent[2]["tool_calls"][0]
    assert call["id"] == "call_a1" and call["function"]["name"] == "read_file"
    assert json.loads(call["function"]["arguments"]) == json.loads(CALLS[0][2])
    assert sent[3] == {"role": "tool", "tool_call_id": "call_a1", "content": "def main(): ..."}


@pytest.mark.parametrize("stream", [False, True])
async def test_sdk_stop_sequence_length_and_thinking(aiohttp_server, stream):
    url, state = await start_pair(aiohttp_server, Script(text="abc", matched_stop="STOP",
                                                         reasoning="think first"))
    c = client(url)
    kw = {"model": "claude-x", "max_tokens": 50, "stop_sequences": ["STOP"],
          "messages": [{"role": "user", "content": "x"}]}
    if stream:
        async with c.messages.stream(**kw) as s:
            msg = await s.get_final_message()
    else:
        msg = await c.messages.create(**kw)
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "STOP"
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "think first" and msg.content[1].text == "abc"
    assert state["bodies"][0]["stop"] == ["STOP"]
    state["script"] = Script(text="cut", finish_reason="length")
    if stream:
        async with c.messages.stream(**kw) as s:
            msg = await s.get_final_message()
    else:
        msg = await c.messages.create(**kw)
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None


async def test_sdk_sees_a_mid_stream_upstream_failure(aiohttp_server):
    url, _ = await start_pair(aiohttp_server, Script(text="partial answer", error_after=3))
    seen = []
    with pytest.raises(anthropic.APIStatusError) as e:
        async with client(url).messages.stream(
                model="claude-x", max_tokens=50,
                messages=[{"role": "user", "content": "x"}]) as s:
            async for event in s:
                seen.append(event.type)
    assert e.value.body == {"type": "error", "error": {"type": "api_error",
                                                       "message": "engine overloaded"}}
    assert "text" in seen  # the part before the failure arrived


async def test_sdk_gets_anthropic_error_json_for_a_bad_request(aiohttp_server):
    url, state = await start_pair(aiohttp_server, Script(text="never"))
    with pytest.raises(anthropic.BadRequestError) as e:
        await client(url).messages.create(
            model="claude-x", max_tokens=50,
            messages=[{"role": "user", "content": [{"type": "tool_result"}]}])
    assert e.value.status_code == 400
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "messages.0.content.0.tool_use_id" in e.value.body["error"]["message"]
    assert state["bodies"] == []  # nothing reached the upstream
