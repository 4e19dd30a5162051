"""/v1/messages and /v1/responses through the proxy, with the official SDKs: translated to chat
completions for an upstream that lacks them, relayed natively to one that has them."""

from __future__ import annotations

import anthropic
import openai
import pytest
from support.fake_sglang import FakeSGLang
from support.proxy_harness import read_rows, start_stack, tiny_tokenizer

MESSAGES = [{"role": "user", "content": "Say hello."}]
# What Claude Code sends beside the basics; none of it may cause a 400.
CLAUDE_EXTRAS = {
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
    "output_config": {"effort": "medium"},
}
SYSTEM = [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}]


def ant(stack) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=stack.base, api_key="sk-ant-test", max_retries=0)


async def test_messages_translated_to_chat(aiohttp_server, tmp_path):
    db = tmp_path / "s.db"
    stack = await start_stack(aiohttp_server, db=str(db))
    assert not stack.state.upstream.info.has_messages
    client = ant(stack)
    messages = [*MESSAGES, {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": [{"type": "text", "text": "Again.",
                                              "cache_control": {"type": "ephemeral"}}]}]
    msg = await client.messages.create(model="m", max_tokens=50, system=SYSTEM,
                                       messages=messages, extra_body=CLAUDE_EXTRAS,
                                       metadata={"user_id": "session-7"})
    assert msg.content[0].text == stack.fake.knobs.reply and msg.stop_reason == "end_turn"
    sent = stack.fake.received[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"][0] == {"role": "system", "content": "You are Claude Code."}
    assert sent.headers["Authorization"] == "Bearer sk-ant-test"  # x-api-key for an OpenAI API
    assert msg.usage.cache_read_input_tokens == 0

    again = await client.beta.messages.create(model="m", max_tokens=50, system=SYSTEM,
                                              messages=messages, extra_body=CLAUDE_EXTRAS,
                                              metadata={"user_id": "session-7"},
                                              extra_query={"beta": "true"})
    prompt = msg.usage.input_tokens
    assert again.usage.cache_read_input_tokens == prompt - 1
    assert again.usage.input_tokens == 1  # Anthropic's input_tokens leaves cache reads out

    async with client.messages.stream(model="m", max_tokens=50, system=SYSTEM,
                                      messages=messages, metadata={"user_id": "session-7"}) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert text == stack.fake.knobs.reply
    assert final.usage.cache_read_input_tokens == prompt - 1
    await stack.close()
    rows = read_rows(db)
    assert [(r["endpoint"], r["status"], r["stream"]) for r in rows] == [
        ("/v1/messages", 200, 0), ("/v1/messages", 200, 0), ("/v1/messages", 200, 1)]
    assert {r["session"] for r in rows} == {"session-7"}
    assert [r["exact_prefix_tokens"] for r in rows] == [0, prompt - 1, prompt - 1]
    assert rows[2]["ttft_ms"] > 0


async def test_messages_relayed_to_an_upstream_that_serves_them(aiohttp_server):
    stack = await start_stack(aiohttp_server, fake=FakeSGLang(messages_api=True), db=None)
    assert stack.state.upstream.info.has_messages
    client = ant(stack)
    msg = await client.beta.messages.create(model="m", max_tokens=5, messages=MESSAGES,
                                            extra_body=CLAUDE_EXTRAS,
                                            extra_query={"beta": "true"})  # as Claude Code
    assert msg.content[0].text == "Hello from the fake engine,"
    sent = stack.fake.received[-1]
    assert (sent.path, sent.query) == ("/v1/messages", "beta=true")
    assert {k: sent.body[k] for k in CLAUDE_EXTRAS} == CLAUDE_EXTRAS  # relayed unchanged
    async with client.messages.stream(model="m", max_tokens=50, messages=MESSAGES) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert text == stack.fake.knobs.reply and final.usage.cache_read_input_tokens > 0
    await stack.close()


async def test_responses_translated_to_chat(aiohttp_server, tmp_path):
    db = tmp_path / "s.db"
    stack = await start_stack(aiohttp_server, db=str(db))
    client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="k", max_retries=0)
    kw = {"model": "m", "instructions": "Be terse.", "input": "Say hello.",
          "prompt_cache_key": "codex-1", "store": False,
          "reasoning": {"effort": "low"}, "include": ["reasoning.encrypted_content"]}
    first = await client.responses.create(**kw)
    assert first.output_text == stack.fake.knobs.reply
    assert stack.fake.received[-1].path == "/v1/chat/completions"
    second = await client.responses.create(**kw)
    assert second.usage.input_tokens_details.cached_tokens == second.usage.input_tokens - 1
    stream = await client.responses.create(**kw, stream=True)
    deltas, done = [], None
    async for ev in stream:
        if ev.type == "response.output_text.delta":
            deltas.append(ev.delta)
        elif ev.type == "response.completed":
            done = ev.response
    assert "".join(deltas) == stack.fake.knobs.reply
    assert done.usage.input_tokens_details.cached_tokens == done.usage.input_tokens - 1
    await stack.close()
    rows = read_rows(db)
    assert [(r["endpoint"], r["session"], r["stream"]) for r in rows] == [
        ("/v1/responses", "codex-1", 0)] * 2 + [("/v1/responses", "codex-1", 1)]
    assert all(r["status"] == 200 and r["completion_tokens"] == 9 for r in rows)


