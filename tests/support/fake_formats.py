"""Response bodies and SSE events in SGLang's shapes, for tests/support/fake_sglang.py.

Streams are ``Events(head, body, tail)``: ``body`` holds the events that carry generated
content, so a "stream forever" knob can repeat them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import NamedTuple


class Events(NamedTuple):
    head: list[bytes]
    body: list[bytes]
    tail: list[bytes]


def sse(obj, event: str | None = None) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {data}\n\n".encode()


DONE = b"data: [DONE]\n\n"
TOOL = {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def chat_completion(model: str, pieces: list[str], usage: dict, *, tool_calls=False,
                    tool: dict = TOOL) -> dict:
    """``tool``: the called function's name and JSON arguments (default: get_weather)."""
    message: dict = {"role": "assistant", "content": "".join(pieces)}
    if tool_calls:
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": dict(tool)}]}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
        "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "tool_calls" if tool_calls else "stop"}],
        "usage": usage,
    }


def chat_chunks(model: str, pieces: list[str], usage: dict, *, tool_calls=False,
                include_usage=False, tool: dict = TOOL) -> Events:
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())

    def chunk(delta, finish=None, choices=True):
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}] if choices else []}

    head = [sse(chunk({"role": "assistant", "content": ""}))]
    if tool_calls:
        body = [sse(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                           "function": {"name": tool["name"],
                                                        "arguments": ""}}]})),
                sse(chunk({"tool_calls": [{"index": 0,
                                           "function": {"arguments": tool["arguments"]}}]}))]
    else:
        body = [sse(chunk({"content": p})) for p in pieces]
    tail = [sse(chunk({}, "tool_calls" if tool_calls else "stop"))]
    if include_usage:
        tail.append(sse({**chunk(None, choices=False), "usage": usage}))
    return Events(head, body, [*tail, DONE])


def completion(model: str, pieces: list[str], usage: dict, *, tool_calls=False) -> dict:
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion",
        "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": "".join(pieces), "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": usage,
    }


def completion_chunks(model: str, pieces: list[str], usage: dict, *, tool_calls=False,
                      include_usage=False) -> Events:
    cid, created = f"cmpl-{uuid.uuid4().hex[:12]}", int(time.time())

    def chunk(text, finish=None):
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish}]}

    tail = [sse(chunk("", "stop"))]
    if include_usage:
        tail.append(sse({**chunk(""), "choices": [], "usage": usage}))
    return Events([], [sse(chunk(p)) for p in pieces], [*tail, DONE])


def generate_result(pieces: list[str], meta: dict) -> dict:
    return {"text": "".join(pieces),
            "meta_info": {**meta, "id": uuid.uuid4().hex, "finish_reason": {"type": "stop"}}}


def generate_chunks(pieces: list[str], meta: dict) -> Events:
    rid = uuid.uuid4().hex
    body = []
    for i in range(1, len(pieces) + 1):  # SGLang streams the cumulative text
        body.append(sse({"text": "".join(pieces[:i]),
                         "meta_info": {**meta, "completion_tokens": i, "id": rid,
                                       "finish_reason": None}}))
    last = {"text": "".join(pieces), "meta_info": {**meta, "id": rid,
                                                   "finish_reason": {"type": "stop"}}}
    return Events([], body, [sse(last), DONE])


def anthropic_message(model: str, pieces: list[str], usage: dict) -> dict:
    return {"id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant",
            "model": model, "content": [{"type": "text", "text": "".join(pieces)}],
            "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}


def anthropic_events(model: str, pieces: list[str], usage: dict) -> Events:
    start = anthropic_message(model, [], {**usage, "output_tokens": 0})
    start["content"], start["stop_reason"] = [], None
    head = [sse({"type": "message_start", "message": start}, "message_start"),
            sse({"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}}, "content_block_start")]
    body = [sse({"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": p}}, "content_block_delta")
            for p in pieces]
    tail = [sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse({"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                    "stop_sequence": None},
                 "usage": {"output_tokens": usage["output_tokens"]}}, "message_delta"),
            sse({"type": "message_stop"}, "message_stop")]
    return Events(head, body, tail)


def responses_object(model: str, pieces: list[str], usage: dict | None, status="completed"):
    text = "".join(pieces)
    output = [{"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    return {"id": "resp_fake", "object": "response", "created_at": int(time.time()),
            "status": status, "model": model, "output": output if usage else [],
            "usage": usage, "error": None, "incomplete_details": None, "instructions": None,
            "metadata": {}, "parallel_tool_calls": True, "temperature": None, "top_p": None,
            "tool_choice": "auto", "tools": []}


def responses_events(model: str, pieces: list[str], usage: dict) -> Events:
    seq = iter(range(10_000))

    def ev(kind: str, **fields) -> bytes:
        return sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

    head = [ev("response.created", response=responses_object(model, [], None, "in_progress"))]
    body = [ev("response.output_text.delta", item_id="msg_fake", output_index=0,
               content_index=0, delta=p) for p in pieces]
    tail = [ev("response.completed", response=responses_object(model, pieces, usage))]
    return Events(head, body, tail)
