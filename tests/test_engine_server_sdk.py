"""The embedded engine's HTTP server as the official SDKs see it: OpenAI chat, completions and
Responses, Anthropic Messages, streamed and not, with usage and the irminsul counts.

Tool calls go through a scripted engine: the real Engine (prefill, counts, tokenizer) whose
sampled tokens are replaced by a fixed answer, since the tiny random model will not write a
well-formed tool call by itself.
"""

from __future__ import annotations

import json

import aiohttp
import anthropic
import openai
import pytest
from support.models import yarn_model  # noqa: F401  (fixture)

from irminsul.chunking.config import ChunkerConfig
from irminsul.engine_adapter.contract import ReuseCounts
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine, SamplingParams, StepOutput
from irminsul.engine_adapter.embedded.server import create_engine_app

SYSTEM = "\n".join(f"- rule {i}: keep function_{i} under {i + 10} lines" for i in range(24))
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def engine(yarn_model):  # noqa: F811
    return Engine(EngineConfig(model_dir=str(yarn_model), device="cpu", max_seq_len=2048,
                               chunker=ChunkerConfig(min_tokens=8, avg_tokens=32,
                                                     max_tokens=128)))


class Clients:
    def __init__(self, url: str):
        self.url = url
        self.openai = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        self.anthropic = anthropic.AsyncAnthropic(base_url=url, api_key="none", max_retries=0)

    async def flush(self):
        async with aiohttp.ClientSession() as s, s.post(f"{self.url}/flush_cache") as resp:
            assert resp.status == 200


async def start(aiohttp_server, engine) -> Clients:
    server = await aiohttp_server(create_engine_app(engine))
    return Clients(str(server.make_url("")).rstrip("/"))


@pytest.fixture
async def clients(aiohttp_server, engine):
    c = await start(aiohttp_server, engine)
    yield c
    await c.openai.close()
    await c.anthropic.close()


def irminsul_counts(usage) -> ReuseCounts:
    counts = ReuseCounts.from_json(usage.model_extra["irminsul"])  # checks the parts add up
    assert counts.prompt_tokens == usage.prompt_tokens
    return counts


# ---- OpenAI ---------------------------------------------------------------------------------


async def test_openai_chat_greedy_is_deterministic_and_streams_the_same_text(clients):
    kw = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    await clients.flush()
    first = await clients.openai.chat.completions.create(**kw)
    await clients.flush()
    second = await clients.openai.chat.completions.create(**kw)
    text = first.choices[0].message.content
    assert second.choices[0].message.content == text
    assert first.choices[0].finish_reason in ("length", "stop")
    usage = first.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0  # flushed before
    assert irminsul_counts(usage).new_tokens == usage.prompt_tokens

    await clients.flush()
    stream = await clients.openai.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True})
    pieces, final_usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        final_usage = chunk.usage or final_usage
    assert "".join(pieces) == text
    assert final_usage.completion_tokens == usage.completion_tokens


async def test_openai_chat_reports_exact_prefix_apart_from_content_reuse(clients):
    await clients.flush()
    await clients.openai.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=1, temperature=0)
    # Same content behind a new first line: no exact prefix past it, but content hits.
    moved = [{"role": "system", "content": "Today is 2031-04-05.\n" + SYSTEM},
             {"role": "user", "content": "hello"}]
    out = await clients.openai.chat.completions.create(
        model="tiny", messages=moved, max_tokens=1, temperature=0,
        extra_body={"irminsul_policy": "pic", "irminsul_policy_args": {"k": 2}})
    counts = irminsul_counts(out.usage)
    assert counts.reused_tokens > 0
    assert out.usage.prompt_tokens_details.cached_tokens == counts.exact_prefix_tokens
    assert counts.exact_prefix_tokens < counts.reused_tokens


