"""OpenAI Responses API <-> chat completions: request translation, and responses as the
official `openai` SDK parses them from a real server (streamed and not)."""

import json

import openai
import pytest
from support.translation import Script, script_chunks, script_completion, start_pair

from irminsul.proxy.errors import TranslationError
from irminsul.proxy.responses import chat_to_response, responses_to_chat, responses_usage
from irminsul.proxy.responses_stream import ResponsesStream
from irminsul.proxy.translation import TokenCounts

TOOLS = [
    {"type": "function", "name": "shell", "description": "Run a command",
     "parameters": {"type": "object", "properties": {"command": {"type": "array"}}},
     "strict": False},
    {"type": "function", "name": "update_plan", "parameters": {"type": "object"}},
]
CALLS = (("call_1", "shell", '{"command": ["ls", "-la"]}'),
         ("call_2", "update_plan", '{"plan": [{"step": "a", "status": "done"}]}'))


# ---- request translation -------------------------------------------------------------------


def test_codex_style_request():
    body = {
        "model": "gpt-x", "instructions": "You are a coding agent.",
        "input": [
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "Sandbox: read-only."}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "<env>cwd=/r</env>"},
                         {"type": "input_text", "text": "list files"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Listing."}]},
            {"type": "function_call", "call_id": "call_1", "name": "shell",
             "arguments": '{"command":["ls"]}'},
            {"type": "function_call", "call_id": "call_2", "name": "update_plan",
             "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "a.py\nb.py"},
            {"type": "function_call_output", "call_id": "call_2",
             "output": [{"type": "input_text", "text": "Plan updated"}]},
            {"role": "user", "content": "thanks"},
        ],
        "tools": TOOLS + [{"type": "web_search"}], "tool_choice": "auto",
        "parallel_tool_calls": False, "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False, "include": ["reasoning.encrypted_content"], "stream": True,
        "prompt_cache_key": "sess-9", "max_output_tokens": 256,
    }
    req = responses_to_chat(body)
    msgs = req.body["messages"]
    assert msgs[0] == {"role": "system",
                       "content": "You are a coding agent.\n\nSandbox: read-only."}
    assert msgs[1]["content"] == [{"type": "text", "text": "<env>cwd=/r</env>"},
                                  {"type": "text", "text": "list files"}]
    assert msgs[2]["role"] == "assistant" and msgs[2]["content"] == "Listing."
    assert [c["id"] for c in msgs[2]["tool_calls"]] == ["call_1", "call_2"]
    assert msgs[2]["tool_calls"][0]["function"] == {"name": "shell",
                                                    "arguments": '{"command":["ls"]}'}
    assert msgs[3] == {"role": "tool", "tool_call_id": "call_1", "content": "a.py\nb.py"}
    assert msgs[4] == {"role": "tool", "tool_call_id": "call_2", "content": "Plan updated"}
    assert msgs[5] == {"role": "user", "content": "thanks"} and len(msgs) == 6
    b = req.body
    assert [t["function"]["name"] for t in b["tools"]] == ["shell", "update_plan"]
    assert b["tools"][0]["function"]["parameters"] == TOOLS[0]["parameters"]
    assert b["tool_choice"] == "auto" and b["parallel_tool_calls"] is False
    assert b["max_tokens"] == 256 and b["stream"] is True
    assert b["stream_options"] == {"include_usage": True}
    assert not {"reasoning", "store", "include", "instructions", "input"} & b.keys()
    assert req.session_hint == "sess-9" and req.stream
    assert any("web_search" in d for d in req.dropped)
    assert any("reasoning item" in d for d in req.dropped)


def test_string_input_function_choice_and_json_schema():
    req = responses_to_chat({
        "model": "m", "input": "hello", "tools": TOOLS,
        "tool_choice": {"type": "function", "name": "shell"},
        "text": {"format": {"type": "json_schema", "name": "out", "strict": True,
                            "schema": {"type": "object"}}}})
    assert req.body["messages"] == [{"role": "user", "content": "hello"}]
    assert req.body["tool_choice"] == {"type": "function", "function": {"name": "shell"}}
    assert req.body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "out", "schema": {"type": "object"}, "strict": True}}
    assert "stream" not in req.body and "max_tokens" not in req.body


def test_function_call_without_preceding_assistant_text_gets_null_content():
    req = responses_to_chat({"model": "m", "input": [
        {"role": "user", "content": "x"},
        {"type": "function_call", "call_id": "c", "name": "shell", "arguments": "{}"}]})
    assert req.body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "shell", "arguments": "{}"}}]}


@pytest.mark.parametrize("change, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"model": ""}, "model"),
    ({"input": None}, "input"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_video"}]}]},
     "input.0.content.0.type"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
])
def test_bad_or_stateful_requests_raise_400_naming_the_field(change, param):
    body = {k: v for k, v in {"model": "m", "input": "x", **change}.items() if v is not None}
    with pytest.raises(TranslationError) as e:
        responses_to_chat(body)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


