"""Configuration of the proxy: one frozen dataclass, every value checked on construction.

The CLI (proxy/command.py) maps its options one to one onto these fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from irminsul.chunking.config import ChunkerConfig
from irminsul.proxy.identity import DEFAULT_TENANT_SALT

REORDER_MODES = ("off", "stable-first")
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # a 200K-token conversation is ~1 MB of JSON; images more
DEFAULT_UPSTREAM_TIMEOUT_S = 600.0  # a cold 128K-token prefill on one GPU can take minutes


def normalize_upstream(url: str) -> str:
    """``localhost:30000`` -> ``http://localhost:30000``; no trailing slash. ValueError if bad."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"upstream must be an http(s) URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"upstream has no host: {url!r}")
    try:
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError as e:
        raise ValueError(f"upstream has a bad port: {url!r}") from e
    if parts.query or parts.fragment:
        raise ValueError(f"upstream must not carry a query or fragment: {url!r}")
    return text.rstrip("/")


@dataclass(frozen=True)
class ProxyConfig:
    """Everything the proxy needs to run. ``upstream=None`` means an embedded engine supplies
    the URL at start (see ``create_app(upstream_ctx=...)``)."""

    upstream: str | None = None
    host: str = "127.0.0.1"  # loopback: the proxy relays API keys, so never public by default
    port: int = 8080
    model_dir: str | None = None  # fingerprint, config.json (FLOPs) and default tokenizer
    tokenizer: str | None = None  # a dir with tokenizer.json + tokenizer_config.json
    db: str | None = "irminsul.db"  # None: log no rows
    isolate_tenants: bool = False  # chunk keys namespaced by the hashed API key
    reorder: str = "off"  # "stable-first": move volatile system-prompt lines last (stock only)
    record: str | None = None  # append every request body to this JSONL file
    log_prompts: bool = False  # store the rendered prompt text in each row
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger bodies get 413
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT_S  # silence longer than this: 504
    normalize_claude_attribution: bool = False  # drop Claude Code's per-request billing line
    tenant_salt: str = DEFAULT_TENANT_SALT
    probe_timeout: float = 10.0  # per start-up probe request
    seen_chunk_tokens: int = 8_000_000  # tokens of chunks remembered for potential reuse (32 MB)
    chunker: ChunkerConfig = field(default_factory=ChunkerConfig)  # stock mode; irminsul: engine's
    audit_rate: float = 0.0  # embedded engine only: share of reusing requests re-run with full
    approx_trie: bool = True  # embedded engine only: EngineConfig.approx_trie
    # stock SGLang with the irminsul backend: at most this many prefill-only requests sent
    # ahead of a request, each ending where a run of seen chunks of at least
    # prewarm_min_tokens follows unseen tokens (proxy/prewarm.py); 0: none
    prewarm: int = 0
    prewarm_min_tokens: int = 256
    prewarm_k: int = 0  # tokens of each run the pre-warm computes too (pic's carve-out)
    # stock SGLang with the irminsul backend: /generate requests carry the chunk annotation
    # (anchors, tenant namespace) in SGLang's kv_hints envelope
    kv_hints: bool = False

    def __post_init__(self):
        if self.upstream is not None:
            object.__setattr__(self, "upstream", normalize_upstream(self.upstream))
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        if not self.host:
            raise ValueError("host must not be empty")
        if self.reorder not in REORDER_MODES:
            raise ValueError(f"reorder must be one of {REORDER_MODES}, got {self.reorder!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be an int >= 1024, got {self.max_body_bytes!r}")
        for name in ("upstream_timeout", "probe_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if not isinstance(self.seen_chunk_tokens, int) or self.seen_chunk_tokens < 0:
            raise ValueError(f"seen_chunk_tokens must be an int >= 0, got {self.seen_chunk_tokens}")
        if not self.tenant_salt:
            raise ValueError("tenant_salt must not be empty")
        r = self.audit_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ValueError(f"audit_rate must be a number in [0, 1], got {r!r}")
        for name, low in (("prewarm", 0), ("prewarm_min_tokens", 1), ("prewarm_k", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if not isinstance(self.kv_hints, bool):
            raise TypeError(f"kv_hints must be a bool, got {self.kv_hints!r}")
        if not isinstance(self.approx_trie, bool):
            raise TypeError(f"approx_trie must be a bool, got {self.approx_trie!r}")
        if not isinstance(self.chunker, ChunkerConfig):
            raise TypeError("chunker must be a ChunkerConfig")
        for name in ("db", "record", "model_dir", "tokenizer"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must be a path or None, not empty")

    @property
    def tokenizer_dir(self) -> str | None:
        """Where the tokenizer is read from: --tokenizer, else --model-dir."""
        return self.tokenizer or self.model_dir
