"""Pieces shared by the Anthropic and Responses translators: the translated request, token
counts, tool-argument text, a decoder that turns OpenAI chat chunks into content pieces, and
the chunk-feeding part of both stream translators."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from irminsul.proxy.errors import TranslationError

# A tool call whose arguments are not a JSON object still has to become an object (Anthropic
# `input`). We keep the model's text under this key, and turn such an input back into the very
# same text when the client sends the call back, so the model sees its own tokens again.
RAW_ARGUMENTS_KEY = "_raw_arguments"


class ChatRequest(NamedTuple):
    """An OpenAI chat-completions request translated from another API shape."""

    body: dict[str, Any]  # the JSON body for POST /v1/chat/completions
    stream: bool
    model: str
    session_hint: str | None  # metadata.user_id (Anthropic) or prompt_cache_key (Responses)
    dropped: tuple[str, ...]  # what the translation left out, one short note each


class TokenCounts(NamedTuple):
    """Token counts of one request. ``cached_tokens`` is whatever the caller counts as cached
    (the proxy decides: exact prefix only, or content reuse too); it is part of prompt_tokens."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    irminsul: dict[str, Any] | None = None  # ReuseCounts.to_json(), passed through as is

    @classmethod
    def from_chat_usage(cls, usage: Any) -> TokenCounts | None:
        """Counts from an OpenAI chat ``usage`` object; None if there is none."""
        if not isinstance(usage, Mapping):
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
        extra = usage.get("irminsul")
        return cls(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(cached or 0),
            irminsul=dict(extra) if isinstance(extra, Mapping) else None,
        )


def usage_of(counts: TokenCounts | None, shape: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """``shape(prompt, completion, cached, irminsul=...)`` applied to ``counts`` (zeros for
    None): the API's usage object for counts the proxy decided on."""
    counts = counts or TokenCounts(0, 0)
    return shape(counts.prompt_tokens, counts.completion_tokens, counts.cached_tokens,
                 irminsul=counts.irminsul)


def new_id(prefix: str) -> str:
    """A fresh object id such as ``msg_<24 hex>``."""
    return f"{prefix}{secrets.token_hex(12)}"


def arguments_to_input(raw: Any) -> dict[str, Any]:
    """Tool-call argument text -> an input object. Empty text is {}; text that is not a JSON
    object becomes ``{RAW_ARGUMENTS_KEY: text}`` (see the constant)."""
    if isinstance(raw, Mapping):
        return dict(raw)
    text = raw if isinstance(raw, str) else ""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {RAW_ARGUMENTS_KEY: text}
    return value if isinstance(value, dict) else {RAW_ARGUMENTS_KEY: text}


def input_to_arguments(value: Any) -> str:
    """An input object -> tool-call argument text; the inverse of :func:`arguments_to_input`."""
    if (isinstance(value, Mapping) and set(value) == {RAW_ARGUMENTS_KEY}
            and isinstance(value[RAW_ARGUMENTS_KEY], str)):
        return value[RAW_ARGUMENTS_KEY]
    return json.dumps({} if value is None else value, ensure_ascii=False)


def text_content(parts: list[str]) -> str | list[dict[str, str]]:
    """Text parts -> OpenAI message content: one part as a string, several as text parts (kept
    apart so the tokenizer can anchor chunk boundaries where the client split its content)."""
    if len(parts) == 1:
        return parts[0]
    return [{"type": "text", "text": p} for p in parts]


def require(cond: bool, message: str, param: str | None = None) -> None:
    if not cond:
        raise TranslationError(message, param=param)


# ---- chat completions, read -------------------------------------------------------------------


def named_tool_choice(choice: Mapping) -> dict[str, Any]:
    """The OpenAI tool_choice forcing the function ``choice["name"]`` (Anthropic's
    {"type": "tool"} and the Responses API's {"type": "function"} both carry it)."""
    require(isinstance(choice.get("name"), str), "tool_choice.name: field required",
            "tool_choice.name")
    return {"type": "function", "function": {"name": choice["name"]}}


class ChatChoice(NamedTuple):
    """The first choice of a non-streamed chat completion, normalised."""

    text: str
    reasoning: str
    tool_calls: tuple[tuple[str, str, str], ...]  # (id, name, arguments text)
    finish_reason: str | None
    matched_stop: Any  # SGLang `matched_stop` / vLLM `stop_reason`: the stop string or token


def read_completion(completion: Any) -> ChatChoice:
    """Normalise an OpenAI chat completion; a malformed one is an upstream fault (502)."""
    choices = completion.get("choices") if isinstance(completion, Mapping) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise TranslationError("upstream chat completion has no choices", status=502)
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), Mapping) else {}
    calls = []
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        calls.append((call.get("id") or new_id("call_"), fn.get("name") or "",
                      fn.get("arguments") or ""))
    return ChatChoice(
        text=_str(message.get("content")),
        reasoning=_str(message.get("reasoning_content")),
        tool_calls=tuple(calls),
        finish_reason=choice.get("finish_reason"),
        matched_stop=_matched_stop(choice),
    )


