"""The embedded engine: one model, one chunk KV store, requests served one at a time.

A request is planned (planner.py), prefilled with reuse (prefill.py), its chunks stored, and
then decoded token by token with the KV buffer growing at the end.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ...chunking.fingerprint import model_fingerprint
from ...chunking.keys import Chunker, chunk_key
from ...chunking.tokenizer import ModelTokenizer
from ..contract import Annotation, ChunkRef, ReuseCounts
from .audit import Auditor
from .clip import AuxModel, check_tokenizer
from .config import POLICIES, EngineConfig
from .gate import read_gate_file, resolve_gate
from .guard import REUSE_POLICIES, CheckResult, self_check
from .model_runner import ModelRunner
from .planner import PolicyArgs, make_plan, policy_args
from .prefill import commit, run_prefill
from .store import ChunkStore, KVEntry


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; temperature 0 is greedy. top_k 0 and top_p 1 are off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not all(is_int(t) for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be integers")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")


class StepOutput(NamedTuple):
    token_id: int | None  # None only on a zero-token result (max_new_tokens == 0)
    counts: ReuseCounts | None  # set on the first output of a request
    prefill_seconds: float | None  # set on the first output
    finish_reason: str | None  # "stop" | "length" on the last output


class PrefillResult(NamedTuple):
    logits: torch.Tensor  # float32 [vocab] at the last prompt position, on the CPU
    counts: ReuseCounts
    seconds: float


class Engine:
    """Loads ``config.model_dir`` and serves requests; every call holds one re-entrant lock,
    so calls from several threads run one after another (a generation holds it until its
    iterator is exhausted or closed)."""

    policies = POLICIES

    def __init__(self, config: EngineConfig):
        self.config = config
        root = Path(config.model_dir)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"{root / 'config.json'} not found: not a model directory")
        self.hf_config: dict[str, Any] = json.loads((root / "config.json").read_text())
        read_gate_file(root)  # a bad irminsul.json fails here, before the model loads
        aux = config.clip_dir  # CacheClip's auxiliary model: checked before the big load
        if aux is None and config.policy == "clip":
            raise ValueError(f"policy clip needs an auxiliary model sharing the tokenizer: "
                             f"there is no {root / 'aux'} folder; set clip_model_dir")
        if aux is not None and not (aux / "config.json").is_file():
            raise FileNotFoundError(f"clip: auxiliary model {aux}: no config.json")
        self.runner = ModelRunner(root, config.device, config.dtype,
                                  config.attn_implementation, config.prefill_block,
                                  config.placement, config.prefill_attention,
                                  config.absorbed_max_queries, config.cuda_graphs,
                                  config.max_seq_len, config.attention_kernel)
        self.tokenizer = ModelTokenizer.from_dir(root)
        if self.tokenizer.vocab_size > self.runner.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {self.runner.vocab_size}")
        self.model_name = root.resolve().name
        self.model_fingerprint = model_fingerprint(root)
        self.store = ChunkStore(config.cache_bytes)
        self.chunker = Chunker(config.chunker)
        self.defaults = PolicyArgs(config.pic_k, config.blend_r)
        self.clip: AuxModel | None = None
        if aux is not None:
            check_tokenizer(aux, root)
            self.clip = AuxModel(aux, self.tokenizer.vocab_size, config.clip_queries,
                                 config.clip_window, config.clip_device)
        self._lock = threading.RLock()
        self._requests = 0
        self._annotations_used = self._annotations_ignored = 0
        self._totals = dict.fromkeys(_COUNT_FIELDS, 0)
        self._prefill_seconds = 0.0
        self._generated = 0
        # The thresholds reuse must meet: config values, else MODEL/irminsul.json (gate.py).
        self.gate = resolve_gate(config, str(self.runner.dtype).removeprefix("torch."))
        # The start-up self-check (guard.py); a failed one makes every request use prefix.
        self.check: CheckResult | None = self_check(self) if config.self_check else None
        # Quality audits of served requests (audit.py); past its threshold, prefix too.
        self.audits = Auditor(config, self.model_name, gate=self.gate)

    # ---- public API ----------------------------------------------------------------------
    def generate(self, ids, params: SamplingParams, *, annotation: Annotation | None = None,
                 anchors: Sequence[int] = (), namespace: str = "", policy: str | None = None,
                 policy_args: dict | None = None, request_id: str | None = None
                 ) -> Iterator[StepOutput]:
        """Prefill ``ids`` with reuse, then decode. Arguments are checked now (ValueError);
        the work happens while iterating. The first output carries the counts and prefill
        time; max_new_tokens=0 yields one token-less output (the prompt's KV is stored).
        ``request_id`` names the request in its audit row, if it is audited."""
        arr = self._check_ids(ids)
        name, args = self._policy(policy, policy_args)
        return self._generate(arr, params, annotation, tuple(anchors), namespace, name, args,
                              request_id)

    def prefill(self, ids, *, annotation: Annotation | None = None,
                anchors: Sequence[int] = (), namespace: str = "", policy: str | None = None,
                policy_args: dict | None = None) -> PrefillResult:
        """Prefill only (stores the prompt's KV); returns the last position's logits."""
        arr = self._check_ids(ids)
        name, args = self._policy(policy, policy_args)
        with self._lock:
            outcome, plan, seconds, _ = self._prefill(arr, annotation, tuple(anchors),
                                                      namespace, name, args, capacity=len(arr))
            return PrefillResult(outcome.logits.cpu(), plan.counts, seconds)

    def flush_cache(self) -> None:
        """Drop every stored chunk and prefix."""
        with self._lock:
            self.store.clear()

    def idle_work(self) -> bool:
        """Run one queued quality audit (the worker calls this only while no job waits);
        False when there was none."""
        if not self.audits.pending:
            return False
        with self._lock:
            return self.audits.run_one(self.runner)

    def stats(self) -> dict[str, Any]:
        """JSON-ready counters: store, requests, summed reuse counts."""
        with self._lock:
            return {
                "engine": {
                    "model": self.model_name, "device": str(self.runner.device),
                    "dtype": str(self.runner.dtype).removeprefix("torch."),
                    "policy": self.served_policy, "requests": self._requests,
                    "generated_tokens": self._generated,
                    "prefill_seconds": round(self._prefill_seconds, 6),
                    "annotations_used": self._annotations_used,
                    "annotations_ignored": self._annotations_ignored,
                    "kv_bytes_per_token": self.runner.kv_bytes_per_token(),
                    "cuda_graphs": None if self.runner.graphs is None
                    else self.runner.graphs.stats(),
                },
                "reuse": dict(self._totals),
                "store": self.store.stats()._asdict(),
                "self_check": None if self.check is None else self.check.to_json(),
                "gate": self.gate.to_json(),
                "audit": self.audits.snapshot(),
            }

    @property
    def available_policies(self) -> tuple[str, ...]:
        """The policies a request may name: all but clip when there is no auxiliary model."""
        return tuple(p for p in POLICIES if p != "clip" or self.clip is not None)

    @property
    def served_policy(self) -> str:
        """The default policy in force: the configured one, or prefix after a failed check
        or a failed quality audit window."""
        if self.audits.tripped and self.config.policy in REUSE_POLICIES:
            return "prefix"
        return self.config.policy if self.check is None else self.check.served_policy

    @property
    def _clip_background(self) -> bool:
        """The auxiliary model on the CPU overlaps a GPU prefill; else it runs first."""
        return self.runner.device.type == "cuda" and self.clip.device.type == "cpu"

    def defaults_for(self, policy: str) -> PolicyArgs:
        """The policy arguments a request gets when it gives none (clip's r is clip_r)."""
        return self.defaults._replace(r=self.config.clip_r) if policy == "clip" else self.defaults

    # ---- internals -----------------------------------------------------------------------
    def _generate(self, ids, params, annotation, anchors, namespace, name, args, request_id):
        with self._lock:
            # The context limit counts output tokens too, as SGLang's does.
            n_out = min(params.max_new_tokens, self.config.max_seq_len - len(ids))
            # Room for a few output tokens; the buffer grows if the output runs longer.
            outcome, plan, seconds, path = self._prefill(
                ids, annotation, anchors, namespace, name, args,
                capacity=len(ids) + min(n_out, _FIRST_OUTPUT_SLOTS))
            audit = self.audits.begin(request_id, ids, plan.counts, plan.policy, plan.args,
                                      outcome.logits)
            if n_out == 0:
                if audit is not None:
                    self.audits.submit(audit)
                yield StepOutput(None, plan.counts, seconds, "length")
                return
            stops = set(params.stop_token_ids)
            if not params.ignore_eos:
                stops.update(self.tokenizer.eos_token_ids)
            gen = None if params.seed is None else torch.Generator().manual_seed(params.seed)
            runner, kv, logits = self.runner, outcome.kv, outcome.logits
            fed: list[int] = []  # output tokens whose KV is in kv (all but the last)
            try:
                for i in range(n_out):
                    tok = sample(logits, params, gen)
                    self._generated += 1
                    if audit is not None:
                        audit.step(logits, tok)
                    finish = "stop" if tok in stops else "length" if i + 1 == n_out else None
                    first = i == 0
                    yield StepOutput(tok, plan.counts if first else None,
                                     seconds if first else None, finish)
                    if finish is not None:
                        return
                    kv.reserve(len(ids) + i + 1)
                    pos = torch.tensor([len(ids) + i])
                    h = runner.run_layers(kv, runner.embed(torch.tensor([tok])), pos, 0,
                                          runner.num_layers)
                    logits = runner.logits(h)[0]
                    fed.append(tok)
            finally:  # also when the consumer closes the iterator early
                if path is not None and fed:
                    self._store_output(ids, fed, kv, path, namespace)
                if audit is not None:
                    self.audits.submit(audit)

    def _store_output(self, ids, fed, kv, path, namespace) -> None:
        """Extend the prompt's trie path with the decoded tokens' KV (exact when the prompt
        was), so a next turn that repeats the reply gets it as exact prefix, as a radix
        cache does."""
        n, out = len(ids), np.asarray(fed, dtype=np.int32)
        key = chunk_key(out, namespace=namespace, model_fingerprint=self.model_fingerprint)
        entry = KVEntry(out, n, kv.c_kv[:, n : n + len(out)].clone(),
                        kv.k_pe[:, n : n + len(out)].clone())
        self.store.insert_prefix(namespace, [*path, (key, entry)])

    def _prefill(self, ids, annotation, anchors, namespace, name, args, capacity):
        """Plan, prefill and store ``ids``: (outcome, plan, seconds, exact trie path or None)."""
        t0 = time.perf_counter()
        # clip: the auxiliary forward starts first (on its thread when the model is on a GPU).
        job = None if name != "clip" else self.clip.start(ids, self._clip_background)
        chunks = self._chunks(ids, annotation, anchors, namespace)
        approx = self.config.approx_trie
        plan = make_plan(self.store, ids, chunks, policy=name, args=args, namespace=namespace,
                         approximate=approx)
        try:
            outcome = run_prefill(self.runner, plan, capacity, job)
            path = commit(self.store, plan, outcome, namespace, approximate=approx)
        finally:
            self.store.release(plan.entries)
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        seconds = time.perf_counter() - t0
        self._requests += 1
        self._prefill_seconds += seconds
        for f in _COUNT_FIELDS:
            self._totals[f] += getattr(plan.counts, f)
        return outcome, plan, seconds, path

    def _chunks(self, ids, annotation, anchors, namespace) -> tuple[ChunkRef, ...]:
        """The annotation's chunks if it was made for these IDs with this model's keys;
        otherwise chunks derived here (keeping a matching annotation's anchors)."""
        if annotation is not None and annotation.matches(ids):
            chunks = tuple(annotation.chunks)
            if (chunks and annotation.model_fingerprint == self.model_fingerprint
                    and _tiles(chunks, len(ids))):
                self._annotations_used += 1
                return chunks
            anchors = annotation.anchors or anchors
        if annotation is not None:
            self._annotations_ignored += 1
        return self.chunker.split(ids, anchors=anchors, namespace=namespace,
                                  model_fingerprint=self.model_fingerprint)

    def _check_ids(self, ids) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("the prompt must be a non-empty 1-D sequence of token IDs")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token IDs must be integers, got {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.runner.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token ID {bad} outside the vocabulary [0, {self.runner.vocab_size})")
        if arr.size > self.config.max_seq_len:
            raise ValueError(f"prompt of {arr.size} tokens exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        return arr.astype(np.int32)

    def _policy(self, policy, args) -> tuple[str, PolicyArgs]:
        name = self.config.policy if policy is None else policy
        parsed = policy_args(name, args, self.defaults_for(name))
        if name == "clip" and self.clip is None:
            raise ValueError("policy clip needs an auxiliary model; this engine has none "
                             f"(no {Path(self.config.model_dir) / 'aux'}, no clip_model_dir)")
        if name in REUSE_POLICIES and ((self.check is not None and not self.check.ok)
                                       or self.audits.tripped):
            name = "prefix"  # the self-check or the audits found content reuse unsafe here
        return name, parsed


_FIRST_OUTPUT_SLOTS = 256
_COUNT_FIELDS = ("prompt_tokens", "exact_prefix_tokens", "reused_tokens", "recomputed_tokens",
                 "new_tokens", "chunks_total", "chunks_hit")


def _tiles(chunks: tuple[ChunkRef, ...], n: int) -> bool:
    """True if the chunks cover [0, n) in order without gaps or overlaps."""
    end = 0
    for c in chunks:
        if c.start != end or c.end <= c.start:
            return False
        end = c.end
    return end == n


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from float32 logits [vocab]: greedy at temperature 0, else top-k / top-p."""
    if params.temperature == 0 or params.top_k == 1:
        return int(torch.argmax(logits))
    x = logits.float().cpu() / params.temperature
    if params.top_k > 0 and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keeps the token that crosses top_p
        x = x.scatter(0, order[drop], float("-inf"))
    return int(torch.multinomial(torch.softmax(x, dim=-1), 1, generator=gen))
