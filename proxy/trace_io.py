"""Reading traces back: generated traces, the proxy's ``--record`` files, and bare chat bodies.

Three line shapes are accepted, mixed freely in one file:

1. a trace line (proxy/traces.py): ``{"session", "turn", "family", "api", "endpoint", "body"}``;
2. a recorded request (proxy/recorder.py): ``{"type": "request", "endpoint", "session",
   "body", ...}``; lines of any other ``type`` are skipped;
3. a bare OpenAI chat body ``{"model", "messages", ...}``, sent to /v1/chat/completions.

Requests to endpoints replay cannot send (``/v1/responses``, ...) are skipped and counted.

Lines without a session get the proxy's own session key (proxy/identity.session_key), so a
recording replays with the sessions the proxy saw. Turns are numbered per session, in file
order, where a line does not give one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from irminsul.proxy.identity import session_key
from irminsul.proxy.traces import TraceRequest

# endpoint -> the API shape its stream is read in
ENDPOINT_APIS = {
    "/v1/chat/completions": "openai",
    "/v1/messages": "anthropic",
    "/v1/completions": "completions",
    "/generate": "generate",
}


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and the line."""


class _Unsupported(NamedTuple):
    endpoint: str


class TraceFile(NamedTuple):
    requests: list[TraceRequest]
    skipped: tuple[str, ...]  # "line N: endpoint E" for requests to endpoints replay cannot send


def _request(obj: Mapping, where: str) -> TraceRequest | _Unsupported | None:
    if "body" not in obj:
        if not isinstance(obj.get("messages"), list):
            raise TraceError(f"{where}: neither a trace line (with 'body') nor an OpenAI chat "
                             "body (with a 'messages' list)")
        obj = {"endpoint": "/v1/chat/completions", "body": obj}
    elif obj.get("type", "request") != "request":
        return None
    body = obj["body"]
    if not isinstance(body, dict):
        raise TraceError(f"{where}: 'body' must be a JSON object")
    endpoint = obj.get("endpoint", "/v1/chat/completions")
    if not isinstance(endpoint, str) or not endpoint.startswith("/"):
        raise TraceError(f"{where}: 'endpoint' must be a path such as /v1/chat/completions")
    if endpoint not in ENDPOINT_APIS:
        return _Unsupported(endpoint)
    session = obj.get("session")
    if session is None:
        session = session_key({}, body)
    if not isinstance(session, str) or not session:
        raise TraceError(f"{where}: 'session' must be a non-empty string")
    turn = obj.get("turn")
    if turn is not None and (isinstance(turn, bool) or not isinstance(turn, int) or turn < 0):
        raise TraceError(f"{where}: 'turn' must be a non-negative integer")
    family = obj.get("family")
    if family is not None and not isinstance(family, str):
        raise TraceError(f"{where}: 'family' must be a string")
    return TraceRequest(session, turn, family, ENDPOINT_APIS[endpoint], endpoint, body)


def load_trace(path: str | Path, *, limit: int | None = None) -> list[TraceRequest]:
    """read_trace(path, limit=limit).requests."""
    return read_trace(path, limit=limit).requests


def read_trace(path: str | Path, *, limit: int | None = None) -> TraceFile:
    """The requests of a trace file, in file order (the first ``limit`` ones), and the lines
    skipped because replay cannot send to their endpoint (e.g. /v1/responses).

    Raises TraceError naming the file and line for a missing file, a line that is not JSON
    or not one of the accepted shapes, and for a file without any request.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    out: list[TraceRequest] = []
    skipped: list[str] = []
    turns: dict[str, int] = {}
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, 1):
                if limit is not None and len(out) >= limit:
                    break
                if not line.strip():
                    continue
                where = f"{path}: line {number}"
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise TraceError(f"{where}: not valid JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise TraceError(f"{where}: expected a JSON object")
                req = _request(obj, where)
                if isinstance(req, _Unsupported):
                    skipped.append(f"line {number}: endpoint {req.endpoint}")
                    continue
                if req is None:
                    continue
                if req.turn is None:
                    req = req._replace(turn=turns.get(req.session, 0))
                turns[req.session] = req.turn + 1
                out.append(req)
        except UnicodeDecodeError as e:
            raise TraceError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not out:
        raise TraceError(f"{path}: no requests replay can send in the file"
                         + (f" ({len(skipped)} to other endpoints)" if skipped else ""))
    return TraceFile(out, tuple(skipped))


def by_session(requests: list[TraceRequest]) -> list[list[TraceRequest]]:
    """Requests grouped by session (sessions in order of first appearance, turns in order)."""
    groups: dict[str, list[TraceRequest]] = {}
    for r in requests:
        groups.setdefault(r.session, []).append(r)
    return list(groups.values())