async def test_count_tokens_uses_the_model_tokenizer(aiohttp_server):
    tok = tiny_tokenizer()
    stack = await start_stack(aiohttp_server, tokenizer=tok, db=None)
    tools = [{"name": "read", "description": "Read a file.",
              "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]
    counted = await ant(stack).messages.count_tokens(model="m", system="Be brief.",
                                                     messages=MESSAGES, tools=tools)
    chat = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    openai_tools = [{"type": "function", "function": {
        "name": "read", "description": "Read a file.", "parameters": tools[0]["input_schema"]}}]
    assert counted.input_tokens == len(tok.encode_chat(chat, tools=openai_tools).ids)
    assert stack.fake.received == []  # counted by the proxy, not the engine
    await stack.close()

    bare = await start_stack(aiohttp_server, db=None)  # no tokenizer: the upstream decides
    with pytest.raises(anthropic.NotFoundError):
        await ant(bare).messages.count_tokens(model="m", messages=MESSAGES)
    await bare.close()


async def test_responses_relayed_to_an_upstream_that_serves_them(aiohttp_server, tmp_path):
    db = tmp_path / "s.db"
    stack = await start_stack(aiohttp_server, fake=FakeSGLang(responses_api=True), db=str(db))
    assert stack.state.upstream.info.has_responses
    client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="k", max_retries=0)
    first = await client.responses.create(model="m", input="Say hello.", max_output_tokens=3,
                                          store=False, reasoning={"effort": "low"})
    assert first.output_text == "Hello from the"
    sent = stack.fake.received[-1]
    assert sent.path == "/v1/responses" and sent.body["reasoning"] == {"effort": "low"}
    stream = await client.responses.create(model="m", input="Say hello.", stream=True)
    events = [ev async for ev in stream]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == (
        stack.fake.knobs.reply)
    usage = events[-1].response.usage
    assert usage.input_tokens_details.cached_tokens == usage.input_tokens - 1
    # what the translation refuses (server-side state) is the engine's to decide here
    chained = await client.responses.create(model="m", input="And?", previous_response_id="r1")
    assert chained.output_text and stack.fake.received[-1].body["previous_response_id"] == "r1"
    await stack.close()
    rows = read_rows(db)
    assert [(r["status"], r["stream"], r["completion_tokens"]) for r in rows] == [
        (200, 0, 3), (200, 1, 9), (200, 0, 9)]
    assert rows[1]["exact_prefix_tokens"] == rows[1]["prompt_tokens"] - 1
    assert rows[1]["ttft_ms"] > 0
