"""Quality audits: served requests re-run with ``full`` while the engine is idle.

The start-up self-check (guard.py) probes one prompt; real traffic can drift from it. So a
share ``audit_rate`` of the served requests whose plan reused KV (reused_tokens > 0: pic,
blend and any later content-reuse policy) is kept as a sample: the prompt's token IDs, the
served first-position logits, and for up to ``AUDIT_TOKENS`` positions the token served and the
policy's greedy choice there (argmax of the served logits, also when the request sampled).
Requests whose only reuse is the exact prefix are not sampled: that KV is the prompt's own,
computed at the same positions, so there is nothing lossy to audit.

When no request is waiting, the engine worker (worker.py) runs one audit: a single ``full``
forward over the prompt plus the served tokens (teacher-forced), giving full's logits at every
compared position. KL(full || served) at the first position and greedy agreement
(probe.kl_divergence / probe.agreement, the quality harness's maths) follow. For a greedy
request this agreement equals the harness's free-running one: up to the first difference,
full would have generated exactly the served tokens. A request arriving during an audit waits
for at most that one forward pass (prompt + up to 31 tokens, no decoding); audits run one at a
time and the worker checks for jobs before each.

Samples wait in a queue of ``QUEUE_SIZE`` (a sample holds the prompt IDs and one vocab-sized
float32 vector: ~0.5 MB for a 32K-token DeepSeek-V2 prompt); when it is full a new sample is
dropped and counted. Once ``audit_window`` audits have been made, their rolling mean is
compared with the gate's ``audit_max_kl`` and ``audit_min_agreement`` (gate.py: the model's
irminsul.json, config values winning over it): past either, the engine serves ``prefix`` from
then on (until restarted), logs why, and /health and /metrics show it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from ...proxy.audits import AuditRow
from ..contract import ReuseCounts
from .config import EngineConfig
from .gate import Gate, resolve_gate
from .planner import PolicyArgs
from .probe import agreement, kl_divergence

log = logging.getLogger(__name__)

AUDIT_TOKENS = 32  # greedy positions compared at most (quality.py's default window)
QUEUE_SIZE = 8


class AuditSample:
    """What a sampled request keeps to be re-run; filled while it is served."""

    def __init__(self, request_id: str, ids: np.ndarray, counts: ReuseCounts, policy: str,
                 args: PolicyArgs, first_logits: torch.Tensor):
        self.request_id, self.policy, self.args, self.counts = request_id, policy, args, counts
        self.ids = ids.copy()
        self.first_logits = first_logits.detach().float().cpu().clone()
        self.greedy: list[int] = []  # the policy's argmax at each position
        self.served: list[int] = []  # the token served there (the next position's input)
        self.epoch = time.time()

    def step(self, logits: torch.Tensor, token: int) -> None:
        """Record one served position: its logits and the token sent to the client."""
        if len(self.greedy) < AUDIT_TOKENS:
            self.greedy.append(int(torch.argmax(logits)))
            self.served.append(int(token))

    def positions(self) -> list[int]:
        """The greedy tokens to compare (at least the first position's, even with no output)."""
        return self.greedy or [int(torch.argmax(self.first_logits))]


class AuditResult(NamedTuple):
    kl: float
    agreement: float
    compared: int
    seconds: float


def rerun_full(runner, sample: AuditSample) -> AuditResult:
    """One ``full`` forward over the prompt and the served tokens but the last compared one;
    compares its logits with what was served. Touches no store and no engine counter."""
    t0 = time.perf_counter()
    greedy = sample.positions()
    m, n = len(greedy), len(sample.ids)
    ctx = np.concatenate([sample.ids, np.asarray(sample.served[: m - 1], dtype=np.int32)])
    kv = runner.new_kv(len(ctx))
    pos = torch.arange(len(ctx))
    h = runner.run_layers(kv, runner.embed(torch.from_numpy(ctx.astype(np.int64))), pos, 0,
                          runner.num_layers)
    logits = runner.logits(h[:, n - 1 :])  # [m, vocab]: full's next-token logits
    reference = logits.argmax(-1).tolist()
    kl = kl_divergence(logits[0].cpu(), sample.first_logits)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return AuditResult(kl, agreement(reference, greedy), m, time.perf_counter() - t0)


class Auditor:
    """Sampling, the sample queue, the rolling window and the fallback decision of one engine.

    Engine calls (``begin``, ``submit``, ``run_one``) come from the engine's thread under its
    lock; ``snapshot`` and ``tripped`` may be read from any thread. ``sink`` receives every
    AuditRow (the server points it at the savings writer); None: results are only counted.
    ``gate`` holds the thresholds (the engine's; None: resolved from ``config``, any dtype).
    """

    def __init__(self, config: EngineConfig, model: str, queue_size: int = QUEUE_SIZE,
                 gate: Gate | None = None):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.config, self.model, self.queue_size = config, model, queue_size
        self.gate = gate if gate is not None else resolve_gate(config, None)
        self.sink: Callable[[AuditRow], None] | None = None
        self._rng = random.Random(config.audit_seed)
        self._queue: deque[AuditSample] = deque()
        self._window: deque[tuple[float, float]] = deque(maxlen=config.audit_window)
        self._lock = threading.Lock()
        self._counts = {"sampled": 0, "dropped": 0, "errors": 0}
        self._verdicts = dict.fromkeys(("pass", "fail", "fallback"), 0)
        self.fallback_reason: str | None = None

    @property
    def tripped(self) -> bool:
        """True once the window crossed a threshold: the engine serves prefix only."""
        return self.fallback_reason is not None

    @property
    def pending(self) -> int:
        return len(self._queue)

    def begin(self, request_id: str | None, ids: np.ndarray, counts: ReuseCounts,
              policy: str, args: PolicyArgs, first_logits: torch.Tensor) -> AuditSample | None:
        """A sample for this served request, or None when it is not drawn (or reused none)."""
        rate = self.config.audit_rate
        if rate <= 0 or counts.reused_tokens <= 0 or self.tripped:
            return None
        if rate < 1 and not self._rng.random() < rate:
            return None
        rid = request_id or f"engine-{time.time_ns():x}"
        return AuditSample(rid, ids, counts, policy, args, first_logits)

    def submit(self, sample: AuditSample) -> None:
        """Queue a sample whose request finished; dropped (and counted) when the queue is full."""
        with self._lock:
            if len(self._queue) >= self.queue_size:
                self._counts["dropped"] += 1
                return
            self._counts["sampled"] += 1
            self._queue.append(sample)

    def run_one(self, runner) -> bool:
        """Audit the oldest sample; False when there was none. Never raises (a failed audit is
        logged and counted)."""
        with self._lock:
            if not self._queue:
                return False
            sample = self._queue.popleft()
        try:
            result = rerun_full(runner, sample)
        except Exception:  # an audit must never take the engine down
            log.exception("audit of request %s failed", sample.request_id)
            with self._lock:
                self._counts["errors"] += 1
            return True
        row = self._record(sample, result)
        if self.sink is not None:
            try:
                self.sink(row)
            except Exception:  # a closed writer at shutdown
                log.exception("could not record the audit of request %s", sample.request_id)
        return True

    def _record(self, sample: AuditSample, result: AuditResult) -> AuditRow:
        gate = self.gate
        ok = result.kl <= gate.audit_max_kl and result.agreement >= gate.audit_min_agreement
        verdict = "pass" if ok else "fail"
        with self._lock:
            self._window.append((result.kl, result.agreement))
            if not self.tripped and len(self._window) == self._window.maxlen:
                reasons = self._window_reasons()
                if reasons:
                    verdict = "fallback"
                    self.fallback_reason = "; ".join(reasons)
                    log.warning("quality audit: serving prefix only from now on instead of "
                                "%s: %s", sample.policy, self.fallback_reason)
            self._verdicts[verdict] += 1
        c = sample.counts
        return AuditRow(
            request_id=sample.request_id, model=self.model, policy=sample.policy,
            args=json.dumps(sample.args._asdict()), prompt_tokens=c.prompt_tokens,
            exact_prefix_tokens=c.exact_prefix_tokens, reused_tokens=c.reused_tokens,
            recomputed_tokens=c.recomputed_tokens, new_tokens=c.new_tokens,
            compared_tokens=result.compared, kl=result.kl, agreement=result.agreement,
            verdict=verdict, audit_ms=result.seconds * 1000, epoch=sample.epoch)

    def _window_reasons(self) -> list[str]:
        gate, n = self.gate, len(self._window)
        kl = sum(k for k, _ in self._window) / n
        agree = sum(a for _, a in self._window) / n
        out = []
        if not kl <= gate.audit_max_kl:
            out.append(f"mean KL(full || served) {kl:.4f} nats over the last {n} audits above "
                       f"the limit {gate.audit_max_kl:g} ({gate.source} gate)")
        if not agree >= gate.audit_min_agreement:
            out.append(f"mean greedy agreement with full {agree:.3f} over the last {n} audits "
                       f"below the limit {gate.audit_min_agreement:g} ({gate.source} gate)")
        return out

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready state: rate, counters, the window's means, the fallback reason."""
        with self._lock:
            n = len(self._window)
            return {
                "rate": self.config.audit_rate,
                **self._counts,
                "queued": len(self._queue),
                "audits": dict(self._verdicts),
                "window": n,
                "window_size": self._window.maxlen,
                "window_kl": sum(k for k, _ in self._window) / n if n else None,
                "window_agreement": sum(a for _, a in self._window) / n if n else None,
                "fallback": self.fallback_reason,
            }
