"""The checks behind `irminsul doctor`: is a live server's content reuse reported, honest and
close to a full prefill?

Against any server that speaks SGLang's ``/generate`` and the wire contract (the embedded
engine), :func:`run_doctor` sends four greedy requests over HTTP (SGLang with the irminsul
backend, which has no probe and no per-request policy, gets :class:`SGLangDoctor` instead):

1. header A + content, under the policy being checked (the content is fresh: a random seed);
2. header B + the same content, same policy: the content must come back as reused tokens;
3. header B + content again with policy ``full`` (nothing reused): the reference output;
4. the same again with policy ``prefix``: an exact repeat, which must give ``full``'s output.

No torch and no model are loaded here: prompts are token IDs sent as ``input_ids``, either
random ones (no model directory) or a built-in text encoded with the model's tokenizer.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp
import numpy as np

from ..chunking.config import ChunkerConfig
from ..chunking.keys import Chunker
from ..chunking.runs import cuts
from .contract import (
    ANNOTATION_KEY,
    CAPABILITY_PATH,
    WIRE_VERSION,
    Annotation,
    ReuseCounts,
    seq_hash,
)
from .doctor_prompts import prompts

REUSE_POLICIES = ("pic", "blend", "clip")
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


class DoctorUnreachable(Exception):
    """The server did not answer at all (refused connection, DNS, timeout)."""


@dataclass(frozen=True)
class DoctorConfig:
    """What to check and how strictly.

    ``policy`` None picks the server's default when it reuses content, else ``pic``.
    ``min_agreement`` is the share of the first ``tokens`` greedy output tokens that must
    equal ``full``'s before the first difference; exactness checks do not depend on it.
    """

    upstream: str
    model_dir: str | None = None
    policy: str | None = None
    pic_k: int | None = None
    blend_r: float | None = None
    clip_r: float | None = None
    tokens: int = 16
    min_agreement: float = 0.5
    content_tokens: int = 2048
    annotate: bool = True
    seed: int | None = None
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if not self.upstream.startswith(("http://", "https://")):
            object.__setattr__(self, "upstream", "http://" + self.upstream)
        object.__setattr__(self, "upstream", self.upstream.rstrip("/"))
        if self.policy is not None and self.policy not in REUSE_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(REUSE_POLICIES)}, "
                             f"got {self.policy!r}")
        for name, low in (("tokens", 1), ("content_tokens", 64)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.pic_k is not None and (not isinstance(self.pic_k, int) or self.pic_k < 0):
            raise ValueError(f"pic_k must be an integer >= 0, got {self.pic_k!r}")
        for name in ("min_agreement", "blend_r", "clip_r"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout!r}")


class Check(NamedTuple):
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str


class Reply(NamedTuple):
    """One /generate answer: the output tokens and the parsed counts (None if unreadable)."""

    output_ids: tuple[int, ...]
    counts: ReuseCounts | None
    meta: dict[str, Any]
    problem: str  # why counts or output are unusable; "" when fine


class DoctorReport(NamedTuple):
    upstream: str
    policy: str
    checks: tuple[Check, ...]
    agreement: float | None  # matching share of the first N tokens, reuse policy vs full

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)


def agreement(a, b, n: int) -> float:
    """Share of the first ``n`` tokens equal before the first difference (greedy outputs
    differ everywhere after one differing token, so later matches mean nothing)."""
    same = 0
    for x, y in zip(a[:n], b[:n], strict=False):
        if x != y:
            break
        same += 1
    return same / n


class Doctor:
    """One run of the checks against ``cfg.upstream`` over ``session``."""

    def __init__(self, cfg: DoctorConfig, session: aiohttp.ClientSession):
        self.cfg, self.session = cfg, session
        self.checks: list[Check] = []

    def add(self, name: str, ok: bool | None, detail: str) -> None:
        self.checks.append(Check(name, SKIP if ok is None else PASS if ok else FAIL, detail))

    async def _get_json(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.cfg.upstream + path) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    def probe(self, status: int, body: Any) -> dict | None:
        """The capabilities in the answer (status, body) to GET CAPABILITY_PATH, or None."""
        caps = body.get("irminsul") if isinstance(body, dict) else None
        if status != 200 or not isinstance(caps, dict):
            self.add("capability probe", False,
                     f"GET {CAPABILITY_PATH} answered {status}: the server is not "
                     "Irminsul-capable (a stock SGLang answers 404); content reuse cannot be "
                     "checked. Start SGLang with --radix-cache-backend irminsul, or use "
                     "`irminsul serve`.")
            return None
        if caps.get("wire_version") != WIRE_VERSION:
            self.add("capability probe", False, f"wire_version {caps.get('wire_version')!r}; "
                     f"this doctor speaks {WIRE_VERSION}")
            return None
        policies = caps.get("policies") or []
        missing = [p for p in ("full", "prefix", self.policy_for(caps)) if p not in policies]
        if missing:
            self.add("capability probe", False, f"policies {policies} lack {missing}")
            return None
        self.add("capability probe", True, f"engine {caps.get('engine')!r}, model "
                 f"{caps.get('model')!r}, policies {', '.join(policies)}")
        return caps

    def policy_for(self, caps: dict) -> str:
        if self.cfg.policy is not None:
            return self.cfg.policy
        default = caps.get("default_policy")
        return default if default in REUSE_POLICIES else "pic"

    def fingerprint(self, caps: dict) -> None:
        if self.cfg.model_dir is None:
            self.add("model fingerprint", None, "no --model-dir: random token IDs sent")
            return
        from ..chunking.fingerprint import model_fingerprint

        mine, theirs = model_fingerprint(self.cfg.model_dir), caps.get("model_fingerprint")
        self.add("model fingerprint", mine == theirs,
                 "matches the server's" if mine == theirs else
                 f"{self.cfg.model_dir} is {mine}, the server serves {theirs}")

    async def generate(self, ids: np.ndarray, policy: str, caps: dict) -> Reply:
        cfg = self.cfg
        r = cfg.clip_r if policy == "clip" else cfg.blend_r
        args = {k: v for k, v in (("k", cfg.pic_k), ("r", r)) if v is not None}
        body: dict[str, Any] = {
            "input_ids": ids.tolist(),
            "sampling_params": {"temperature": 0, "max_new_tokens": cfg.tokens,
                                "ignore_eos": True},
            "irminsul_policy": policy,
        }
        if args and policy in REUSE_POLICIES:
            body["irminsul_policy_args"] = args
        if cfg.annotate:
            # Top level only: SGLang 0.5.23 types kv_hints as a KvHintsEnvelope
            # (managers/kv_hints.py) and rejects a bare annotation there; see sglang/DESIGN.md.
            body[ANNOTATION_KEY] = annotation(ids, caps, policy,
                                              args if policy in REUSE_POLICIES else {})
        got, meta, problem = await self.post_generate(body)
        if problem:
            return Reply((), None, {}, problem)
        out = tuple(got.get("output_ids") or ())
        try:
            counts = ReuseCounts.from_json(meta["irminsul"])
        except (KeyError, TypeError, ValueError) as e:
            return Reply(out, None, meta, f"meta_info.irminsul unreadable: {e}")
        return Reply(out, counts, meta, "")

    async def post_generate(self, body: dict) -> tuple[dict, dict, str]:
        """(answer, its meta_info, "") of a /generate request, or ({}, {}, why not)."""
        async with self.session.post(self.cfg.upstream + "/generate", json=body) as resp:
            text = await resp.text()
        try:
            got = json.loads(text)
        except ValueError:
            got = None
        if resp.status != 200 or not isinstance(got, dict):
            return {}, {}, f"/generate answered {resp.status}: {text[:300]}"
        meta = got.get("meta_info") if isinstance(got.get("meta_info"), dict) else {}
        return got, meta, ""

    async def run(self) -> DoctorReport:
        status, body = await self._get_json(CAPABILITY_PATH)
        if status == 404 and await sglang_backend(self) == "irminsul":
            return await SGLangDoctor(self).run()
        caps = self.probe(status, body)
        if caps is None:
            return DoctorReport(self.cfg.upstream, self.cfg.policy or "", tuple(self.checks),
                                None)
        policy = self.policy_for(caps)
        self.fingerprint(caps)
        a, b, content_start = prompts(self.cfg)
        replies = {
            "first": await self.generate(a, policy, caps),
            "moved": await self.generate(b, policy, caps),
            "full": await self.generate(b, "full", caps),
            "prefix": await self.generate(b, "prefix", caps),
        }
        expected = {"first": (a, policy), "moved": (b, policy), "full": (b, "full"),
                    "prefix": (b, "prefix")}
        found = judge(self.add, replies, expected, content_start, self.cfg)
        return DoctorReport(self.cfg.upstream, policy, tuple(self.checks), found)


def _find(obj: Any, key: str) -> Any:
    """The first value under ``key`` anywhere in a JSON object (SGLang's server info nests
    its arguments by group in some versions, flat in others)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if key in o:
                return o[key]
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return None


