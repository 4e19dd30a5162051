"""The single engine thread and its bridge to asyncio.

The engine is not re-entrant, so every call into it (generation, cache flush, stats) runs on
one worker thread, one job at a time, in the order submitted. A generation job streams its
tokens back to the event loop with ``loop.call_soon_threadsafe`` into an ``asyncio.Queue``;
the handler that owns the job sets its cancel flag when the client goes away, and the worker
checks that flag between decode steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from ..contract import ReuseCounts
from .output_text import StopStrings
from .protocol import GenerationRequest

log = logging.getLogger(__name__)


class TextDelta(NamedTuple):
    """New output: text safe to show (may be "") and the token IDs that produced it."""

    text: str
    token_ids: tuple[int, ...]


class Finished(NamedTuple):
    """The last event of a generation."""

    reason: str  # "stop" | "length" | "abort"
    matched: int | str | None  # the stop token ID or stop string that ended it
    counts: ReuseCounts | None  # None only if the job was cancelled before its prefill
    completion_tokens: int
    prefill_seconds: float | None


class Failed(NamedTuple):
    """The engine raised; the message is for the client's error JSON."""

    message: str


Event = TextDelta | Finished | Failed


def run_generation(engine, req: GenerationRequest, emit: Callable[[Event], None],
                   cancelled: threading.Event) -> None:
    """Run one request on the engine (worker thread only), emitting events; never raises.

    Stop token IDs that end the output are counted as completion tokens but not decoded into
    the text (SGLang and OpenAI both trim them); stop strings end the output at their first
    occurrence and are trimmed too.
    """
    tok = engine.tokenizer
    # Special tokens are skipped here rather than in the decoder, so that the ones in
    # req.keep_special (tool-call markers) still reach the text.
    decoder = tok.stream_decoder(skip_special_tokens=False)
    skipped = tok.special_ids - req.keep_special if req.skip_special_tokens else frozenset()
    stops = StopStrings(req.stop)
    stop_ids = set(req.params.stop_token_ids)
    if not req.params.ignore_eos:
        stop_ids.update(tok.eos_token_ids)
    counts = prefill = matched = None
    reason, produced = "abort", 0
    outputs = iter(())
    try:
        outputs = engine.generate(
            req.ids, req.params, annotation=req.annotation, anchors=req.anchors,
            namespace=req.namespace, policy=req.policy, policy_args=req.policy_args,
            request_id=req.rid,
        )
        for out in outputs:
            if out.counts is not None:
                counts, prefill = out.counts, out.prefill_seconds
            if out.token_id is not None:
                produced += 1
                tid = int(out.token_id)
                text = ""
                if out.finish_reason == "stop" and tid in stop_ids:
                    matched = tid
                elif tid not in skipped:
                    text = decoder.step(tid)
                shown, hit = stops.feed(text)
                emit(TextDelta(shown, (tid,)))
                if hit is not None:
                    reason, matched = "stop", hit
                    break
            if out.finish_reason is not None:
                reason = out.finish_reason
                break
            if cancelled.is_set():
                break
    except Exception as e:  # the client gets an error event; the worker lives on
        log.exception("generation %s failed", req.rid)
        emit(Failed(f"{type(e).__name__}: {e}"))
        return
    finally:
        close = getattr(outputs, "close", None)
        if close is not None:
            close()  # releases the engine's lock and the request's KV at once
    if not isinstance(matched, str):
        emit(TextDelta(stops.flush(), ()))
    emit(Finished(reason, matched, counts, produced, prefill))


class GenerationJob:
    """A queued generation: events arrive on ``events``; ``cancel()`` asks the worker to stop."""

    def __init__(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.req = req
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop closed under us (shutdown): nobody is listening
            self._cancelled.set()

    def run(self, engine) -> None:
        if self._cancelled.is_set():  # the client left while the job was queued
            self._emit(Finished("abort", None, None, 0, None))
            return
        run_generation(engine, self.req, self._emit, self._cancelled)


class _Call:
    """A short engine call (flush, stats) whose result comes back through a future."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def cancel(self) -> None:
        self.future.cancel()

    def run(self, engine) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn(engine))
        except Exception as e:  # noqa: BLE001 -- handed to the awaiting handler, which re-raises
            self.future.set_exception(e)


class EngineWorker:
    """Owns the engine thread. Start it on the loop that will submit jobs; stop before exit."""

    def __init__(self, engine):
        self.engine = engine
        self._jobs: queue.Queue[GenerationJob | _Call | None] = queue.Queue()
        self._pending: set[GenerationJob | _Call] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="irminsul-engine", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Jobs submitted and not yet finished (the running one included)."""
        return len(self._pending)

    def submit(self, req: GenerationRequest) -> GenerationJob:
        """Queue a generation; its events arrive on the returned job's queue."""
        job = GenerationJob(req, asyncio.get_running_loop())
        self._put(job)
        return job

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(engine)`` on the worker thread after the jobs queued before it."""
        job = _Call(fn)
        self._put(job)
        return await asyncio.wrap_future(job.future)

    async def stop(self) -> None:
        """Cancel every queued and running job and wait for the thread to exit."""
        for job in list(self._pending):
            job.cancel()
        self._jobs.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _put(self, job: GenerationJob | _Call) -> None:
        if not self.alive():
            raise RuntimeError("the engine worker is not running")
        self._pending.add(job)
        self._jobs.put(job)

    def _next_job(self) -> GenerationJob | _Call | None:
        """The next job. While none is waiting, the engine's idle work (quality audits,
        audit.py) runs one piece at a time, so a job submitted meanwhile waits for at most
        one piece: one audit's forward pass."""
        idle = getattr(self.engine, "idle_work", None)
        while idle is not None and self._jobs.empty():
            try:
                if not idle():
                    break
            except Exception:  # idle work handles its own errors; this is a last resort
                log.exception("engine idle work failed")
                break
        return self._jobs.get()

    def _run(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                job.run(self.engine)
            except Exception:  # run() handles its own errors; this is a last resort
                log.exception("engine job failed")
            finally:
                self._pending.discard(job)