def test_images_become_a_note_or_an_error():
    body = {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:..."}, {"type": "input_text", "text": "?"}]}]}
    assert "omitted" in responses_to_chat(body).body["messages"][0]["content"][0]["text"]
    with pytest.raises(TranslationError):
        responses_to_chat(body, media="error")


# ---- response translation (no server) ------------------------------------------------------


def test_usage_counts_cached_inside_input_tokens():
    u = responses_usage(100, 7, 30, irminsul={"reused_tokens": 60})
    assert (u["input_tokens"], u["input_tokens_details"]["cached_tokens"]) == (100, 30)
    assert u["total_tokens"] == 107 and u["irminsul"] == {"reused_tokens": 60}


def test_length_makes_an_incomplete_response_and_counts_override():
    resp = chat_to_response(script_completion(Script(text="cut", finish_reason="length",
                                                     prompt_tokens=9, completion_tokens=3)),
                            request={"model": "m", "input": "x"},
                            counts=TokenCounts(9, 3, 4))
    assert resp["status"] == "incomplete"
    assert resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["usage"]["input_tokens_details"]["cached_tokens"] == 4


def test_stream_events_are_numbered_and_ordered():
    script = Script(text="Hi!", tool_calls=CALLS, finish_reason="tool_calls")
    rs = ResponsesStream(request={"model": "m", "input": "x"})
    events = [e for c in script_chunks(script) for e in rs.feed(c)] + rs.finish()
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert all(n == d["type"] for n, d in events)
    names = [n for n, _ in events]
    assert names[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    i = names.index("response.output_text.done")
    assert names[i:i + 4] == ["response.output_text.done", "response.content_part.done",
                              "response.output_item.done", "response.output_item.added"]
    assert names.count("response.function_call_arguments.done") == 2
    assert names[-1] == "response.completed"
    added = [d for n, d in events if n == "response.output_item.added"]
    assert [d["output_index"] for d in added] == [0, 1, 2]
    assert rs.finish() == []


# ---- through the official SDK --------------------------------------------------------------


def client(url):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


async def test_sdk_create_text_and_function_calls(aiohttp_server):
    ext = {"prompt_tokens": 50, "reused_tokens": 30}
    script = Script(text="Running it.", tool_calls=CALLS, finish_reason="tool_calls",
                    prompt_tokens=50, completion_tokens=12, cached_tokens=10, irminsul=ext)
    url, state = await start_pair(aiohttp_server, script)
    resp = await client(url).responses.create(model="gpt-x", input="list", tools=TOOLS,
                                              instructions="Be terse.")
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert resp.status == "completed" and resp.model == "gpt-x"
    assert resp.output_text == "Running it." and resp.instructions == "Be terse."
    calls = [o for o in resp.output if o.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == list(CALLS)
    assert all(c.id.startswith("fc_") for c in calls)
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (50, 12)
    assert resp.usage.input_tokens_details.cached_tokens == 10
    assert resp.usage.model_extra["irminsul"] == ext
    assert [t.name for t in resp.tools] == ["shell", "update_plan"]
    assert state["bodies"][0]["messages"][0] == {"role": "system", "content": "Be terse."}


async def test_sdk_stream_rebuilds_the_same_output(aiohttp_server):
    script = Script(text="Running it now.", tool_calls=CALLS, finish_reason="tool_calls",
                    prompt_tokens=50, completion_tokens=12, cached_tokens=10)
    url, _ = await start_pair(aiohttp_server, script)
    deltas, arg_deltas = [], []
    async with client(url).responses.stream(model="gpt-x", input="list", tools=TOOLS) as s:
        async for event in s:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.function_call_arguments.delta":
                arg_deltas.append(event.delta)
        final = await s.get_final_response()
    assert "".join(deltas) == script.text and len(deltas) > 1
    assert "".join(arg_deltas) == "".join(a for _, _, a in CALLS)
    assert final.output_text == script.text
    calls = [o for o in final.output if o.type == "function_call"]
    assert [(c.call_id, c.name, json.loads(c.arguments)) for c in calls] == [
        (i, n, json.loads(a)) for i, n, a in CALLS]
    assert final.usage.input_tokens_details.cached_tokens == 10
    plain = await client(url).responses.create(model="gpt-x", input="list", tools=TOOLS)

    def shape(r):
        # the streamed one is a ParsedResponse, whose text parts add `parsed: None`
        return [{k: v for k, v in o.model_dump(exclude_none=True).items() if k != "id"}
                for o in r.output]

    assert shape(plain) == shape(final)
    assert plain.usage.model_dump() == final.usage.model_dump()


async def test_sdk_raw_stream_with_reasoning_and_length(aiohttp_server):
    script = Script(text="partial", reasoning="thinking...", finish_reason="length",
                    prompt_tokens=5, completion_tokens=4)
    url, _ = await start_pair(aiohttp_server, script)
    stream = await client(url).responses.create(model="gpt-x", input="x", stream=True)
    events = [e async for e in stream]
    types = [e.type for e in events]
    assert types[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert types[-1] == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == \
        script.reasoning
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == script.reasoning
    assert final.output_text == "partial"
    assert [e.sequence_number for e in events] == list(range(len(events)))


async def test_sdk_sees_response_failed_mid_stream(aiohttp_server):
    url, _ = await start_pair(aiohttp_server, Script(text="some text here", error_after=3))
    stream = await client(url).responses.create(model="gpt-x", input="x", stream=True)
    events = [e async for e in stream]
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert events[-1].response.error.message == "engine overloaded"
    assert any(e.type == "response.output_text.delta" for e in events)


async def test_sdk_gets_openai_error_json_for_previous_response_id(aiohttp_server):
    url, state = await start_pair(aiohttp_server, Script(text="never"))
    with pytest.raises(openai.BadRequestError) as e:
        await client(url).responses.create(model="gpt-x", input="x",
                                           previous_response_id="resp_abc")
    assert e.value.status_code == 400
    assert e.value.body["type"] == "invalid_request_error"
    assert e.value.body["param"] == "previous_response_id"
    assert "not supported" in e.value.body["message"]
    assert state["bodies"] == []
