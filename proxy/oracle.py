"""Offline analysis of a trace: how much of each prompt a cache could recover, and by what.

For every request, in trace order, over the token IDs the model's chat template produces:

* ``exact_prefix``: the longest common prefix with any earlier request of the same session
  (``prefix_scope="session"``) or of the whole trace (``"global"``, what a radix cache shared
  by all sessions finds). Everything below is counted *beyond* this prefix: recovery above
  what an exact-prefix cache already gets.
* ``content``: tokens in our content-defined chunks whose key was seen in an earlier request
  (and whose token IDs compare equal to the stored ones).
* ``fixed``: the LMCache-style baseline: the prompt cut into fixed ``fixed_block``-token
  blocks from its start, a block hits if the same token IDs were seen as a block before, at
  whatever offset.
* ``oracle``: every token inside a run of at least ``oracle_min_tokens`` tokens that occurred
  in an earlier request, wherever; no carve-outs. A bound for any chunking that does not
  reuse pieces shorter than that (a CDC chunk shorter than it, at the end of an anchor
  segment, can hit outside the oracle: its share of the oracle may then pass 100% slightly).
  Runs are found by 64-bit hashes of every window (collisions ~2**-64, IDs not compared).
* ``*_net``: content or fixed minus carve-outs: the first ``carve_tokens`` tokens of every
  reused chunk are recomputed (the engine's PIC policy does this to repair attention).

Shares are token-weighted over the requests: of the prompt, of the prefix cache's misses
(prompt minus exact prefix) and of the oracle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from irminsul.chunking.cdc import as_token_array
from irminsul.chunking.keys import Chunker
from irminsul.proxy.traces import TraceRequest

SCOPES = ("session", "global")
METHODS = ("content", "content_net", "content_run_net", "fixed", "fixed_net", "oracle")


@dataclass(frozen=True)
class OracleConfig:
    prefix_scope: str = "session"
    fixed_block: int = 256  # LMCache's default chunk size
    oracle_min_tokens: int = 16
    carve_tokens: int = 16  # the embedded engine's default pic_k

    def __post_init__(self):
        if self.prefix_scope not in SCOPES:
            raise ValueError(f"prefix_scope must be one of {SCOPES}, got {self.prefix_scope!r}")
        if self.fixed_block < 1 or self.oracle_min_tokens < 1:
            raise ValueError("fixed_block and oracle_min_tokens must be >= 1")
        if self.carve_tokens < 0:
            raise ValueError(f"carve_tokens must be >= 0, got {self.carve_tokens}")


class Item(NamedTuple):
    """One prompt to analyse, already tokenized."""

    session: str
    turn: int | None
    family: str | None
    ids: np.ndarray
    anchors: tuple[int, ...] = ()


class Recovery(NamedTuple):
    """One request. Every count but prompt and exact prefix lies beyond the exact prefix."""

    session: str
    turn: int | None
    family: str | None
    prompt_tokens: int
    exact_prefix_tokens: int
    chunks_total: int
    chunks_hit: int
    content: int
    content_net: int
    content_run_net: int
    fixed: int
    fixed_net: int
    oracle: int


class Detail(NamedTuple):
    """One analysed request token by token, for proxy/oracle_causes.py."""

    ids: np.ndarray
    exact: int  # exact-prefix tokens
    refs: tuple  # ChunkRefs
    hits: tuple[bool, ...]  # per chunk: key and token IDs seen in an earlier request
    stored_prev: tuple[str | None, ...]  # per hit chunk: key stored before it (engine's prev_key)
    covered: np.ndarray  # bool per token: inside a run of >= oracle_min_tokens seen before


class Shares(NamedTuple):
    of_prompt: float
    of_misses: float  # of prompt - exact prefix: what the prefix cache computes
    of_oracle: float


class Summary(NamedTuple):
    requests: int
    prompt_tokens: int
    exact_prefix_tokens: int
    chunks_total: int
    chunks_hit: int
    content: int
    content_net: int
    content_run_net: int
    fixed: int
    fixed_net: int
    oracle: int

    @property
    def misses(self) -> int:
        return self.prompt_tokens - self.exact_prefix_tokens

    def shares(self, method: str) -> Shares:
        """Recovery above the exact prefix by ``method`` (one of METHODS) as three shares."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        got = getattr(self, method)

        def ratio(a: int, b: int) -> float:
            return a / b if b else 0.0

        return Shares(ratio(got, self.prompt_tokens), ratio(got, self.misses),
                      ratio(got, self.oracle))