async def test_openai_completions_stream(clients):
    await clients.flush()
    whole = await clients.openai.completions.create(
        model="tiny", prompt=SYSTEM[:200], max_tokens=6, temperature=0)
    await clients.flush()
    stream = await clients.openai.completions.create(
        model="tiny", prompt=SYSTEM[:200], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        text += "".join(c.text for c in chunk.choices)
        usage = chunk.usage or usage
    assert text == whole.choices[0].text
    assert usage.completion_tokens == whole.usage.completion_tokens == 6


async def test_openai_responses_stream_and_not(clients):
    await clients.flush()
    resp = await clients.openai.responses.create(
        model="tiny", instructions=SYSTEM[:300], input="hello", max_output_tokens=6,
        temperature=0)
    assert resp.status in ("completed", "incomplete")
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens <= 6
    await clients.flush()
    stream = await clients.openai.responses.create(
        model="tiny", instructions=SYSTEM[:300], input="hello", max_output_tokens=6,
        temperature=0, stream=True)
    deltas, done = [], None
    async for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type in ("response.completed", "response.incomplete"):
            done = event.response
    assert "".join(deltas) == resp.output_text
    assert done.usage.output_tokens == resp.usage.output_tokens


# ---- Anthropic ------------------------------------------------------------------------------


async def test_anthropic_messages_stream_and_not(clients):
    # This SDK version has no `temperature` argument; the API field still exists.
    kw = {"model": "tiny", "system": SYSTEM, "max_tokens": 8, "extra_body": {"temperature": 0},
          "messages": [{"role": "user", "content": "hello"}]}
    await clients.flush()
    msg = await clients.anthropic.messages.create(**kw)
    assert msg.role == "assistant" and msg.stop_reason in ("max_tokens", "end_turn")
    assert msg.usage.output_tokens <= 8
    assert msg.usage.cache_read_input_tokens == 0  # flushed before
    text = "".join(b.text for b in msg.content if b.type == "text")

    await clients.flush()
    async with clients.anthropic.messages.stream(**kw) as stream:
        streamed = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert streamed == text
    assert final.usage.output_tokens == msg.usage.output_tokens
    prompt = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert prompt == msg.usage.input_tokens + msg.usage.cache_read_input_tokens


async def test_anthropic_error_shape_through_the_sdk(clients):
    with pytest.raises(anthropic.BadRequestError) as err:
        await clients.anthropic.messages.create(
            model="tiny", max_tokens=4, messages=[{"role": "user", "content": "x" * 20000}])
    assert "context limit" in str(err.value)


# ---- tool calls (scripted tokens) -----------------------------------------------------------


class ScriptedEngine:
    """The real engine with its sampled tokens replaced by ``script`` (prefill and counts are
    real; only the model's choice of tokens is fixed)."""

    def __init__(self, engine: Engine, script: list[int]):
        self._engine = engine
        self.script = script

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, ids, params, **kw):
        first = next(self._engine.generate(ids, SamplingParams(max_new_tokens=0), **kw))
        stops = set(params.stop_token_ids) | set(self.tokenizer.eos_token_ids)
        for i, tok in enumerate(self.script[: params.max_new_tokens]):
            last = tok in stops or i + 1 == min(len(self.script), params.max_new_tokens)
            finish = ("stop" if tok in stops else "length") if last else None
            yield StepOutput(int(tok), first.counts if i == 0 else None,
                             first.prefill_seconds if i == 0 else None, finish)
            if finish:
                return


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ANSWER = 'Let me check.<|tool_call|>{"name": "get_weather", "arguments": {"city": "Paris"}}' \
         "<|/tool_call|><|end|>"


@pytest.fixture
async def scripted(aiohttp_server, engine):
    script = engine.tokenizer.encode(ANSWER).tolist()
    c = await start(aiohttp_server, ScriptedEngine(engine, script))
    yield c
    await c.openai.close()
    await c.anthropic.close()


async def test_tool_call_becomes_openai_tool_calls(scripted):
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "weather?"}],
          "tools": TOOLS, "max_tokens": 64}
    out = await scripted.openai.chat.completions.create(**kw)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    stream = await scripted.openai.chat.completions.create(**kw, stream=True)
    content, names, args, finish = "", [], "", None
    async for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or ():
            names += [tc.function.name] if tc.function.name else []
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (content, names, json.loads(args), finish) == (
        "Let me check.", ["get_weather"], {"city": "Paris"}, "tool_calls")


async def test_tool_call_becomes_anthropic_tool_use(scripted):
    tools = [{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}]
    kw = {"model": "tiny", "max_tokens": 64, "tools": tools,
          "messages": [{"role": "user", "content": "weather?"}]}
    msg = await scripted.anthropic.messages.create(**kw)
    assert msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[1].name == "get_weather" and msg.content[1].input == {"city": "Paris"}
    async with scripted.anthropic.messages.stream(**kw) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[1].input == {"city": "Paris"}


async def test_without_tools_the_markers_are_special_tokens_and_skipped(scripted):
    out = await scripted.openai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], max_tokens=64)
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert choice.message.content == \
        'Let me check.{"name": "get_weather", "arguments": {"city": "Paris"}}'