def _str(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # text parts
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def _matched_stop(choice: Mapping) -> Any:
    value = choice.get("matched_stop")
    return choice.get("stop_reason") if value is None else value


# ---- chat completion chunks, read --------------------------------------------------------------


class TextPiece(NamedTuple):
    text: str


class ReasoningPiece(NamedTuple):
    text: str


class ToolStart(NamedTuple):
    index: int  # the upstream tool-call index
    id: str
    name: str


class ToolArgs(NamedTuple):
    index: int
    text: str  # a fragment of the arguments JSON


Piece = TextPiece | ReasoningPiece | ToolStart | ToolArgs


class ChunkDecoder:
    """Turns ``chat.completion.chunk`` dicts into content pieces in arrival order and keeps the
    finish reason, stop match and usage. Only choice 0 is read (n > 1 is not translated).

    A tool call is started once its name is known; argument fragments that come before the
    name are held back and follow the :class:`ToolStart`.
    """

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.matched_stop: Any = None
        self.counts: TokenCounts | None = None
        self.model: str | None = None
        self._started: set[int] = set()
        self._pending: dict[int, list[str]] = {}  # index -> [id, name, args...] before a name

    def feed(self, chunk: Any) -> list[Piece]:
        """Pieces in ``chunk``. Changes: finish_reason, matched_stop, counts, model."""
        if not isinstance(chunk, Mapping):
            raise TranslationError("upstream stream chunk is not an object", status=502)
        self.model = chunk.get("model") or self.model
        counts = TokenCounts.from_chat_usage(chunk.get("usage"))
        if counts is not None:
            self.counts = counts
        out: list[Piece] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                out.append(ReasoningPiece(delta["reasoning_content"]))
            if delta.get("content"):
                out.append(TextPiece(delta["content"]))
            for call in delta.get("tool_calls") or ():
                out.extend(self._tool_delta(call))
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                self.matched_stop = _matched_stop(choice)
        return out

    def flush(self) -> list[Piece]:
        """Tool calls that never got a name, started with name "" so no arguments are lost."""
        out: list[Piece] = []
        for index in sorted(self._pending):
            out.extend(self._start(index, self._pending[index][0], ""))
        return out

    def _tool_delta(self, call: Mapping) -> list[Piece]:
        index = int(call.get("index", 0))
        fn = call.get("function") or {}
        args = fn.get("arguments") or ""
        if index in self._started:
            return [ToolArgs(index, args)] if args else []
        pending = self._pending.setdefault(index, [call.get("id") or "", ""])
        pending[0] = pending[0] or call.get("id") or ""
        if args:
            pending.append(args)
        if not fn.get("name"):
            return []
        return self._start(index, pending[0], fn["name"])

    def _start(self, index: int, call_id: str, name: str) -> list[Piece]:
        _, _, *args = self._pending.pop(index)
        self._started.add(index)
        pieces: list[Piece] = [ToolStart(index, call_id or new_id("call_"), name)]
        return pieces + [ToolArgs(index, a) for a in args]


Event = tuple[str, dict[str, Any]]  # (event name, data); encode with sse.encode_named


class PieceStream:
    """The part the Anthropic and Responses stream translators share: upstream chunks go
    through a :class:`ChunkDecoder` and each piece becomes events. Subclasses provide
    ``start()`` (the opening events, once), ``_piece(piece)`` and ``_close()`` (ends the open
    block or item), each returning the events to send in order."""

    def __init__(self) -> None:
        self.decoder = ChunkDecoder()
        self.started = False
        self.finished = False
        self.dropped_fragments = 0  # argument fragments of a tool call already closed

    def feed(self, chunk: Any) -> list[Event]:
        """Events for one ``chat.completion.chunk`` dict. Raises TranslationError(502) for a
        chunk that is not an object."""
        events = self.start()
        for piece in self.decoder.feed(chunk):
            events.extend(self._piece(piece))
        return events

    def _drain(self) -> list[Event]:
        """The opening events if not yet sent, the decoder's held-back pieces, then the open
        block closed. Sets ``finished``; the caller appends the closing events."""
        events = self.start()
        for piece in self.decoder.flush():
            events.extend(self._piece(piece))
        events.extend(self._close())
        self.finished = True
        return events
