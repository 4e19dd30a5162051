"""The wire contract between the Irminsul proxy and an Irminsul-capable engine.

One definition, shared by the proxy (which writes annotations), the embedded engine and the
SGLang plugin (which read them). Versioned: an engine refuses an annotation whose major version
it does not know, and serves the request as a plain one.

1. Capability probe. ``GET /irminsul/capabilities`` answers 200 with::

       {"irminsul": {"wire_version": 1, "engine": "embedded", "model": "...",
                     "model_fingerprint": "<hex>", "chunker": {ChunkerConfig fields},
                     "policies": ["full", "prefix", "pic", ...], "default_policy": "pic"}}

   A stock SGLang answers 404: the proxy then runs in ``stock`` mode.

2. Annotation. In ``irminsul`` mode the proxy adds a top-level key ``"irminsul"`` to the request
   body it forwards (any endpoint: /generate, /v1/chat/completions, /v1/completions,
   /v1/messages). The object is :class:`Annotation` as a dict. SGLang 0.5.23 types
   ``kv_hints`` as an envelope of actions and refuses a bare object, so for SGLang's irminsul
   backend (stock mode, ``--kv-hints``, /generate only) the proxy sends it as the payload of an
   ``irminsul.chunks`` action of that envelope instead (engine_adapter/sglang/hints.py).

3. Verification. The engine tokenizes the request itself. If ``num_tokens`` and ``seq_hash``
   equal its own, it uses the annotation's chunk keys and anchors; otherwise it ignores them
   and re-derives chunks from its own token IDs (the result is still correct, only the
   proxy's anchors are lost). Whatever the annotation says, a stored chunk is reused only
   after its token IDs compare equal to the request's.

4. Accounting. The engine reports, in ``meta_info`` (``/generate``) and in ``usage.irminsul``
   (OpenAI and Anthropic shapes), the :class:`ReuseCounts` fields. Its ``cached_tokens`` stays
   the exact-prefix count, as SGLang's does; content reuse is reported apart, never as exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import xxhash

WIRE_VERSION = 1
CAPABILITY_PATH = "/irminsul/capabilities"
ANNOTATION_KEY = "irminsul"
SGLANG_HINT_KEY = "kv_hints"


class ContractError(ValueError):
    """An annotation that does not follow this contract."""


def seq_hash(token_ids) -> str:
    """Hash of a whole token sequence, as the proxy and the engine both compute it."""
    arr = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int32))
    return xxhash.xxh3_64_hexdigest(arr.tobytes())


class ChunkRef(NamedTuple):
    """One chunk of the prompt: tokens [start, end) keyed by ``key`` (xxh3_128 hex).

    A NamedTuple, not a dataclass: the chunker builds one per ~128 tokens on the hot path.
    """

    key: str
    start: int
    end: int


@dataclass(frozen=True)
class Annotation:
    """What the proxy tells the engine about a prompt. See the module docstring."""

    num_tokens: int
    seq_hash: str
    chunks: tuple[ChunkRef, ...]
    anchors: tuple[int, ...] = ()
    namespace: str = ""
    model_fingerprint: str = ""
    policy: str | None = None  # per-request override of the engine's policy
    policy_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"k": 4} or {"r": 0.1}
    session: str | None = None
    wire_version: int = WIRE_VERSION

    def to_json(self) -> dict[str, Any]:
        # Built by hand: dataclasses.asdict deep-copies every ChunkRef (~3 ms for 300 chunks,
        # on the request's critical path in the proxy).
        return {
            "num_tokens": self.num_tokens,
            "seq_hash": self.seq_hash,
            "chunks": [[c.key, c.start, c.end] for c in self.chunks],
            "anchors": list(self.anchors),
            "namespace": self.namespace,
            "model_fingerprint": self.model_fingerprint,
            "policy": self.policy,
            "policy_args": dict(self.policy_args),
            "session": self.session,
            "wire_version": self.wire_version,
        }

    @classmethod
    def from_json(cls, d: Any) -> Annotation:
        if not isinstance(d, dict):
            raise ContractError("irminsul annotation must be an object")
        version = d.get("wire_version")
        if version != WIRE_VERSION:
            raise ContractError(f"unsupported irminsul wire_version {version!r}")
        try:
            chunks = tuple(ChunkRef(str(k), int(s), int(e)) for k, s, e in d["chunks"])
            ann = cls(
                num_tokens=int(d["num_tokens"]),
                seq_hash=str(d["seq_hash"]),
                chunks=chunks,
                anchors=tuple(int(a) for a in d.get("anchors", ())),
                namespace=str(d.get("namespace", "")),
                model_fingerprint=str(d.get("model_fingerprint", "")),
                policy=d.get("policy"),
                policy_args=dict(d.get("policy_args") or {}),
                session=d.get("session"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ContractError(f"malformed irminsul annotation: {e}") from e
        prev = 0
        for c in ann.chunks:
            if c.start != prev or c.end <= c.start:
                raise ContractError("annotation chunks must tile [0, num_tokens) in order")
            prev = c.end
        if ann.chunks and prev != ann.num_tokens:
            raise ContractError("annotation chunks must tile [0, num_tokens) in order")
        return ann

    def matches(self, token_ids) -> bool:
        """True if this annotation was made for exactly these token IDs."""
        return len(token_ids) == self.num_tokens and seq_hash(token_ids) == self.seq_hash


@dataclass(frozen=True)
class ReuseCounts:
    """How a prompt's tokens were obtained. prompt = exact_prefix + reused + recomputed + new."""

    prompt_tokens: int = 0
    exact_prefix_tokens: int = 0  # KV from the exact prefix, bit-identical to a fresh prefill
    reused_tokens: int = 0  # KV placed from a content hit (c_KV copied, k_pe δ-rotated)
    recomputed_tokens: int = 0  # tokens of hit chunks computed anyway (carve-out, blend, clip)
    new_tokens: int = 0  # tokens with no hit, computed
    chunks_total: int = 0
    chunks_hit: int = 0
    policy: str = ""

    def __post_init__(self):
        parts = (
            self.exact_prefix_tokens + self.reused_tokens + self.recomputed_tokens + self.new_tokens
        )
        if parts != self.prompt_tokens:
            raise ValueError(f"reuse counts do not add up: {parts} != {self.prompt_tokens}")

    @property
    def saved_tokens(self) -> int:
        """Tokens whose prefill was skipped (exact prefix plus content reuse)."""
        return self.exact_prefix_tokens + self.reused_tokens

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReuseCounts:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: d[k] for k in names if k in d})


def capabilities(
    *, engine: str, model: str, model_fingerprint: str, chunker: dict, policies, default_policy
) -> dict[str, Any]:
    """The body an engine returns from CAPABILITY_PATH."""
    return {
        "irminsul": {
            "wire_version": WIRE_VERSION,
            "engine": engine,
            "model": model,
            "model_fingerprint": model_fingerprint,
            "chunker": chunker,
            "policies": list(policies),
            "default_policy": default_policy,
        }
    }
