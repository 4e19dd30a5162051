"""Output text handling shared by the HTTP endpoints: stop strings and tool-call markers.

Both work on decoded text as it streams in, and both hold back only as much text as could
still turn out to belong to a stop string or a tool-call marker, so a client sees every other
character as soon as the model produced it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import NamedTuple

# The shipped chat template's tool-call form:
#   <|tool_call|>{"name": ..., "arguments": {...}}<|/tool_call|>
TOOL_CALL_OPEN = "<|tool_call|>"
TOOL_CALL_CLOSE = "<|/tool_call|>"


def _held_suffix(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some pattern."""
    hold = 0
    for pattern in patterns:
        for k in range(min(len(pattern) - 1, len(text)), hold, -1):
            if text.endswith(pattern[:k]):
                hold = k
                break
    return hold


class StopStrings:
    """Finds the first stop string in streamed text; the stop string itself is never emitted.

    ``feed`` returns the text safe to show now and the stop string it matched (or None). Text
    that might be the start of a stop string is held until the next feed or ``flush``.
    """

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add decoded text; return (text to emit, matched stop string or None)."""
        pending = self._pending + text
        first: tuple[int, str] | None = None
        for stop in self.stops:
            i = pending.find(stop)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, stop)
        if first is not None:
            self._pending = ""
            return pending[: first[0]], first[1]
        hold = _held_suffix(pending, self.stops)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], None

    def flush(self) -> str:
        """The held-back text, at the end of generation (no stop string came)."""
        pending, self._pending = self._pending, ""
        return pending


class ToolCall(NamedTuple):
    id: str
    name: str
    arguments: str  # a JSON object as text, as OpenAI's function.arguments

    def to_openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function",
             "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


class ParsedOutput(NamedTuple):
    content: str  # text outside tool-call markers (and any call that did not parse)
    tool_calls: tuple[ToolCall, ...]


def _tool_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # already JSON text; keep it only if it is an object
        try:
            parsed = json.loads(args)
        except ValueError:
            return None
        args = parsed
    if not isinstance(args, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"], json.dumps(args))


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split model output into content and tool calls.

    A marker pair whose body is not a JSON object with a string ``name`` stays in the content
    verbatim (as does an unclosed marker, e.g. when max_tokens cut the call short): the client
    then sees what the model wrote instead of losing it.
    """
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        if start < 0:
            break
        end = text.find(TOOL_CALL_CLOSE, start + len(TOOL_CALL_OPEN))
        if end < 0:
            break
        call = _tool_call(text[start + len(TOOL_CALL_OPEN) : end].strip())
        content.append(text[pos:start])
        if call is None:
            content.append(text[start : end + len(TOOL_CALL_CLOSE)])
        else:
            calls.append(call)
        pos = end + len(TOOL_CALL_CLOSE)
    content.append(text[pos:])
    return ParsedOutput("".join(content), tuple(calls))


class ToolCallStream:
    """Streams content while holding back everything from the first tool-call marker on.

    ``feed`` returns content safe to show now; ``finish`` parses the whole output and returns
    the content not yet shown plus the tool calls.
    """

    def __init__(self):
        self._text = ""
        self._shown = 0
        self._in_call = False

    def feed(self, text: str) -> str:
        self._text += text
        if self._in_call:
            return ""
        start = self._text.find(TOOL_CALL_OPEN, self._shown)
        if start >= 0:
            self._in_call = True
            safe = start
        else:
            safe = len(self._text) - _held_suffix(self._text[self._shown :], (TOOL_CALL_OPEN,))
        out = self._text[self._shown : safe]
        self._shown = safe
        return out

    def finish(self) -> ParsedOutput:
        parsed = parse_tool_calls(self._text)
        # The parsed content starts with the shown text: nothing before the first marker is
        # ever dropped, so what remains is the part after it.
        rest = parsed.content[self._shown :]
        if parsed.tool_calls and not rest.strip():
            rest = ""
        return ParsedOutput(rest, parsed.tool_calls)