async def sglang_backend(doctor: Doctor) -> str | None:
    """SGLang's --radix-cache-backend, from its /server_info (/get_server_info before 0.5),
    or None for a server that is not SGLang."""
    for path in ("/server_info", "/get_server_info"):
        status, body = await doctor._get_json(path)
        if status == 200 and isinstance(body, dict):
            found = _find(body, "radix_cache_backend")
            return found if isinstance(found, str) else None
    return None


class SGLangDoctor:
    """The checks against SGLang with ``--radix-cache-backend irminsul``, which serves no
    capability probe and no per-request policy. Its policy is the server's
    (IRMINSUL_SGLANG_POLICY); ``full`` is a request in a fresh cache partition (its own
    ``extra_key``: SGLang matches nothing there), ``prefix`` the same request again there. The
    backend places one run per request, right after the exact prefix, so the moved content
    is reached as the proxy's --prewarm reaches it: a prefill-only request (max_new_tokens 0)
    for the prompt up to the run's start, chunked as the backend chunks it
    (chunking/runs.py). Its split comes in ``meta_info.cached_tokens_details.irminsul``."""

    def __init__(self, doctor: Doctor):
        self.d, self.cfg = doctor, doctor.cfg

    async def generate(self, ids: np.ndarray, partition: str, tokens: int) -> Reply:
        body = {"input_ids": ids.tolist(), "extra_key": partition,
                "sampling_params": {"temperature": 0, "max_new_tokens": tokens,
                                    "ignore_eos": True}}
        got, meta, problem = await self.d.post_generate(body)
        if problem:
            return Reply((), None, {}, problem)
        details = meta.get("cached_tokens_details")
        split = details.get("irminsul") if isinstance(details, dict) else None
        try:
            counts = None if split is None else ReuseCounts.from_json(split)
        except (TypeError, ValueError) as e:
            return Reply((), None, meta, f"cached_tokens_details.irminsul unreadable: {e}")
        return Reply(tuple(got.get("output_ids") or ()), counts, meta, "")

    async def run(self) -> DoctorReport:
        add, cfg = self.d.add, self.cfg
        add("capability probe", None, "SGLang with --radix-cache-backend irminsul (its "
            "/server_info): no wire-contract probe; its server-wide policy is checked, full "
            "and prefix are requests in a fresh cache partition")
        a, b, content_start = prompts(cfg)
        chunker = Chunker(ChunkerConfig())  # the backend's (engine_adapter/sglang/config.py)
        seen_a = {tuple(a[c.start:c.end].tolist()) for c in chunker.split(a)}
        chunks_b = chunker.split(b)
        seen = [(c.start, c.end) for c in chunks_b if tuple(b[c.start:c.end].tolist()) in seen_a]
        ends = cuts(chunks_b, seen, limit=1, min_tokens=64, k=cfg.pic_k or 0)
        tag = f"irminsul-doctor-{np.random.default_rng(cfg.seed).integers(1 << 62):x}"
        reuse, fresh = tag + "-reuse", tag + "-full"
        n = cfg.tokens
        first = await self.generate(a, reuse, n)
        warm = await self.generate(b[:ends[0]], reuse, 0) if ends else None
        moved = await self.generate(b, reuse, n)
        full = await self.generate(b, fresh, n)
        prefix = await self.generate(b, fresh, n)
        replies = {"first": first, "moved": moved, "full": full, "prefix": prefix}
        lengths = {"first": len(a), "moved": len(b), "full": len(b), "prefix": len(b)}
        problems = [f"{k}: {r.problem}" for k, r in replies.items() if r.problem]
        if warm is not None and warm.problem:
            problems.append(f"pre-warm: {warm.problem}")
        problems += [f"{k}: prompt_tokens {r.meta.get('prompt_tokens')} for {lengths[k]} sent"
                     for k, r in replies.items()
                     if not r.problem and r.meta.get("prompt_tokens") != lengths[k]]
        problems += [f"{k}: {len(r.output_ids)} output_ids, asked for {n}"
                     for k, r in replies.items() if not r.problem and len(r.output_ids) != n]
        if not problems and moved.counts is not None and moved.counts.prompt_tokens != len(b):
            problems.append(f"moved: split counts {moved.counts.prompt_tokens} prompt tokens")
        add("counts add up", not problems, "; ".join(problems) or
            "prompt_tokens and output lengths right in all 4 replies; the moved request's split "
            "adds up")
        if problems:
            return DoctorReport(cfg.upstream, "server's", tuple(self.d.checks), None)
        cut = ends[0] if ends else None
        add("pre-warm point", cut is not None,
            f"b[:{cut}] sent first (content starts at token {content_start})" if cut else
            "no run of repeated chunks in the content: use a larger --content-tokens")
        add("fresh content not reported as reused",
            first.meta.get("cached_tokens") == 0 and first.counts is None,
            f"first request, fresh partition: {first.meta.get('cached_tokens')} cached, split "
            f"{first.counts}")
        mc = moved.counts
        add("content hits reported", mc is not None and mc.reused_tokens > 0,
            f"behind a new header: {mc.reused_tokens if mc else 0} of {len(b)} tokens reused"
            + (f", {mc.recomputed_tokens} recomputed" if mc else ""))
        cached = moved.meta.get("cached_tokens")
        add("exact prefix not inflated", mc is not None and cut is not None and
            cached == mc.exact_prefix_tokens <= cut,
            f"exact prefix {mc.exact_prefix_tokens if mc else cached} (the pre-warm ends at "
            f"{cut}), cached_tokens {cached}")
        add("full reuses nothing", full.meta.get("cached_tokens") == 0 and full.counts is None,
            f"fresh partition: {full.meta.get('cached_tokens')} cached, split {full.counts}")
        pc = prefix.meta.get("cached_tokens")
        add("prefix hits the exact repeat", isinstance(pc, int) and pc > content_start
            and prefix.counts is None,
            f"repeat in that partition: {pc} of {len(b)} cached, split {prefix.counts}")
        same = full.output_ids == prefix.output_ids
        add("full = prefix on an exact repeat", same, f"{n} greedy tokens identical" if same
            else f"outputs differ from token "
                 f"{round(agreement(full.output_ids, prefix.output_ids, n) * n)} on")
        found = agreement(moved.output_ids, full.output_ids, n)
        add("greedy agreement vs full", found >= cfg.min_agreement,
            f"first {round(found * n)}/{n} tokens agree ({found:.0%}; threshold "
            f"{cfg.min_agreement:.0%})")
        return DoctorReport(cfg.upstream, "server's", tuple(self.d.checks), found)


