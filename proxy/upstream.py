"""The upstream engine: one aiohttp ClientSession for the app's lifetime, and what the engine is.

At start the proxy probes the upstream once (all probes concurrently):

- ``GET /irminsul/capabilities`` answered with this wire version: ``irminsul`` mode (annotate
  requests, read ReuseCounts); anything else: ``stock`` mode (forward unchanged, read SGLang's
  exact-prefix ``cached_tokens``).
- ``POST /v1/messages`` and ``POST /v1/responses`` with an empty object: a 404/405 means the
  engine lacks that API and the proxy translates it to /v1/chat/completions; any other answer
  (400 for the empty body, normally) means the engine serves it.
- ``GET /v1/models``: the model name for rows whose request names none.

An upstream that cannot be reached at start is assumed stock with no Anthropic/Responses API;
the probe is retried with the next request (at most every RETRY_PROBE_S) until it answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from irminsul.chunking.config import ChunkerConfig
from irminsul.engine_adapter.contract import CAPABILITY_PATH, WIRE_VERSION
from irminsul.proxy.config import ProxyConfig, normalize_upstream

log = logging.getLogger(__name__)

RETRY_PROBE_S = 5.0
CONNECTOR_LIMIT = 1000  # concurrent upstream connections; agents hold one per open stream


@dataclass(frozen=True)
class UpstreamInfo:
    """What the probe found. ``reachable=False``: nothing answered; the rest are assumptions."""

    mode: str = "stock"  # "stock" | "irminsul"
    reachable: bool = False
    engine: str | None = None  # capabilities' "engine" ("embedded", "sglang", ...)
    model: str | None = None
    model_fingerprint: str = ""
    chunker: ChunkerConfig | None = None  # the engine's, in irminsul mode
    policies: tuple[str, ...] = ()
    has_messages: bool = False
    has_responses: bool = False
    capabilities: dict = field(default_factory=dict)

    @property
    def row_mode(self) -> str:
        """upstream_mode as the savings log stores it."""
        if self.mode == "irminsul" and self.engine == "embedded":
            return "embedded"
        return self.mode

    def describe(self) -> str:
        if not self.reachable:
            return "unreachable (assuming stock until it answers)"
        apis = ["chat", "completions", "generate"]
        apis += ["messages"] if self.has_messages else ["messages (translated)"]
        apis += ["responses"] if self.has_responses else ["responses (translated)"]
        what = f"{self.mode} mode"
        if self.mode == "irminsul":
            what += f" (engine {self.engine}, wire v{WIRE_VERSION}, policies {self.policies})"
        return f"{what}, model {self.model or '?'}, APIs: {', '.join(apis)}"


class Upstream:
    """The engine the proxy forwards to. ``info`` is replaced (never mutated) by probes."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, config: ProxyConfig):
        self.base_url = normalize_upstream(base_url)
        self.session = session
        self.config = config
        self.info = UpstreamInfo()
        self._probed_at = float("-inf")
        self._probe_lock = asyncio.Lock()
        self.on_probe: Callable[[UpstreamInfo], None] | None = None  # called with each new info

    def url(self, path: str, query: str = "") -> str:
        return f"{self.base_url}{path}" + (f"?{query}" if query else "")

    async def ensure_probed(self) -> UpstreamInfo:
        """The current info; probes again if the last probe found nothing reachable."""
        if self.info.reachable or time.monotonic() - self._probed_at < RETRY_PROBE_S:
            return self.info
        async with self._probe_lock:
            if not self.info.reachable and time.monotonic() - self._probed_at >= RETRY_PROBE_S:
                await self.probe()
        return self.info

    async def probe(self) -> UpstreamInfo:
        """Probe the upstream (module docstring), set and log ``info``; never raises."""
        self._probed_at = time.monotonic()
        caps, messages, responses, model = await asyncio.gather(
            self._get_json(CAPABILITY_PATH),
            self._has_post("/v1/messages"),
            self._has_post("/v1/responses"),
            self._get_json("/v1/models"),
        )
        reachable = caps is not _DOWN or model is not _DOWN
        name = _first_model(model)
        info = UpstreamInfo(reachable=reachable, model=name, has_messages=messages is True,
                            has_responses=responses is True)
        cap = caps.get("irminsul") if isinstance(caps, dict) else None
        if isinstance(cap, dict) and cap.get("wire_version") == WIRE_VERSION:
            try:
                chunker = ChunkerConfig.from_json(cap.get("chunker") or {})
            except (TypeError, ValueError) as e:
                log.warning("upstream capabilities carry a bad chunker config (%s); using the "
                            "proxy's own", e)
                chunker = None
            info = UpstreamInfo(
                mode="irminsul", reachable=True, engine=str(cap.get("engine") or "") or None,
                model=str(cap.get("model") or "") or name,
                model_fingerprint=str(cap.get("model_fingerprint") or ""), chunker=chunker,
                policies=tuple(str(p) for p in cap.get("policies") or ()),
                has_messages=info.has_messages, has_responses=info.has_responses,
                capabilities=cap,
            )
        elif isinstance(cap, dict):
            log.warning("upstream speaks irminsul wire version %r, this proxy %d: stock mode",
                        cap.get("wire_version"), WIRE_VERSION)
        self.info = info
        log.info("upstream %s: %s", self.base_url, info.describe())
        if self.on_probe is not None:
            self.on_probe(info)
        return info

    async def _get_json(self, path: str):
        try:
            async with self.session.get(self.url(path), timeout=self._probe_timeout()) as r:
                if r.status != 200:
                    return None
                return json.loads(await r.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return _DOWN
        except ValueError:
            return None

    async def _has_post(self, path: str):
        try:
            async with self.session.post(self.url(path), json={},
                                         timeout=self._probe_timeout()) as r:
                await r.read()
                return r.status not in (404, 405)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return _DOWN

    def _probe_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.config.probe_timeout)


