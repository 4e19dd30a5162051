"""``irminsul replay``: send a trace to an endpoint and log what each request cost.

Sessions run concurrently (at most ``concurrency`` at once); the requests of one session go
in order, each after the previous one's answer, as an agent sends them. Every request is
streamed; its time to first token, total time and the token counts the server reports are
written to the savings database as a ``source='replay'`` row tagged with the run name. A
request that fails is logged with its status and error, and the replay goes on.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import aiohttp
import click

from irminsul.engine_adapter.contract import CAPABILITY_PATH
from irminsul.proxy.config import normalize_upstream
from irminsul.proxy.errors import upstream_error_message
from irminsul.proxy.replay_stream import StreamResult, read_stream, read_whole
from irminsul.proxy.savings import RequestRow, SavingsLog, SavingsWriter, counts_fields
from irminsul.proxy.trace_io import TraceError, by_session, read_trace
from irminsul.proxy.traces import TraceRequest

ERROR_BODY_CHARS = 2000  # how much of an error answer is read for its message
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass(frozen=True)
class ReplayConfig:
    base_url: str
    run: str
    concurrency: int = 4
    max_tokens: int | None = None  # overrides the requests' own limit
    model: str | None = None  # overrides the requests' model field
    timeout_s: float = 600.0  # per request, connection to last byte
    api_key: str | None = None  # sent as Authorization: Bearer and x-api-key

    def __post_init__(self):
        object.__setattr__(self, "base_url", normalize_upstream(self.base_url))
        if not self.run:
            raise ValueError("run must be a non-empty name")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


class ReplaySummary(NamedTuple):
    requests: int
    failed: int
    upstream_mode: str  # stock | irminsul | embedded, from the capability probe
    seconds: float


def request_body(req: TraceRequest, config: ReplayConfig) -> dict:
    """The body as sent: streaming on (with usage in OpenAI streams), overrides applied."""
    body = dict(req.body)
    body["stream"] = True
    if req.api in ("openai", "completions"):
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    if config.model is not None:
        body["model"] = config.model
    if config.max_tokens is not None:
        if req.api == "generate":
            body["sampling_params"] = {**(body.get("sampling_params") or {}),
                                       "max_new_tokens": config.max_tokens}
        else:
            body.pop("max_completion_tokens", None)
            body["max_tokens"] = config.max_tokens
    return body


async def probe_mode(http: aiohttp.ClientSession, base_url: str) -> str:
    """``irminsul``/``embedded`` if the endpoint answers the capability probe, else ``stock``."""
    try:
        async with http.get(base_url + CAPABILITY_PATH, timeout=PROBE_TIMEOUT) as resp:
            if resp.status != 200:
                return "stock"
            caps = (await resp.json(content_type=None)).get("irminsul") or {}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
        return "stock"
    return "embedded" if caps.get("engine") == "embedded" else "irminsul"


def _headers(req: TraceRequest, config: ReplayConfig) -> dict[str, str]:
    headers = {"x-session-id": req.session}
    if req.api == "anthropic":
        headers["anthropic-version"] = "2023-06-01"
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
        headers["x-api-key"] = config.api_key
    return headers


def _row(req: TraceRequest, body: dict, mode: str, config: ReplayConfig, status: int | None,
         result: StreamResult, start: float, end: float) -> RequestRow:
    u = result.usage
    counts: dict = {}
    if u is not None:
        counts = counts_fields(u.counts) if u.counts is not None else {
            "prompt_tokens": u.prompt_tokens, "exact_prefix_tokens": u.exact_prefix}
        counts["completion_tokens"] = u.completion_tokens
    ttft = None if result.first_token_at is None else (result.first_token_at - start) * 1e3
    base = {"session": req.session, "model": str(body.get("model") or ""),
            "endpoint": req.endpoint, "upstream_mode": mode, "source": "replay",
            "run": config.run, "family": req.family, "turn": req.turn, "stream": True,
            "status": status, "error": result.error, "total_ms": (end - start) * 1e3,
            "ttft_ms": ttft}
    try:
        return RequestRow(**base, **counts)
    except ValueError as e:  # counts that contradict each other: keep the timing, say why
        return RequestRow(**{**base, "error": f"inconsistent usage from the server: {e}"})


async def send(http: aiohttp.ClientSession, req: TraceRequest, config: ReplayConfig,
               mode: str) -> RequestRow:
    """Send one request, read its stream, and return its row (errors become rows too)."""
    body = request_body(req, config)
    start = time.perf_counter()
    status = None
    try:
        async with http.post(config.base_url + req.endpoint, json=body,
                             headers=_headers(req, config)) as resp:
            status = resp.status
            if status >= 400:
                text = (await resp.content.read(ERROR_BODY_CHARS)).decode("utf-8", "replace")
                result = StreamResult(None, None, upstream_error_message(status, text))
            elif "text/event-stream" in resp.headers.get("Content-Type", ""):
                result = await read_stream(resp, req.api)
            else:
                result = read_whole(await resp.json(content_type=None), req.api)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        result = StreamResult(None, None, f"{type(e).__name__}: {e}" if str(e)
                              else type(e).__name__)
    return _row(req, body, mode, config, status, result, start, time.perf_counter())


async def replay(requests: list[TraceRequest], config: ReplayConfig,
                 sink: Callable[[RequestRow], None],
                 progress: Callable[[int], None] | None = None) -> ReplaySummary:
    """Replay ``requests``; every row goes to ``sink`` as soon as its request finishes."""
    sessions = by_session(requests)
    pending = deque(sessions)  # workers take whole sessions, so a session's turns stay in order
    failed = 0
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    connector = aiohttp.TCPConnector(limit=config.concurrency + 1)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        mode = await probe_mode(http, config.base_url)

        async def worker() -> None:
            nonlocal failed
            while pending:
                for req in pending.popleft():
                    row = await send(http, req, config, mode)
                    failed += row.error is not None or (row.status or 0) >= 400
                    sink(row)
                    if progress is not None:
                        progress(1)

        await asyncio.gather(*(worker() for _ in range(min(config.concurrency, len(sessions)))))
    return ReplaySummary(len(requests), failed, mode, time.perf_counter() - started)


async def replay_to_db(requests, config: ReplayConfig, db: str | Path,
                       progress: Callable[[int], None] | None = None) -> ReplaySummary:
    """replay() writing rows to the savings database at ``db`` (created if missing)."""
    writer = SavingsWriter(db)
    try:
        return await replay(requests, config, writer.submit, progress)
    finally:
        await writer.close()


@click.command("replay")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--base-url", required=True,
              help="Endpoint to replay against, e.g. http://127.0.0.1:8080 (a proxy) or "
                   "http://127.0.0.1:30000 (an engine).")
@click.option("--run", default=None,
              help="Name tagging this replay's rows [default: TRACE's stem and the time].")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="Sessions replayed at once (each session's requests stay in order).")
@click.option("--db", default="irminsul.db", show_default=True, type=click.Path(dir_okay=False),
              help="Savings database the rows are written to (created if missing).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Replay only the first N requests of the file.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Override each request's generation limit (max_tokens).")
@click.option("--model", default=None, help="Override each request's model field.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True, help="Seconds one request may take, connect to last byte.")
@click.option("--api-key", envvar="IRMINSUL_API_KEY", default=None,
              help="API key sent as Bearer token and x-api-key [env: IRMINSUL_API_KEY].")
def replay_command(trace, base_url, run, concurrency, db, limit, max_tokens, model, timeout,
                   api_key):
    """Replay TRACE against --base-url and log every request to the savings database.

    TRACE is JSONL: lines written by `irminsul traces generate`, by the proxy's --record, or
    bare OpenAI chat bodies (one per line). Each request is streamed; its TTFT, total time and
    the prompt, cached and reused tokens the server reports land in --db as source 'replay'
    with the run name, for `irminsul report`. Failed requests are logged and the replay goes on.
    """
    try:
        requests, skipped = read_trace(trace, limit=limit)
    except TraceError as e:
        raise click.BadParameter(str(e), param_hint="TRACE") from None
    if skipped:
        click.echo(f"skipping {len(skipped)} requests to endpoints replay cannot send "
                   f"(first: {skipped[0]})", err=True)
    if run is None:
        run = f"{Path(trace).stem}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    try:
        config = ReplayConfig(base_url, run, concurrency=concurrency, max_tokens=max_tokens,
                              model=model, timeout_s=timeout, api_key=api_key)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        SavingsLog(db).close()  # a bad --db fails here, before any request is sent
    except (sqlite3.Error, OSError, ValueError) as e:
        raise click.BadParameter(f"cannot open {db}: {e}", param_hint="--db") from None
    n_sessions = len(by_session(requests))
    with click.progressbar(length=len(requests), label=f"replay {run}") as bar:
        summary = asyncio.run(replay_to_db(requests, config, db, bar.update))
    click.echo(f"{summary.requests} requests of {n_sessions} sessions in {summary.seconds:.1f} s "
               f"against a {summary.upstream_mode} endpoint; {summary.failed} failed; "
               f"rows in {db} (run {run})")
    if summary.failed == summary.requests:
        raise click.ClickException(f"every request failed; is {config.base_url} serving?")