def annotation(ids: np.ndarray, caps: dict, policy: str, args: dict) -> dict:
    """The proxy's annotation for ``ids``, chunked with the server's own chunker settings."""
    fp = str(caps.get("model_fingerprint") or "")
    chunker = Chunker(ChunkerConfig.from_json(caps["chunker"]))
    chunks = chunker.split(ids, model_fingerprint=fp)
    return Annotation(num_tokens=len(ids), seq_hash=seq_hash(ids), chunks=chunks,
                      model_fingerprint=fp, policy=policy, policy_args=args,
                      session="irminsul-doctor").to_json()


def judge(add, replies: dict[str, Reply], expected: dict, content_start: int,
          cfg: DoctorConfig) -> float | None:
    """Turn the four replies into checks (via ``add``); returns the measured agreement.
    ``content_start``: where the moved content starts in the second prompt."""
    problems = []
    for name, r in replies.items():
        ids, policy = expected[name]
        c = r.counts
        if r.problem:
            problems.append(f"{name}: {r.problem}")
        elif c.prompt_tokens != len(ids) or r.meta.get("prompt_tokens") != len(ids):
            problems.append(f"{name}: prompt_tokens {c.prompt_tokens} / "
                            f"{r.meta.get('prompt_tokens')} for {len(ids)} tokens sent")
        elif c.policy != policy:
            problems.append(f"{name}: ran policy {c.policy!r}, asked for {policy!r}")
        elif len(r.output_ids) != cfg.tokens:
            problems.append(f"{name}: {len(r.output_ids)} output_ids, asked for {cfg.tokens}")
    add("counts add up", not problems, "; ".join(problems) or
        "prompt = exact prefix + reused + recomputed + new in all 4 replies, policies honoured")
    if problems:
        return None
    first, moved, full, prefix = (replies[k] for k in ("first", "moved", "full", "prefix"))
    fc, mc = first.counts, moved.counts
    start_a = fc.prompt_tokens - (mc.prompt_tokens - content_start)
    add("fresh content not reported as reused",
        fc.reused_tokens == 0 and fc.exact_prefix_tokens <= start_a,
        f"first request: {fc.reused_tokens} reused, {fc.exact_prefix_tokens} exact of "
        f"{fc.prompt_tokens} (content starts at token {start_a})")
    add("content hits reported", mc.reused_tokens > 0 and mc.chunks_hit > 0,
        f"behind a new header: {mc.reused_tokens} of {mc.prompt_tokens} tokens reused, "
        f"{mc.recomputed_tokens} recomputed, {mc.chunks_hit}/{mc.chunks_total} chunks hit")
    cached = moved.meta.get("cached_tokens")
    # The content sits at new positions after a header no earlier prompt ended with, so an
    # exact prefix reaching into it would be content reuse counted as exact.
    add("exact prefix not inflated", mc.exact_prefix_tokens <= content_start and
        cached == mc.exact_prefix_tokens,
        f"exact prefix {mc.exact_prefix_tokens} (content starts at token {content_start}), "
        f"cached_tokens {cached}")
    full_c, pre_c = full.counts, prefix.counts
    add("full reuses nothing", full_c.saved_tokens == 0,
        f"full: {full_c.exact_prefix_tokens} exact + {full_c.reused_tokens} reused")
    add("prefix hits the exact repeat", pre_c.exact_prefix_tokens > 0 and pre_c.reused_tokens == 0,
        f"prefix: {pre_c.exact_prefix_tokens} of {pre_c.prompt_tokens} from the exact prefix, "
        f"{pre_c.reused_tokens} reused")
    same = full.output_ids == prefix.output_ids
    first_diff = round(agreement(full.output_ids, prefix.output_ids, cfg.tokens) * cfg.tokens)
    add("full = prefix on an exact repeat", same,
        f"{cfg.tokens} greedy tokens identical" if same else
        f"outputs differ from token {first_diff} on")
    found = agreement(moved.output_ids, full.output_ids, cfg.tokens)
    add(f"greedy agreement {mc.policy} vs full", found >= cfg.min_agreement,
        f"first {round(found * cfg.tokens)}/{cfg.tokens} tokens agree ({found:.0%}; "
        f"threshold {cfg.min_agreement:.0%})")
    return found


async def run_doctor(cfg: DoctorConfig) -> DoctorReport:
    """Run every check against ``cfg.upstream``. Raises DoctorUnreachable when the server
    does not answer; a server that answers wrongly gives FAIL checks, not exceptions."""
    timeout = aiohttp.ClientTimeout(total=cfg.timeout)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await Doctor(cfg, session).run()
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as e:
        raise DoctorUnreachable(f"cannot reach {cfg.upstream}: {e or type(e).__name__}") from e