_DOWN = object()  # a probe that got no HTTP answer at all


def _first_model(models) -> str | None:
    if isinstance(models, dict) and isinstance(models.get("data"), list) and models["data"]:
        first = models["data"][0]
        if isinstance(first, dict) and first.get("id"):
            return str(first["id"])
    return None


def make_session(config: ProxyConfig) -> aiohttp.ClientSession:
    """The proxy's one client session. ``sock_read`` is the --upstream-timeout: the longest the
    upstream may stay silent, before its response headers or between two stream chunks."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(30.0, config.upstream_timeout),
                                    sock_read=config.upstream_timeout)
    connector = aiohttp.TCPConnector(limit=CONNECTOR_LIMIT, limit_per_host=0)
    # The proxy relays bodies it may rewrite, so it reads them decoded; it asks for identity
    # encoding (handlers drop Accept-Encoding) and strips Content-Encoding when relaying.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                 auto_decompress=True, read_bufsize=1 << 20)


UpstreamCtx = Callable[[web.Application], AsyncIterator[str]]
UPSTREAM_KEY = web.AppKey("irminsul_upstream", Upstream)


def upstream_cleanup_ctx(config: ProxyConfig, upstream_ctx: UpstreamCtx | None = None):
    """A cleanup_ctx that opens the session, probes the upstream and stores it under
    UPSTREAM_KEY; with ``upstream_ctx`` (an async generator yielding the URL, e.g. one that
    starts an embedded engine), the engine is started first and stopped last."""
    if config.upstream is None and upstream_ctx is None:
        raise ValueError("no upstream: give ProxyConfig.upstream or an upstream_ctx")

    async def ctx(app: web.Application):
        gen = upstream_ctx(app) if upstream_ctx is not None else None
        url = config.upstream if gen is None else await gen.__anext__()
        session = make_session(config)
        try:
            up = Upstream(url, session, config)
            await up.probe()
            app[UPSTREAM_KEY] = up
            yield
        finally:
            await session.close()
            if gen is not None:
                try:
                    await gen.__anext__()
                except StopAsyncIteration:
                    pass
                else:
                    log.warning("upstream_ctx yielded more than once; it was not run to the end")

    return ctx
