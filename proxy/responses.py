"""OpenAI Responses API (POST /v1/responses, what Codex-style agents speak) <-> chat
completions, requests and whole responses. Streaming is in
:mod:`irminsul.proxy.responses_stream`. Choices made where the shapes differ:

- `instructions` and every system/developer message in `input` form one leading system
  message (instructions first, joined by a blank line): the chat templates of the models
  served here render one system prompt.
- function_call items join the assistant message just before them (parallel calls share one
  message); function_call_output items become `role: "tool"` messages.
- reasoning items are dropped. Items that need server-side state (item_reference,
  previous_response_id, conversation) or tools this translation does not carry (custom,
  shell, computer, ...) are a 400 naming them. Non-function tools are dropped with a note.
- reasoning, store, include, metadata, truncation, service_tier, user, ... are accepted and
  dropped; text.format (json_schema / json_object) becomes response_format.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from irminsul.proxy.errors import TranslationError
from irminsul.proxy.translation import (
    ChatRequest,
    TokenCounts,
    named_tool_choice,
    new_id,
    read_completion,
    require,
    text_content,
    usage_of,
)

SYSTEM_JOINER = "\n\n"
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
MEDIA_PARTS = frozenset({"input_image", "input_file", "input_audio"})
KNOWN_FIELDS = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream",
    "tools", "tool_choice", "parallel_tool_calls", "text", "prompt_cache_key",
    "previous_response_id", "conversation",
})


def responses_to_chat(body: Any, *, media: str = "note") -> ChatRequest:
    """Translate a /v1/responses request body. Raises TranslationError(400) naming the field."""
    require(isinstance(body, Mapping), "request body must be a JSON object")
    for stateful in ("previous_response_id", "conversation"):
        require(body.get(stateful) is None,
                f"{stateful} is not supported: this server stores no responses; send the whole "
                "conversation in `input` (with store=false)", stateful)
    require(isinstance(body.get("model"), str) and body["model"] != "",
            "model: field required (a non-empty string)", "model")
    dropped = [f"field {k}" for k in body if k not in KNOWN_FIELDS]
    system: list[str] = []
    if body.get("instructions") is not None:
        require(isinstance(body["instructions"], str), "instructions: must be a string",
                "instructions")
        system += [body["instructions"]] if body["instructions"] else []
    items = body.get("input")
    require(isinstance(items, (str, list)), "input: field required (a string or a list of items)",
            "input")
    messages: list[dict[str, Any]] = []
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    else:
        for i, item in enumerate(items):
            _item(item, f"input.{i}", messages, system, dropped, media)

    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if system:
        messages.insert(0, {"role": "system", "content": SYSTEM_JOINER.join(system)})
    limit = body.get("max_output_tokens")
    if limit is not None:
        require(isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1,
                "max_output_tokens: must be an integer >= 1", "max_output_tokens")
        chat["max_tokens"] = limit
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            chat[key] = body[key]
    tools = _tools(body.get("tools"), dropped)
    if tools:
        chat["tools"] = tools
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = _tool_choice(body["tool_choice"])
        if isinstance(body.get("parallel_tool_calls"), bool):
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    fmt = body.get("text", {}).get("format") if isinstance(body.get("text"), Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    elif isinstance(fmt, Mapping) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    stream = bool(body.get("stream"))
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    key = body.get("prompt_cache_key")
    hint = key if isinstance(key, str) and key else None
    return ChatRequest(chat, stream, body["model"], hint, tuple(dropped))


def _item(item: Any, where: str, messages: list, system: list, dropped: list, media: str):
    require(isinstance(item, Mapping), f"{where}: must be an object", where)
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        require(role in ("user", "assistant", "system", "developer"),
                f"{where}.role: must be user, assistant, system or developer", f"{where}.role")
        texts = _texts(item.get("content"), f"{where}.content", dropped, media)
        if role in ("system", "developer"):
            system.extend(t for t in texts if t)
        else:
            messages.append({"role": role, "content": text_content(texts or [""])})
    elif kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            require(isinstance(item.get(key), str), f"{where}.{key}: field required (a string)",
                    f"{where}.{key}")
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            if not last.get("tool_calls") and last["content"] == "":
                last["content"] = None  # a pure tool-call turn, as chat templates expect
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        require(isinstance(item.get("call_id"), str), f"{where}.call_id: field required",
                f"{where}.call_id")
        output = item.get("output")
        text = output if isinstance(output, str) else "\n".join(
            _texts(output, f"{where}.output", dropped, media))
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
    elif kind == "reasoning":
        dropped.append(f"{where}: reasoning item")
    else:
        raise TranslationError(f"{where}.type: input item type {kind!r} is not supported",
                               param=f"{where}.type")


def _texts(content: Any, where: str, dropped: list, media: str) -> list[str]:
    if isinstance(content, str):
        return [content]
    require(isinstance(content, list), f"{where}: must be a string or a list of parts", where)
    out = []
    for j, part in enumerate(content):
        at = f"{where}.{j}"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in TEXT_PARTS:
            require(isinstance(part.get("text"), str), f"{at}.text: field required", f"{at}.text")
            out.append(part["text"])
        elif kind == "refusal":
            out.append(str(part.get("refusal", "")))
        elif kind in MEDIA_PARTS:
            if media == "error":
                raise TranslationError(f"{at}: {kind} is not supported by this model", param=at)
            dropped.append(f"{at}: {kind} part")
            out.append(f"[{kind} omitted: this model reads text only]")
        else:
            raise TranslationError(f"{at}.type: content part type {kind!r} is not supported",
                                   param=f"{at}.type")
    return out


def _tools(tools: Any, dropped: list) -> list[dict[str, Any]]:
    if tools is None:
        return []
    require(isinstance(tools, list), "tools: must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        require(isinstance(tool, Mapping), f"tools.{i}: must be an object", f"tools.{i}")
        if tool.get("type") != "function":
            dropped.append(f"tools.{i}: {tool.get('type')} tool")
            continue
        require(isinstance(tool.get("name"), str) and tool["name"] != "",
                f"tools.{i}.name: field required", f"tools.{i}.name")
        fn: dict[str, Any] = {"name": tool["name"]}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        params = tool.get("parameters")
        fn["parameters"] = dict(params) if isinstance(params, Mapping) else {
            "type": "object", "properties": {}}
        if isinstance(tool.get("strict"), bool):
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        return named_tool_choice(choice)
    raise TranslationError(f"tool_choice: unsupported value {choice!r}", param="tool_choice")


# ---- responses ---------------------------------------------------------------------------------


def responses_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, *,
                    irminsul: Mapping | None = None) -> dict[str, Any]:
    """Responses usage: input_tokens includes the cached ones (unlike Anthropic's)."""
    usage: dict[str, Any] = {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": max(0, min(cached_tokens, prompt_tokens)),
                                 "cache_write_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if irminsul is not None:
        usage["irminsul"] = dict(irminsul)
    return usage


def counts_usage(counts: TokenCounts | None) -> dict[str, Any]:
    return usage_of(counts, responses_usage)


def status_of(finish_reason: str | None) -> tuple[str, dict | None]:
    """(status, incomplete_details) for a chat finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def response_object(request: Mapping, *, response_id: str, model: str, created_at: float,
                    status: str, output: list, usage: dict | None = None,
                    incomplete_details: dict | None = None, error: dict | None = None) -> dict:
    """A Response object echoing the request's settings, as the API returns them."""
    tools = [{"type": "function", "name": t["function"]["name"],
              "description": t["function"].get("description"),
              "parameters": t["function"]["parameters"],
              "strict": t["function"].get("strict", False)}
             for t in _tools(request.get("tools"), [])]
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "model": model, "output": output, "usage": usage, "error": error,
        "incomplete_details": incomplete_details,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "temperature": request.get("temperature"), "top_p": request.get("top_p"),
        "tools": tools, "tool_choice": request.get("tool_choice") or "auto",
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None, "metadata": request.get("metadata") or {},
        "reasoning": request.get("reasoning"), "store": False,
        "text": request.get("text") or {"format": {"type": "text"}},
        "truncation": request.get("truncation") or "disabled", "user": request.get("user"),
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [output_text(text)] if status == "completed" else []}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def reasoning_item(item_id: str, text: str) -> dict:
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content}


def chat_to_response(completion: Any, *, request: Mapping, counts: TokenCounts | None = None,
                     model: str | None = None, response_id: str | None = None) -> dict:
    """An OpenAI chat completion as a Response object. ``request`` is the original Responses
    request body (echoed back); ``counts`` overrides the completion's usage."""
    choice = read_completion(completion)
    output = []
    if choice.reasoning:
        output.append(reasoning_item(new_id("rs_"), choice.reasoning))
    if choice.text:
        output.append(message_item(new_id("msg_"), choice.text))
    for call_id, name, arguments in choice.tool_calls:
        output.append(function_call_item(new_id("fc_"), call_id, name, arguments))
    status, details = status_of(choice.finish_reason)
    if counts is None:
        counts = TokenCounts.from_chat_usage(completion.get("usage"))
    return response_object(
        request, response_id=response_id or new_id("resp_"),
        model=model or request.get("model") or completion.get("model") or "",
        created_at=int(completion.get("created") or time.time()), status=status,
        output=output, usage=counts_usage(counts), incomplete_details=details)