def summarize(rows: Iterable[Recovery]) -> Summary:
    """Token-weighted totals of ``rows``."""
    names = Summary._fields[1:]
    totals = dict.fromkeys(names, 0)
    n = 0
    for r in rows:
        n += 1
        for k in names:
            totals[k] += getattr(r, k)
    return Summary(n, **totals)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class _HashSet:
    """A growing set of uint64 hashes: sorted numpy runs, merged when there are too many."""

    def __init__(self):
        self.runs: list[np.ndarray] = []

    def contains(self, h: np.ndarray) -> np.ndarray:
        out = np.zeros(len(h), dtype=bool)
        for run in self.runs:
            idx = np.minimum(np.searchsorted(run, h), len(run) - 1)
            out |= run[idx] == h
        return out

    def add(self, h: np.ndarray) -> None:
        self.runs.append(np.unique(h))
        if len(self.runs) > 8:
            self.runs = [np.unique(np.concatenate(self.runs))]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(ids: np.ndarray) -> np.ndarray:
    """splitmix64 of every token ID: well-spread 64-bit values to combine linearly."""
    x = ids.astype(np.uint64) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def gram_hashes(ids: np.ndarray, m: int) -> np.ndarray:
    """A 64-bit hash of every window of ``m`` tokens (len(ids) - m + 1 of them).

    Sum of the mixed tokens times fixed odd multipliers, mod 2**64: two different windows
    collide with probability about 2**-64, negligible for an upper bound (no IDs compared).
    """
    if len(ids) < m:
        return np.zeros(0, dtype=np.uint64)
    mult = _mix(np.arange(1, m + 1, dtype=np.int64)) | np.uint64(1)
    windows = np.lib.stride_tricks.sliding_window_view(_mix(ids), m)
    return (windows * mult).sum(axis=1, dtype=np.uint64)


def _cover(n: int, starts: np.ndarray, m: int) -> np.ndarray:
    d = np.zeros(n + 1, dtype=np.int32)
    np.add.at(d, starts, 1)
    np.add.at(d, np.minimum(starts + m, n), -1)
    return np.cumsum(d[:n]) > 0


