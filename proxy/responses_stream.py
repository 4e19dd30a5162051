"""OpenAI chat chunks -> the Responses API event stream, as the API emits it:

response.created, response.in_progress; per output item response.output_item.added, then for
a message response.content_part.added / response.output_text.delta... /
response.output_text.done / response.content_part.done, for a function call
response.function_call_arguments.delta... / .done, for reasoning text
response.reasoning_text.delta... / .done, and response.output_item.done; finally
response.completed (response.incomplete when the token limit cut the answer). Every event
carries `type` and a `sequence_number` counting from 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from irminsul.proxy.responses import (
    counts_usage,
    function_call_item,
    message_item,
    output_text,
    reasoning_item,
    response_object,
    status_of,
)
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


class _Item:
    """The output item being streamed."""

    def __init__(self, kind: str, index: int, item_id: str, tool: int | None = None,
                 call_id: str = "", name: str = ""):
        self.kind, self.index, self.id = kind, index, item_id
        self.tool, self.call_id, self.name = tool, call_id, name
        self.text = ""


class ResponsesStream(PieceStream):
    """Stateful translator for one streamed response. :meth:`feed` per upstream chunk,
    :meth:`finish` once; both return the events to send, in order. ``request`` is the original
    Responses request body, echoed in the response objects."""

    def __init__(self, *, request: Mapping, model: str | None = None,
                 response_id: str | None = None, created_at: float | None = None):
        super().__init__()
        self.request = request
        self.model = model or str(request.get("model") or "")
        self.response_id = response_id or new_id("resp_")
        self.created_at = int(created_at if created_at is not None else time.time())
        self._seq = 0
        self._output: list[dict] = []
        self._open: _Item | None = None

    def start(self) -> list[Event]:
        """response.created and response.in_progress, once; later calls return []."""
        if self.started:
            return []
        self.started = True
        return [self._event("response.created", response=self._response("in_progress")),
                self._event("response.in_progress", response=self._response("in_progress"))]

    def finish(self, counts: TokenCounts | None = None) -> list[Event]:
        """Closes the open item, then response.completed (or response.incomplete). ``counts``
        overrides the usage the upstream sent."""
        if self.finished:
            return []
        events = self._drain()
        status, details = status_of(self.decoder.finish_reason)
        usage = counts_usage(counts or self.decoder.counts)
        name = "response.completed" if status == "completed" else "response.incomplete"
        return events + [self._event(name, response=self._response(
            status, usage=usage, incomplete_details=details))]

    def fail(self, message: str, code: str = "server_error") -> list[Event]:
        """response.failed after an upstream failure; the items finished so far are kept."""
        self.finished = True
        events = self.start()
        error = {"code": code, "message": message}
        return events + [self._event("response.failed",
                                     response=self._response("failed", error=error))]

    # -- items -----------------------------------------------------------------------------

    def _piece(self, piece: Piece) -> list[Event]:
        if isinstance(piece, TextPiece):
            events = self._ensure("message")
            item = self._open
            item.text += piece.text
            return events + [self._event("response.output_text.delta", item_id=item.id,
                                         output_index=item.index, content_index=0,
                                         delta=piece.text, logprobs=[])]
        if isinstance(piece, ReasoningPiece):
            events = self._ensure("reasoning")
            item = self._open
            item.text += piece.text
            return events + [self._event("response.reasoning_text.delta", item_id=item.id,
                                         output_index=item.index, content_index=0,
                                         delta=piece.text)]
        if isinstance(piece, ToolStart):
            events = self._close()
            item = _Item("function_call", len(self._output), new_id("fc_"), piece.index,
                         piece.id, piece.name)
            self._open = item
            added = function_call_item(item.id, item.call_id, item.name, "", "in_progress")
            return events + [self._event("response.output_item.added",
                                         output_index=item.index, item=added)]
        assert isinstance(piece, ToolArgs)
        item = self._open
        if item is None or item.kind != "function_call" or item.tool != piece.index:
            self.dropped_fragments += 1
            log.warning("dropped an argument fragment of closed tool call %d", piece.index)
            return []
        item.text += piece.text
        return [self._event("response.function_call_arguments.delta", item_id=item.id,
                            output_index=item.index, delta=piece.text)]

    def _ensure(self, kind: str) -> list[Event]:
        if self._open is not None and self._open.kind == kind:
            return []
        events = self._close()
        prefix = "msg_" if kind == "message" else "rs_"
        item = self._open = _Item(kind, len(self._output), new_id(prefix))
        if kind == "message":
            return events + [
                self._event("response.output_item.added", output_index=item.index,
                            item=message_item(item.id, "", "in_progress")),
                self._event("response.content_part.added", item_id=item.id,
                            output_index=item.index, content_index=0, part=output_text("")),
            ]
        part = {"type": "reasoning_text", "text": ""}
        return events + [
            self._event("response.output_item.added", output_index=item.index,
                        item=reasoning_item(item.id, "")),
            self._event("response.content_part.added", item_id=item.id,
                        output_index=item.index, content_index=0, part=part),
        ]

    def _close(self) -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        where = {"item_id": item.id, "output_index": item.index}
        if item.kind == "message":
            done = message_item(item.id, item.text)
            events = [
                self._event("response.output_text.done", **where, content_index=0,
                            text=item.text, logprobs=[]),
                self._event("response.content_part.done", **where, content_index=0,
                            part=output_text(item.text)),
            ]
        elif item.kind == "reasoning":
            done = reasoning_item(item.id, item.text)
            events = [
                self._event("response.reasoning_text.done", **where, content_index=0,
                            text=item.text),
                self._event("response.content_part.done", **where, content_index=0,
                            part={"type": "reasoning_text", "text": item.text}),
            ]
        else:
            done = function_call_item(item.id, item.call_id, item.name, item.text)
            events = [self._event("response.function_call_arguments.done", **where,
                                  arguments=item.text)]
        self._output.append(done)
        return events + [self._event("response.output_item.done", output_index=item.index,
                                     item=done)]

    def _response(self, status: str, **extra) -> dict:
        return response_object(self.request, response_id=self.response_id, model=self.model,
                               created_at=self.created_at, status=status,
                               output=list(self._output), **extra)

    def _event(self, name: str, **fields) -> Event:
        data = {"type": name, "sequence_number": self._seq, **fields}
        self._seq += 1
        return name, data
