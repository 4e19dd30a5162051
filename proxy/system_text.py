"""Find and rewrite the system prompt of a request body in any API shape, without mutating it.

Where the system prompt lives: OpenAI chat, messages with role system/developer (content a
string or text parts); Anthropic, top-level ``system`` (string or text blocks) plus any
role:system message a client puts in ``messages``; Responses, ``instructions`` plus input
items with role system/developer. Completions and /generate have none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SYSTEM_ROLES = ("system", "developer")


def _map_content(content: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(content, str):
        return fn(content)
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                text = fn(part["text"])
                if not text.strip() and part["text"].strip():
                    continue  # a block that held only what fn removed: drop it
                part = {**part, "text": text}
            out.append(part)
        return out
    return content


def _map_messages(messages: Any, fn: Callable[[str], str], key: str = "content") -> Any:
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") in SYSTEM_ROLES and key in m:
            m = {**m, key: _map_content(m[key], fn)}
        out.append(m)
    return out


def map_system_texts(body: dict, api: str, fn: Callable[[str], str]) -> dict:
    """A copy of ``body`` with ``fn`` applied to every system-prompt text; ``body`` unchanged.

    ``api``: "chat", "messages", "responses" (others: body returned as is).
    """
    if api == "chat":
        return {**body, "messages": _map_messages(body.get("messages"), fn)}
    if api == "messages":
        out = {**body, "messages": _map_messages(body.get("messages"), fn)}
        if "system" in body:
            out["system"] = _map_content(body["system"], fn)
        return out
    if api == "responses":
        out = dict(body)
        if isinstance(body.get("instructions"), str):
            out["instructions"] = fn(body["instructions"])
        if isinstance(body.get("input"), list):
            out["input"] = _map_messages(body["input"], fn)
        return out
    return body


def system_texts(body: dict, api: str) -> list[str]:
    """Every system-prompt text of ``body``, in order."""
    found: list[str] = []

    def keep(text: str) -> str:
        found.append(text)
        return text

    map_system_texts(body, api, keep)
    return found
