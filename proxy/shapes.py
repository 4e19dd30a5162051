"""Per API: the checks a request body must pass (400 otherwise), its translation to chat when
it has one, and what the pipeline tokenizes.

Checks are about what the proxy itself needs (types of the fields it reads); fields it does
not know are left for the upstream to accept or refuse, never a 400 here. Anthropic and
Responses bodies are checked by their translators, which name the offending field.
"""

from __future__ import annotations

import json
from typing import Any

from irminsul.proxy.anthropic import messages_to_chat
from irminsul.proxy.errors import TranslationError
from irminsul.proxy.pipeline import PromptSource
from irminsul.proxy.reorder import split_sections
from irminsul.proxy.responses import responses_to_chat
from irminsul.proxy.system_text import system_texts
from irminsul.proxy.translation import ChatRequest

ENDPOINTS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "generate": "/generate",
    "messages": "/v1/messages",
    "responses": "/v1/responses",
}
ERROR_SHAPES = {"messages": "anthropic"}  # every other API answers errors in OpenAI's shape


def error_shape(api: str) -> str:
    return ERROR_SHAPES.get(api, "openai")


def _bad(message: str, param: str | None = None) -> TranslationError:
    return TranslationError(message, status=400, param=param)


def _is_ids(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _optional(body: dict, name: str, types: tuple, what: str) -> None:
    if body.get(name) is not None and not isinstance(body[name], types):
        raise _bad(f"{name}: must be {what}", name)


def check(api: str, body: dict) -> None:
    """Raise TranslationError(400) naming the first field the proxy cannot read."""
    _optional(body, "stream", (bool,), "a boolean")
    _optional(body, "model", (str,), "a string")
    if api == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages: field required (a non-empty list)", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages.{i}: must be an object with a string role", f"messages.{i}")
        _optional(body, "tools", (list,), "a list")
        _optional(body, "stream_options", (dict,), "an object")
        _optional(body, "chat_template_kwargs", (dict,), "an object")
    elif api == "completions":
        prompt = body.get("prompt")
        ok = isinstance(prompt, str) or _is_ids(prompt) or (
            isinstance(prompt, list) and prompt
            and all(isinstance(p, str) or _is_ids(p) for p in prompt))
        if not ok:
            raise _bad("prompt: field required (a string, token IDs, or a list of them)",
                       "prompt")
        _optional(body, "stream_options", (dict,), "an object")
    elif api == "generate":
        text, ids = body.get("text"), body.get("input_ids")
        if text is None and ids is None:
            raise _bad("text or input_ids: field required", "text")
        if text is not None and not (isinstance(text, str) or (
                isinstance(text, list) and all(isinstance(t, str) for t in text))):
            raise _bad("text: must be a string or a list of strings", "text")
        if ids is not None and not (_is_ids(ids) or (
                isinstance(ids, list) and all(_is_ids(x) for x in ids))):
            raise _bad("input_ids: must be token IDs or a list of them", "input_ids")


def translate(api: str, body: dict) -> ChatRequest | None:
    """The chat request for an Anthropic or Responses body (None for the others). Raises
    TranslationError(400) for a body the translator cannot read."""
    if api == "messages":
        return messages_to_chat(body)
    if api == "responses":
        return responses_to_chat(body)
    return None


def prompt_source(api: str, body: dict, chat: ChatRequest | None) -> PromptSource | None:
    """What to tokenize; None for what the proxy does not analyse (batched prompts, or an
    Anthropic/Responses body that could not be translated)."""
    if chat is None and api in ("messages", "responses"):
        return None
    chat_body = chat.body if chat is not None else body
    sections = tuple(p for t in system_texts(body, api) for p in split_sections(t))
    if api in ("chat", "messages", "responses"):
        return PromptSource(messages=chat_body["messages"], tools=chat_body.get("tools"),
                            template_kwargs=chat_body.get("chat_template_kwargs"),
                            system_sections=sections)
    key = "prompt" if api == "completions" else "text"
    value = body.get(key)
    if isinstance(value, str):
        return PromptSource(text=value)
    if api == "generate" and _is_ids(body.get("input_ids")):
        return PromptSource(ids=tuple(body["input_ids"]))
    if api == "completions" and _is_ids(value):
        return PromptSource(ids=tuple(value))
    return None


def prompt_for_log(api: str, body: dict, chat: ChatRequest | None) -> str:
    """The prompt as JSON, for --log-prompts when no tokenizer renders it."""
    src = chat.body if chat is not None else body
    keys = ("messages", "tools") if api in ("chat", "messages", "responses") else (
        "prompt", "text", "input_ids")
    return json.dumps({k: src[k] for k in keys if k in src}, ensure_ascii=False)


def model_of(body: dict, default: str | None) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else (default or "unknown")
