"""OpenAI chat chunks -> the Anthropic Messages event stream, in the official order:

message_start, ping, then per content block content_block_start / content_block_delta... /
content_block_stop (indexes 0, 1, ... in order; one block per tool call), message_delta
(stop_reason, stop_sequence, cumulative usage), message_stop.

Tool-call argument fragments are sent as input_json_delta as they arrive, unchanged; unlike
:func:`irminsul.proxy.anthropic.chat_to_message`, a stream cannot take back arguments that
turn out not to be JSON, so such text reaches the client as the model wrote it.
"""

from __future__ import annotations

import logging

from irminsul.proxy.anthropic import anthropic_usage, counts_usage, stop_fields
from irminsul.proxy.errors import anthropic_error_body
from irminsul.proxy.translation import (
    Event,
    Piece,
    PieceStream,
    ReasoningPiece,
    TextPiece,
    TokenCounts,
    ToolArgs,
    ToolStart,
    new_id,
)

log = logging.getLogger(__name__)


def error_event(status: int, message: str) -> Event:
    """The `error` event Anthropic sends when a stream fails after it started."""
    return "error", anthropic_error_body(status, message)


class MessageStream(PieceStream):
    """Stateful translator for one streamed response. Call :meth:`feed` per upstream chunk and
    :meth:`finish` once at the end; both return the events to send, in order.

    ``input_tokens``/``cached_tokens`` go into message_start when the caller already knows
    them; otherwise message_start says 0 and message_delta carries the final counts, which
    the Anthropic SDKs take as cumulative totals.
    """

    def __init__(self, *, model: str, stop_sequences=(), input_tokens: int | None = None,
                 cached_tokens: int = 0, message_id: str | None = None, ping: bool = True):
        super().__init__()
        self.model = model
        self.message_id = message_id or new_id("msg_")
        self.stop_sequences = tuple(stop_sequences or ())
        self.input_tokens = input_tokens
        self.cached_tokens = cached_tokens
        self.ping = ping
        self._next_index = 0
        self._open: tuple[str, int | None] | None = None  # (kind, upstream tool index)
        self._tool_blocks: dict[int, int] = {}  # upstream tool index -> block index

    def start(self) -> list[Event]:
        """message_start (and a ping), once; later calls return []."""
        if self.started:
            return []
        self.started = True
        usage = anthropic_usage(self.input_tokens or 0, 0, self.cached_tokens)
        message = {"id": self.message_id, "type": "message", "role": "assistant",
                   "model": self.model, "content": [], "stop_reason": None,
                   "stop_sequence": None, "usage": usage}
        events: list[Event] = [("message_start", {"type": "message_start", "message": message})]
        if self.ping:
            events.append(("ping", {"type": "ping"}))
        return events

    def finish(self, counts: TokenCounts | None = None) -> list[Event]:
        """Closes the open block, then message_delta and message_stop. ``counts`` overrides the
        usage the upstream sent (the proxy decides what counts as cached)."""
        if self.finished:
            return []
        events = self._drain()
        counts = counts or self.decoder.counts
        if counts is None:
            counts = TokenCounts(self.input_tokens or 0, 0, self.cached_tokens)
        reason, sequence = stop_fields(self.decoder.finish_reason, self.decoder.matched_stop,
                                       self.stop_sequences, bool(self._tool_blocks))
        usage = counts_usage(counts)
        events.append(("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": usage,
        }))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def fail(self, status: int, message: str) -> list[Event]:
        """An `error` event ending the stream after an upstream failure."""
        self.finished = True
        return [error_event(status, message)]

    # -- blocks ----------------------------------------------------------------------------

    def _piece(self, piece: Piece) -> list[Event]:
        if isinstance(piece, TextPiece):
            return self._ensure("text", None) + [self._delta({"type": "text_delta",
                                                                "text": piece.text})]
        if isinstance(piece, ReasoningPiece):
            return self._ensure("thinking", None) + [self._delta({"type": "thinking_delta",
                                                                    "thinking": piece.text})]
        if isinstance(piece, ToolStart):
            events = self._close()
            self._tool_blocks[piece.index] = self._next_index
            block = {"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}}
            return events + self._open_block("tool", piece.index, block)
        assert isinstance(piece, ToolArgs)
        if self._open != ("tool", piece.index):
            self.dropped_fragments += 1
            log.warning("dropped an argument fragment of closed tool call %d", piece.index)
            return []
        return [self._delta({"type": "input_json_delta", "partial_json": piece.text})]

    def _ensure(self, kind: str, key: int | None) -> list[Event]:
        if self._open == (kind, key):
            return []
        block = ({"type": "text", "text": ""} if kind == "text"
                 else {"type": "thinking", "thinking": "", "signature": ""})
        return self._close() + self._open_block(kind, key, block)

    def _open_block(self, kind: str, key: int | None, block: dict) -> list[Event]:
        self._open = (kind, key)
        index = self._next_index
        self._next_index += 1
        return [("content_block_start", {"type": "content_block_start", "index": index,
                                         "content_block": block})]

    def _delta(self, delta: dict) -> Event:
        return "content_block_delta", {"type": "content_block_delta",
                                       "index": self._next_index - 1, "delta": delta}

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop",
                                        "index": self._next_index - 1})]
