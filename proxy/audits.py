"""Quality audits in the savings database: one row per served request the engine re-ran with
``full`` (engine_adapter/embedded/audit.py), and the report's summary of them.

An audit compares what the request was served (with reused KV) against ``full`` on the same
prompt: KL(full || served) of the next-token distributions at the first generated position,
and greedy agreement over up to 32 positions (probe.agreement: up to the first difference).
Rows go through the same SavingsWriter as request rows, into their own ``audits`` table
(migration m003_audits); no torch here, so `irminsul report` stays light.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, NamedTuple

VERDICTS = ("pass", "fail", "fallback")
_COUNTS = ("prompt_tokens", "exact_prefix_tokens", "reused_tokens", "recomputed_tokens",
           "new_tokens", "compared_tokens")


@dataclass(frozen=True, kw_only=True)
class AuditRow:
    """One audit. ``verdict``: pass (within the engine's thresholds), fail (outside them), or
    fallback (this audit brought its window's mean past a threshold: the engine then served
    prefix only). ``args`` is the policy's arguments as JSON ({"k": 16, "r": 0.1})."""

    table: ClassVar[str] = "audits"

    request_id: str
    model: str
    policy: str
    args: str
    prompt_tokens: int
    exact_prefix_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    new_tokens: int
    compared_tokens: int  # greedy positions compared (1 .. 32)
    kl: float  # KL(full || served) in nats at the first generated position
    agreement: float  # in [0, 1]
    verdict: str
    audit_ms: float  # the re-run's wall time
    epoch: float | None = None  # when the request was served; default now
    time: str | None = None  # UTC ISO 8601 of ``epoch``, filled in
    id: int | None = None  # assigned by SQLite

    def __post_init__(self):
        set_ = object.__setattr__
        if self.epoch is None:
            set_(self, "epoch", datetime.now(timezone.utc).timestamp())
        set_(self, "time", datetime.fromtimestamp(self.epoch, timezone.utc)
             .isoformat(timespec="milliseconds"))
        for name in ("request_id", "model", "policy"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        json.loads(self.args)  # ValueError for text that is not JSON
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        for name in _COUNTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
            set_(self, name, int(v))
        if self.compared_tokens < 1:
            raise ValueError("compared_tokens must be >= 1")
        parts = sum(getattr(self, n) for n in _COUNTS[1:5])
        if parts != self.prompt_tokens:
            raise ValueError(f"token counts do not add up: {parts} != {self.prompt_tokens}")
        for name, hi in (("kl", math.inf), ("agreement", 1.0), ("audit_ms", math.inf)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= hi \
                    or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number in [0, {hi}], got {v!r}")
            set_(self, name, float(v))

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


class AuditGroup(NamedTuple):
    """The audits of one model and policy (model and policy "(all)" for the total)."""

    model: str
    policy: str
    audits: int
    kl_mean: float
    kl_max: float
    agreement_mean: float
    agreement_min: float
    failed: int  # verdict fail or fallback
    fallbacks: int  # audits that switched the engine to prefix


_SUMMARY = """COUNT(*), AVG(kl), MAX(kl), AVG(agreement), MIN(agreement),
              SUM(verdict != 'pass'), SUM(verdict = 'fallback')"""


def audit_summary(conn, cutoff_epoch: float | None = None) -> tuple[AuditGroup, ...]:
    """Per (model, policy) and in total, the audits from ``cutoff_epoch`` on; () when none.
    ``conn``: an sqlite3 connection to a migrated savings database."""
    where, params = ("epoch >= ?", [cutoff_epoch]) if cutoff_epoch is not None else ("1", [])
    rows = conn.execute(f"SELECT model, policy, {_SUMMARY} FROM audits WHERE {where}"
                        " GROUP BY model, policy ORDER BY model, policy", params).fetchall()
    if not rows:
        return ()
    total = conn.execute(f"SELECT '(all)', '(all)', {_SUMMARY} FROM audits WHERE {where}",
                         params).fetchone()
    return tuple(AuditGroup(*r) for r in (*rows, total))
