"""When a streamed answer shows its first generated token: the TTFT that the proxy's savings
log and `irminsul replay` both record, read the same way from each API's events.

A token shows as content (text, a tool call, reasoning), or as the end of the answer: a reply
whose first tokens decode to no text (a stop token first, or half of a UTF-8 character; random
weights do both) still had its first token when its end came, and without that it would have
no TTFT and drop out of the percentiles. A stream that never shows either has none.
"""

from __future__ import annotations

from collections.abc import Mapping

_DELTA_KEYS = ("content", "tool_calls", "reasoning_content", "refusal")


def chunk_shows_token(api: str, payload: Mapping) -> bool:
    """An OpenAI chat/completions chunk, or (api "generate") an SGLang /generate chunk."""
    if api == "generate":
        meta = payload.get("meta_info")
        ended = isinstance(meta, Mapping) and (meta.get("finish_reason") is not None
                                               or bool(meta.get("completion_tokens")))
        return bool(payload.get("text")) or bool(payload.get("output_ids")) or ended
    for choice in payload.get("choices") or ():
        if not isinstance(choice, Mapping):
            continue
        if choice.get("text") or choice.get("finish_reason") is not None:
            return True
        delta = choice.get("delta")
        if isinstance(delta, Mapping) and any(delta.get(k) for k in _DELTA_KEYS):
            return True
    return False


def anthropic_event_shows_token(name: str | None, payload: Mapping | None = None) -> bool:
    """An Anthropic Messages event: a content delta, a tool_use block's start, or the
    message_delta that ends the answer."""
    if name in ("content_block_delta", "message_delta"):
        return True
    if name == "content_block_start" and isinstance(payload, Mapping):
        block = payload.get("content_block")
        return isinstance(block, Mapping) and block.get("type") == "tool_use"
    return False
