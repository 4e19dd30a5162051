"""Per request: tokenize -> chunk -> seen-before lookup -> divergence -> annotation.

Runs on one worker thread (``Pipeline.analyze`` is blocking; the handlers call it through
``Pipeline.submit``), so the event loop keeps relaying streams while a 100K-token prompt is
tokenized. With one worker, requests are analysed in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from irminsul.chunking.keys import Chunker
from irminsul.chunking.reuse import ReusingChunker
from irminsul.chunking.runs import cuts as prewarm_cuts
from irminsul.engine_adapter.contract import Annotation, ChunkRef, seq_hash
from irminsul.proxy.divergence import Divergence, PromptView, SessionTracker

log = logging.getLogger(__name__)


class PromptSource(NamedTuple):
    """What a request asks the model to read, in one of three forms (first one set wins)."""

    messages: list | None = None  # OpenAI chat messages (translated from other APIs)
    tools: list | None = None
    template_kwargs: dict | None = None  # chat_template_kwargs
    text: str | None = None  # a raw completion prompt
    ids: tuple[int, ...] | None = None  # token IDs given by the client
    system_sections: tuple[str, ...] = ()  # system prompt paragraphs (divergence detail)


class Analysis(NamedTuple):
    prompt_tokens: int
    chunks: tuple[ChunkRef, ...]
    hit_spans: tuple[tuple[int, int], ...]  # chunks seen before, token IDs compared equal
    divergence: Divergence
    turn: int  # 1 for a session's first request
    annotation: Annotation
    text: str | None  # the rendered prompt
    seconds: float

    def potential_reuse(self, exact_prefix: int | None) -> int:
        """Tokens of seen chunks past the exact prefix: what a content cache could add."""
        start = exact_prefix or 0
        return sum(max(0, e - max(s, start)) for s, e in self.hit_spans)


class SeenChunks:
    """Chunks seen recently (LRU, bounded in tokens), with their token IDs so that a hit is
    a real comparison, not a trust in the key."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._chunks: OrderedDict[str, np.ndarray] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def observe(self, ids: np.ndarray, chunks: tuple[ChunkRef, ...]) -> tuple[tuple[int, int], ...]:
        """Spans of ``chunks`` seen before this call; then remember all of them."""
        hits = []
        with self._lock:
            for c in chunks:
                part = ids[c.start : c.end]
                old = self._chunks.get(c.key)
                if old is not None:
                    self._chunks.move_to_end(c.key)
                    if np.array_equal(old, part):
                        hits.append((c.start, c.end))
                    continue
                if self.max_tokens <= 0:
                    continue
                self._chunks[c.key] = part.copy()
                self._tokens += len(part)
                while self._tokens > self.max_tokens and self._chunks:
                    _, gone = self._chunks.popitem(last=False)
                    self._tokens -= len(gone)
        return tuple(hits)

    def __len__(self) -> int:
        return len(self._chunks)


