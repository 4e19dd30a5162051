"""A model's quality gate: the thresholds its content reuse must meet, kept beside the model.

The start-up self-check (guard.py) and the quality audits (audit.py) compare reuse against
``full`` with thresholds. What KL and agreement are acceptable depends on the model (correct
reuse moved the shipped model's probe by 0.1 nat, and its predecessor's, which read across
chunks far less, by a few thousandths; a random-weight test model's greedy tokens differ almost
always), so a model directory may carry them in ``irminsul.json``::

    {"gate": {"max_kl": 0.15, "min_agreement": 0.25, "tokens": 8,
              "audit_max_kl": 0.01, "audit_min_agreement": 0.75, "dtypes": ["float32"]},
     "measured": {... how the values were chosen: command, figures, margins ...}}

Every key of ``gate`` is optional. ``max_kl`` / ``min_agreement`` / ``tokens`` are the
self-check probe's limits (EngineConfig.check_*), ``audit_*`` the audits' window limits.
``dtypes`` names the weight dtypes the values were measured in: an engine running another
dtype does not apply the file (bfloat16 rounding alone moves KL and greedy ties by as much as
reuse does, so float32 limits would reject a sound bfloat16 engine). ``measured`` is free-form.

Precedence per threshold: a value given explicitly in EngineConfig (a CLI flag) wins; else the
file's; else the built-in default, lax enough for random-weight test models (BUILTIN).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

GATE_FILE = "irminsul.json"
# The built-in limits: they only catch gross breakage, so random-weight models pass.
BUILTIN: dict[str, float | int] = {"max_kl": 1.0, "min_agreement": 0.0, "tokens": 4,
                                   "audit_max_kl": 1.0, "audit_min_agreement": 0.0}
# The EngineConfig field that overrides each gate key.
CONFIG_FIELDS = {"max_kl": "check_max_kl", "min_agreement": "check_min_agreement",
                 "tokens": "check_tokens", "audit_max_kl": "audit_max_kl",
                 "audit_min_agreement": "audit_min_agreement"}
DTYPES = ("bfloat16", "float32")
_TOP_KEYS = ("gate", "measured")


class GateFileError(ValueError):
    """An irminsul.json that cannot be used; the message names the file and the key."""


class Gate(NamedTuple):
    """The thresholds in force and where each came from."""

    max_kl: float
    min_agreement: float
    tokens: int
    audit_max_kl: float
    audit_min_agreement: float
    sources: dict[str, str]  # gate key -> "config" | "file" | "default"
    file: str | None  # the irminsul.json whose values apply (None: none applies)
    note: str  # why a file present was not applied, else ""

    @property
    def source(self) -> str:
        """``file``, ``config`` or ``default``; joined with + when they mix."""
        used = set(self.sources.values())
        return "+".join(s for s in ("config", "file", "default") if s in used)

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in BUILTIN}
        return out | {"source": self.source, "sources": dict(self.sources), "file": self.file,
                      "note": self.note or None}

    def describe(self) -> str:
        """One line for the start-up log."""
        where = {"file": f"file {self.file}", "config": "config", "default": "built-in"}
        origin = ", ".join(where[s] for s in ("config", "file", "default")
                           if s in self.sources.values())
        text = (f"gate max KL {self.max_kl:g}, min agreement {self.min_agreement:g} over "
                f"{self.tokens} tokens, audits {self.audit_max_kl:g} / "
                f"{self.audit_min_agreement:g} (from {origin})")
        return text + (f"; {self.note}" if self.note else "")


def _number(path: Path, key: str, v: Any, hi: float | None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise GateFileError(f"{path}: gate.{key} must be a number >= 0, got {v!r}")
    if hi is not None and v > hi:
        raise GateFileError(f"{path}: gate.{key} must be <= {hi:g}, got {v!r}")
    return float(v)


def read_gate_file(model_dir: str | Path) -> dict[str, Any] | None:
    """The validated ``gate`` object of ``model_dir/irminsul.json`` ({} when the file has
    none), or None when there is no such file. Raises GateFileError naming file and key."""
    path = Path(model_dir) / GATE_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GateFileError(f"{path}: not readable JSON: {e}") from None
    if not isinstance(doc, dict):
        raise GateFileError(f"{path}: must hold a JSON object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
        raise GateFileError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))} "
                            f"(known: {', '.join(_TOP_KEYS)})")
    raw = doc.get("gate", {})
    if not isinstance(raw, dict):
        raise GateFileError(f"{path}: gate must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(BUILTIN) - {"dtypes"})
    if unknown:
        raise GateFileError(f"{path}: unknown key(s) gate.{', gate.'.join(unknown)} "
                            f"(known: {', '.join([*BUILTIN, 'dtypes'])})")
    gate: dict[str, Any] = {}
    for key in ("max_kl", "audit_max_kl"):
        if key in raw:
            gate[key] = _number(path, key, raw[key], None)
    for key in ("min_agreement", "audit_min_agreement"):
        if key in raw:
            gate[key] = _number(path, key, raw[key], 1.0)
    if "tokens" in raw:
        v = raw["tokens"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise GateFileError(f"{path}: gate.tokens must be an integer >= 1, got {v!r}")
        gate["tokens"] = v
    if "dtypes" in raw:
        v = raw["dtypes"]
        if (not isinstance(v, list) or not v
                or not all(isinstance(d, str) and d in DTYPES for d in v)):
            raise GateFileError(f"{path}: gate.dtypes must be a non-empty list of "
                                f"{', '.join(DTYPES)}, got {v!r}")
        gate["dtypes"] = tuple(v)
    return gate


def resolve_gate(config, dtype: str | None) -> Gate:
    """The gate for an engine of ``config`` (EngineConfig) running weights of ``dtype``
    ("float32", "bfloat16"; None: the file's ``dtypes`` is not checked)."""
    path = Path(config.model_dir) / GATE_FILE
    found = read_gate_file(config.model_dir)
    note = ""
    if found is not None and dtype is not None and dtype not in found.get("dtypes", (dtype,)):
        note = (f"{path} not applied: its gate was measured in {', '.join(found['dtypes'])}, "
                f"this engine runs {dtype}")
        found = None
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, default in BUILTIN.items():
        explicit = getattr(config, CONFIG_FIELDS[key])
        if explicit is not None:
            values[key], sources[key] = explicit, "config"
        elif found is not None and key in found:
            values[key], sources[key] = found[key], "file"
        else:
            values[key], sources[key] = default, "default"
    applied = str(path) if "file" in sources.values() else None
    return Gate(**values, sources=sources, file=applied, note=note)
