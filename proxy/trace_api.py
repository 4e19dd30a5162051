"""A session step written as an API request: OpenAI chat completions or Anthropic messages."""

from __future__ import annotations

import json

from irminsul.proxy.trace_session import Step

ENDPOINTS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


def openai_body(step: Step, config) -> dict:
    """A /v1/chat/completions body (``config`` is a traces.TraceConfig: model, max_tokens)."""
    body = {"model": config.model,
            "messages": [{"role": "system", "content": step.system}, *step.messages],
            "max_tokens": config.max_tokens, "temperature": 0.0}
    if step.tools:
        body["tools"] = list(step.tools)
    return body


def anthropic_messages(messages) -> list[dict]:
    """OpenAI chat messages (no system) as Anthropic messages: tool calls become tool_use
    blocks, tool results tool_result blocks in a user turn, consecutive user turns merge."""
    out: list[dict] = []

    def user_block(block: dict) -> None:
        if out and out[-1]["role"] == "user":
            prev = out[-1]["content"]
            blocks = [{"type": "text", "text": prev}] if isinstance(prev, str) else prev
            out[-1] = {"role": "user", "content": [*blocks, block]}
        else:
            out.append({"role": "user", "content": [block]})

    for m in messages:
        if m["role"] == "tool":
            user_block({"type": "tool_result", "tool_use_id": m["tool_call_id"],
                        "content": m["content"]})
        elif m["role"] == "user":
            if out and out[-1]["role"] == "user":
                user_block({"type": "text", "text": m["content"]})
            else:
                out.append({"role": "user", "content": m["content"]})
        elif m.get("tool_calls"):
            blocks = [{"type": "text", "text": m["content"]}] if m.get("content") else []
            blocks += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                        "input": json.loads(c["function"]["arguments"])}
                       for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": blocks})
        else:
            out.append({"role": "assistant", "content": m["content"]})
    return out


def anthropic_body(step: Step, config) -> dict:
    """A /v1/messages body: the system prompt top-level, tools with an input_schema."""
    body = {"model": config.model, "max_tokens": config.max_tokens, "temperature": 0.0,
            "system": step.system, "messages": anthropic_messages(step.messages)}
    if step.tools:
        body["tools"] = [{"name": t["function"]["name"],
                          "description": t["function"]["description"],
                          "input_schema": t["function"]["parameters"]} for t in step.tools]
    return body
