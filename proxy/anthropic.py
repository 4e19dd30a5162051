"""Anthropic Messages API <-> OpenAI chat completions, requests and whole responses.

Streaming is in :mod:`irminsul.proxy.anthropic_stream`. Choices made where the shapes differ:

- system: a string or text blocks, joined by a blank line; `role: "system"` messages inside
  `messages` (real clients send them) are appended to it in order. cache_control is ignored.
- A user message's tool_result blocks become `role: "tool"` messages placed before the rest of
  that message's text, since OpenAI needs tool messages right after the assistant's calls.
  `is_error: true` puts TOOL_ERROR_PREFIX before the result text.
- thinking / redacted_thinking blocks are dropped. Image and document blocks become a short
  text note (``media="note"``) or a 400 error (``media="error"``): the models served here
  read text only.
- Unknown request fields (thinking, context_management, output_config, betas, service_tier,
  container, mcp_servers, ...) are accepted and dropped; tools without an input_schema
  (Anthropic's server tools such as web_search) are dropped too, each noted in `dropped`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from irminsul.proxy.errors import TranslationError
from irminsul.proxy.translation import (
    ChatRequest,
    TokenCounts,
    arguments_to_input,
    input_to_arguments,
    named_tool_choice,
    new_id,
    read_completion,
    require,
    text_content,
    usage_of,
)

TOOL_ERROR_PREFIX = "[tool error] "
SYSTEM_JOINER = "\n\n"
MEDIA_BLOCKS = frozenset({"image", "document", "container_upload", "search_result"})
SKIPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
# Request fields translated below; any other top-level field is accepted and dropped.
KNOWN_FIELDS = frozenset({
    "model", "messages", "system", "max_tokens", "temperature", "top_p", "top_k",
    "stop_sequences", "stream", "tools", "tool_choice", "metadata",
})
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}


def messages_to_chat(body: Any, *, media: str = "note") -> ChatRequest:
    """Translate a /v1/messages request body. Raises TranslationError(400) naming the field."""
    require(isinstance(body, Mapping), "request body must be a JSON object")
    require(isinstance(body.get("model"), str) and body["model"] != "",
            "model: field required (a non-empty string)", "model")
    max_tokens = body.get("max_tokens")
    require(isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1,
            "max_tokens: field required (an integer >= 1)", "max_tokens")
    messages = body.get("messages")
    require(isinstance(messages, list) and len(messages) > 0,
            "messages: field required (a non-empty list)", "messages")
    dropped = [f"field {k}" for k in body if k not in KNOWN_FIELDS]
    system = _system_parts(body.get("system"), "system")
    chat_messages: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages.{i}"
        require(isinstance(msg, Mapping), f"{where}: must be an object", where)
        role = msg.get("role")
        require(role in ("user", "assistant", "system"),
                f"{where}.role: must be 'user', 'assistant' or 'system'", f"{where}.role")
        require("content" in msg, f"{where}.content: field required", f"{where}.content")
        if role == "system":
            system.extend(_system_parts(msg["content"], f"{where}.content"))
        elif role == "assistant":
            chat_messages.append(_assistant(msg["content"], where, dropped))
        else:
            chat_messages.extend(_user(msg["content"], where, dropped, media))

    chat: dict[str, Any] = {"model": body["model"], "max_tokens": max_tokens}
    if system:
        chat["messages"] = [{"role": "system", "content": SYSTEM_JOINER.join(system)}]
    chat["messages"] = chat.get("messages", []) + chat_messages
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
        if body.get(src) is not None:
            chat[dst] = body[src]
    stops = body.get("stop_sequences")
    if stops:
        require(isinstance(stops, list) and all(isinstance(s, str) for s in stops),
                "stop_sequences: must be a list of strings", "stop_sequences")
        chat["stop"] = list(stops)
    tools = _tools(body.get("tools"), dropped)
    if tools:
        chat["tools"] = tools
        chat.update(_tool_choice(body.get("tool_choice")))
    stream = bool(body.get("stream"))
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    meta = body.get("metadata")
    user_id = meta.get("user_id") if isinstance(meta, Mapping) else None
    user_id = user_id if isinstance(user_id, str) and user_id else None
    if user_id:
        chat["user"] = user_id
    return ChatRequest(chat, stream, body["model"], user_id, tuple(dropped))


def _system_parts(system: Any, where: str) -> list[str]:
    if system is None:
        return []
    if isinstance(system, str):
        return [system] if system else []
    require(isinstance(system, list), f"{where}: must be a string or a list of text blocks", where)
    parts = []
    for j, block in enumerate(system):
        require(isinstance(block, Mapping) and block.get("type") == "text"
                and isinstance(block.get("text"), str),
                f"{where}.{j}: system blocks must be text blocks", f"{where}.{j}")
        if block["text"]:
            parts.append(block["text"])
    return parts


def _blocks(content: Any, where: str) -> list[Mapping]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    require(isinstance(content, list), f"{where}: must be a string or a list of content blocks",
            where)
    for j, block in enumerate(content):
        require(isinstance(block, Mapping) and isinstance(block.get("type"), str),
                f"{where}.{j}: content block needs a type", f"{where}.{j}")
    return content


def _text_of(block: Mapping, where: str) -> str:
    require(isinstance(block.get("text"), str), f"{where}.text: field required", f"{where}.text")
    return block["text"]


def _media(block: Mapping, where: str, dropped: list[str], media: str) -> str:
    kind = block["type"]
    if media == "error":
        raise TranslationError(f"{where}: {kind} content is not supported by this model",
                               param=where)
    dropped.append(f"{where}: {kind} block")
    return f"[{kind} omitted: this model reads text only]"


def _user(content: Any, where: str, dropped: list[str], media: str) -> list[dict[str, Any]]:
    tool_messages, texts = [], []
    for j, block in enumerate(_blocks(content, f"{where}.content")):
        at = f"{where}.content.{j}"
        kind = block["type"]
        if kind == "text":
            texts.append(_text_of(block, at))
        elif kind == "tool_result":
            tool_messages.append(_tool_result(block, at, dropped, media))
        elif kind in MEDIA_BLOCKS:
            texts.append(_media(block, at, dropped, media))
        elif kind in SKIPPED_BLOCKS:
            dropped.append(f"{at}: {kind} block")
        else:
            raise TranslationError(f"{at}: unsupported content block type {kind!r}", param=at)
    out = tool_messages
    if texts or not tool_messages:
        out.append({"role": "user", "content": text_content(texts or [""])})
    return out


def _tool_result(block: Mapping, where: str, dropped: list[str], media: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    require(isinstance(call_id, str) and call_id != "", f"{where}.tool_use_id: field required",
            f"{where}.tool_use_id")
    content = block.get("content")
    texts = []
    if content is not None:
        for k, part in enumerate(_blocks(content, f"{where}.content")):
            if part["type"] == "text":
                texts.append(_text_of(part, f"{where}.content.{k}"))
            elif part["type"] in MEDIA_BLOCKS:
                texts.append(_media(part, f"{where}.content.{k}", dropped, media))
            else:
                raise TranslationError(f"{where}.content.{k}: unsupported tool_result block "
                                       f"type {part['type']!r}", param=f"{where}.content.{k}")
    text = "\n".join(texts)
    if block.get("is_error"):
        text = TOOL_ERROR_PREFIX + text
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _assistant(content: Any, where: str, dropped: list[str]) -> dict[str, Any]:
    texts, calls = [], []
    for j, block in enumerate(_blocks(content, f"{where}.content")):
        at = f"{where}.content.{j}"
        kind = block["type"]
        if kind == "text":
            texts.append(_text_of(block, at))
        elif kind == "tool_use":
            require(isinstance(block.get("id"), str) and isinstance(block.get("name"), str),
                    f"{at}: tool_use needs an id and a name", at)
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": input_to_arguments(block.get("input"))}})
        elif kind in SKIPPED_BLOCKS:
            dropped.append(f"{at}: {kind} block")
        else:
            raise TranslationError(f"{at}: unsupported assistant block type {kind!r}", param=at)
    msg: dict[str, Any] = {"role": "assistant"}
    # A pure tool-call turn has content null, which chat templates test for (`is none`).
    msg["content"] = text_content(texts) if texts else (None if calls else "")
    if calls:
        msg["tool_calls"] = calls
    return msg


def _tools(tools: Any, dropped: list[str]) -> list[dict[str, Any]]:
    if tools is None:
        return []
    require(isinstance(tools, list), "tools: must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        require(isinstance(tool, Mapping), f"tools.{i}: must be an object", f"tools.{i}")
        if tool.get("type") not in (None, "custom") and "input_schema" not in tool:
            dropped.append(f"tools.{i}: server tool {tool.get('type')}")
            continue
        require(isinstance(tool.get("name"), str) and tool["name"] != "",
                f"tools.{i}.name: field required", f"tools.{i}.name")
        require(isinstance(tool.get("input_schema"), Mapping),
                f"tools.{i}.input_schema: field required (an object)", f"tools.{i}.input_schema")
        fn: dict[str, Any] = {"name": tool["name"]}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        fn["parameters"] = dict(tool["input_schema"])
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    if choice is None:
        return {}
    require(isinstance(choice, Mapping), "tool_choice: must be an object", "tool_choice")
    kind = choice.get("type")
    out: dict[str, Any] = {}
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        out["tool_choice"] = named_tool_choice(choice)
    else:
        raise TranslationError(f"tool_choice.type: unknown value {kind!r}", param="tool_choice")
    if choice.get("disable_parallel_tool_use"):
        out["parallel_tool_calls"] = False
    return out


# ---- responses ---------------------------------------------------------------------------------


def anthropic_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, *,
                    irminsul: Mapping | None = None) -> dict[str, Any]:
    """Anthropic usage: input_tokens excludes cache reads (input = prompt - cached)."""
    cached = max(0, min(cached_tokens, prompt_tokens))
    usage: dict[str, Any] = {
        "input_tokens": prompt_tokens - cached,
        "output_tokens": completion_tokens,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }
    if irminsul is not None:
        usage["irminsul"] = dict(irminsul)
    return usage


def counts_usage(counts: TokenCounts | None) -> dict[str, Any]:
    return usage_of(counts, anthropic_usage)


def stop_fields(finish_reason: str | None, matched_stop: Any, stop_sequences,
                has_tool_calls: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence). A stop sequence is recognised from the upstream's
    `matched_stop` (SGLang) or `stop_reason` (vLLM) naming one of the request's sequences."""
    if isinstance(matched_stop, str) and matched_stop in tuple(stop_sequences or ()):
        return "stop_sequence", matched_stop
    if has_tool_calls and finish_reason != "length":
        return "tool_use", None  # some servers finish a tool call with "stop"
    return STOP_REASONS.get(finish_reason or "stop", "end_turn"), None


def chat_to_message(completion: Any, *, model: str | None = None, stop_sequences=(),
                    counts: TokenCounts | None = None, message_id: str | None = None
                    ) -> dict[str, Any]:
    """An OpenAI chat completion as an Anthropic message. ``counts`` overrides the completion's
    own usage (the proxy decides what counts as cached). Raises TranslationError(502)."""
    choice = read_completion(completion)
    content: list[dict[str, Any]] = []
    if choice.reasoning:
        content.append({"type": "thinking", "thinking": choice.reasoning, "signature": ""})
    if choice.text:
        content.append({"type": "text", "text": choice.text})
    for call_id, name, arguments in choice.tool_calls:
        content.append({"type": "tool_use", "id": call_id, "name": name,
                        "input": arguments_to_input(arguments)})
    reason, sequence = stop_fields(choice.finish_reason, choice.matched_stop, stop_sequences,
                                   bool(choice.tool_calls))
    if counts is None:
        counts = TokenCounts.from_chat_usage(completion.get("usage"))
    return {
        "id": message_id or new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model or completion.get("model") or "",
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": counts_usage(counts),
    }