class Analyzer:
    """Feeds requests in trace order and keeps what earlier requests left behind."""

    def __init__(self, chunker: Chunker, config: OracleConfig = OracleConfig()):
        self.chunker, self.config = chunker, config
        self.history: dict[str, list[np.ndarray]] = {}
        self.chunks: dict[str, bytes] = {}  # chunk key -> token bytes (compared on a hit)
        self.sources: dict[str, tuple[int, int]] = {}  # key -> (request, chunk) first stored
        self.prev_keys: dict[str, str | None] = {}  # key -> key of the chunk before it, stored
        self.last: Detail | None = None  # the latest request, token by token (oracle_causes)
        self.requests = 0
        self.blocks: set[bytes] = set()
        self.grams = _HashSet()

    def _exact(self, session: str, ids: np.ndarray) -> int:
        if self.config.prefix_scope == "session":
            earlier = self.history.get(session, [])
        else:
            earlier = [a for seqs in self.history.values() for a in seqs]
        return max((common_prefix(a, ids) for a in earlier), default=0)

    def add(self, item: Item) -> Recovery:
        """The request's recovery; then remember its prefix, chunks, blocks and windows."""
        cfg, ids = self.config, as_token_array(item.ids)
        n = len(ids)
        exact = self._exact(item.session, ids)
        data = ids.tobytes()
        content = content_net = run_net = hit = 0
        refs = self.chunker.split(ids, anchors=item.anchors)
        prev_source = None
        hits: list[bool] = []
        for c in refs:
            part = data[4 * c.start : 4 * c.end]
            source = None
            hits.append(self.chunks.get(c.key) == part)
            if hits[-1]:
                hit += 1
                source = self.sources[c.key]
                beyond = c.end - max(c.start, exact)
                if beyond > 0:
                    content += beyond
                    content_net += max(0, beyond - cfg.carve_tokens)
                    follows = prev_source == (source[0], source[1] - 1) and c.start >= exact
                    run_net += beyond if follows else max(0, beyond - cfg.carve_tokens)
            prev_source = source
        fixed = fixed_net = 0
        b = cfg.fixed_block
        blocks = [data[4 * s : 4 * min(s + b, n)] for s in range(0, n, b)]
        for k, block in enumerate(blocks):
            beyond = min((k + 1) * b, n) - max(k * b, exact)
            if block in self.blocks and beyond > 0:
                fixed += beyond
                fixed_net += max(0, beyond - cfg.carve_tokens)
        m = cfg.oracle_min_tokens
        grams = gram_hashes(ids, m)
        covered = _cover(n, np.flatnonzero(self.grams.contains(grams)), m)
        oracle = int(covered[exact:].sum())
        self.last = Detail(ids, exact, refs, tuple(hits),
                           tuple(self.prev_keys.get(c.key) if h else None
                                 for c, h in zip(refs, hits)), covered)
        # remember this request only now: reuse comes from earlier requests
        self.history.setdefault(item.session, []).append(ids)
        for k, c in enumerate(refs):
            if c.key not in self.chunks:
                self.chunks[c.key] = data[4 * c.start : 4 * c.end]
                self.sources[c.key] = (self.requests, k)
                self.prev_keys[c.key] = refs[k - 1].key if k else None
        self.requests += 1
        self.blocks.update(blocks)
        if len(grams):
            self.grams.add(grams)
        return Recovery(item.session, item.turn, item.family, n, exact, len(refs), hit, content,
                        content_net, run_net, fixed, fixed_net, oracle)


def analyze(items: Iterable[Item], chunker: Chunker,
            config: OracleConfig = OracleConfig()) -> list[Recovery]:
    """Recovery of every item, in order (each one sees only the items before it)."""
    analyzer = Analyzer(chunker, config)
    return [analyzer.add(it) for it in items]


def tokenize_request(req: TraceRequest, tokenizer):
    """The Prompt (ids, anchors) the model sees for a trace request, rendered as the proxy
    renders it: Anthropic bodies are translated to OpenAI chat first."""
    body = req.body
    if req.api == "anthropic":
        from irminsul.proxy.anthropic import messages_to_chat

        body = messages_to_chat(body).body
    if req.api in ("openai", "anthropic"):
        kwargs = body.get("chat_template_kwargs") or {}
        return tokenizer.encode_chat(body["messages"], tools=body.get("tools"), **kwargs)
    if req.api == "generate" and body.get("input_ids") is not None:
        ids = np.asarray(body["input_ids"], dtype=np.int32)
        return _Prompt(ids, ())
    text = body.get("prompt", body.get("text", ""))
    return tokenizer.encode_prompt(text if isinstance(text, str) else str(text))


class _Prompt(NamedTuple):
    ids: np.ndarray
    anchors: tuple[int, ...]


def trace_items(requests: Sequence[TraceRequest], tokenizer) -> list[Item]:
    """Items of a trace's requests, tokenized with ``tokenizer`` (a ModelTokenizer)."""
    out = []
    for r in requests:
        p = tokenize_request(r, tokenizer)
        out.append(Item(r.session, r.turn, r.family, p.ids, tuple(p.anchors)))
    return out