class Pipeline:
    """Everything the proxy computes about a prompt; holds the per-session state."""

    def __init__(self, tokenizer, chunker: Chunker, *, model_fingerprint: str = "",
                 seen_tokens: int = 8_000_000, tracker: SessionTracker | None = None,
                 max_sessions: int = 100_000):
        self.tokenizer = tokenizer
        self.chunker = chunker
        self.model_fingerprint = model_fingerprint
        self.seen = SeenChunks(seen_tokens)
        self.reuse = ReusingChunker()  # keeps the unchanged head's chunks of recent prompts
        self.tracker = tracker or SessionTracker()
        self._turns: OrderedDict[str, int] = OrderedDict()
        self._max_sessions = max_sessions
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="irminsul-pipeline")
        self.bare_seen: SeenChunks | None = None  # --prewarm: chunks cut without anchors

    def tokenize(self, source: PromptSource):
        """A Prompt (ids, anchors, message_starts, text) for ``source``."""
        tok = self.tokenizer
        if source.messages is not None:
            return tok.encode_chat(source.messages, tools=source.tools or None,
                                   **(source.template_kwargs or {}))
        if source.text is not None:
            return tok.encode_prompt(source.text)
        if source.ids is not None:
            return _RawPrompt(np.asarray(source.ids, dtype=np.int32), (), (), None)
        raise ValueError("empty PromptSource")

    def prepare(self, source: PromptSource, *, session: str, namespace: str = "") -> Prepared:
        """Tokenize and chunk: what an annotation needs. Blocking; changes nothing."""
        t0 = time.perf_counter()
        prompt = self.tokenize(source)
        ids = np.asarray(prompt.ids, dtype=np.int32)
        anchors = tuple(int(a) for a in prompt.anchors)
        chunks = self.reuse.split(self.chunker, ids, anchors=anchors, namespace=namespace,
                                  model_fingerprint=self.model_fingerprint)
        annotation = Annotation(num_tokens=len(ids), seq_hash=seq_hash(ids), chunks=chunks,
                                anchors=anchors, namespace=namespace,
                                model_fingerprint=self.model_fingerprint, session=session)
        return Prepared(prompt, ids, annotation, time.perf_counter() - t0)

    def prewarm_ends(self, prep: Prepared, *, limit: int, min_tokens: int, k: int = 0
                     ) -> tuple[int, ...]:
        """Where --prewarm requests end (proxy/prewarm.py cuts). The prompt is chunked as
        SGLang's irminsul backend chunks a chat request, over its token IDs alone (no anchors
        reach it through the OpenAI endpoints), against the chunks so cut of earlier prompts,
        so that a cut is where the backend's own next chunk is a hit. Remembers this prompt's
        chunks. Blocking."""
        if self.bare_seen is None:
            self.bare_seen = SeenChunks(self.seen.max_tokens)
        ann = prep.annotation
        chunks = self.chunker.split(prep.ids, namespace=ann.namespace,
                                    model_fingerprint=self.model_fingerprint)
        return prewarm_cuts(chunks, self.bare_seen.observe(prep.ids, chunks), limit=limit,
                            min_tokens=min_tokens, k=k)

    def complete(self, prep: Prepared, source: PromptSource, *, session: str,
                 track_seen: bool = True) -> Analysis:
        """Seen-chunk lookup, divergence and turn. Blocking. Changes: the seen-chunk set (if
        ``track_seen``), the session's previous prompt and turn count."""
        t0 = time.perf_counter()
        ids, chunks = prep.ids, prep.annotation.chunks
        hits = self.seen.observe(ids, chunks) if track_seen else ()
        messages = source.messages or ()
        starts = tuple(prep.prompt.message_starts)
        if len(starts) != len(messages):
            starts = ()  # the template rendered messages it did not report: no per-message view
        view = PromptView.build(ids, starts, messages if starts else (), tools=source.tools,
                                system_sections=source.system_sections)
        divergence = self.tracker.observe(session, view)
        return Analysis(len(ids), chunks, hits, divergence, self._next_turn(session),
                        prep.annotation, prep.prompt.text,
                        prep.seconds + time.perf_counter() - t0)

    def analyze(self, source: PromptSource, *, session: str, namespace: str = "",
                track_seen: bool = True) -> Analysis:
        """prepare() then complete(). Blocking."""
        prep = self.prepare(source, session=session, namespace=namespace)
        return self.complete(prep, source, session=session, track_seen=track_seen)

    def _next_turn(self, session: str) -> int:
        turn = self._turns.pop(session, 0) + 1
        self._turns[session] = turn
        if len(self._turns) > self._max_sessions:
            self._turns.popitem(last=False)
        return turn

    def submit(self, source: PromptSource, *, session: str, namespace: str = ""
               ) -> asyncio.Future[Analysis]:
        """analyze() on the pipeline's worker thread; await the returned future."""
        return self._run(lambda: self.analyze(source, session=session, namespace=namespace))

    def submit_prepare(self, source: PromptSource, *, session: str, namespace: str = ""
                       ) -> asyncio.Future[Prepared]:
        """prepare() on the worker thread: the annotation, for irminsul mode."""
        return self._run(lambda: self.prepare(source, session=session, namespace=namespace))

    def submit_prewarm(self, source: PromptSource, *, session: str, namespace: str,
                       limit: int, min_tokens: int, k: int = 0
                       ) -> asyncio.Future[tuple[Prepared, tuple[int, ...]]]:
        """prepare() and prewarm_ends() on the worker thread."""
        def run():
            prep = self.prepare(source, session=session, namespace=namespace)
            return prep, self.prewarm_ends(prep, limit=limit, min_tokens=min_tokens, k=k)
        return self._run(run)

    def submit_complete(self, prep: Prepared, source: PromptSource, *, session: str,
                        track_seen: bool = True) -> asyncio.Future[Analysis]:
        """complete() on the worker thread."""
        return self._run(lambda: self.complete(prep, source, session=session,
                                               track_seen=track_seen))

    def _run(self, fn) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Prepared(NamedTuple):
    prompt: Any  # a Prompt (ids, anchors, message_starts, text)
    ids: np.ndarray
    annotation: Annotation
    seconds: float


class _RawPrompt(NamedTuple):
    ids: Any
    anchors: tuple
    message_starts: tuple
    text: str | None


async def analyze_quietly(fut: asyncio.Future | None):
    """The future's result (an Analysis or Prepared), or None if it failed (logged): an
    unusual prompt the tokenizer or the chat template cannot render must not fail a request
    the upstream can serve."""
    if fut is None:
        return None
    try:
        return await fut
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here only costs the row its analysis
        log.warning("prompt analysis failed (%s: %s); row logged without it",
                    type(e).__name__, e)
        return None
