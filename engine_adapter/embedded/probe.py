"""One prompt under one policy on a given store, without changing the store or the engine.

The quality harness (quality.py) and the start-up self-check (guard.py) compare policies on
the same prompt against the same warmed store. Engine.prefill/generate commit each prompt's
chunks, so a second policy would see a different store; here the plan and the prefill are the
engine's own (planner.make_plan, prefill.run_prefill) but nothing is committed, and greedy
decoding runs the same layer calls as Engine._generate. ``warm`` is the one call that stores.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..contract import ReuseCounts
from .model_runner import ModelRunner
from .planner import PolicyArgs, make_plan
from .prefill import commit, run_prefill
from .store import ChunkStore


class PolicyRun(NamedTuple):
    """What one policy produced for one prompt."""

    logits: torch.Tensor  # float32 [vocab] at the first generated position, on the CPU
    tokens: tuple[int, ...]  # greedy tokens (first one is argmax of ``logits``)
    counts: ReuseCounts
    prefill_seconds: float  # chunking + planning + prefill, as Engine._prefill times it
    # at each generated position, how far the greedy token's log-probability lies above the
    # runner-up's (nats): where a reference run's margin is small, another run choosing
    # differently is a near tie flipped, not the content lost
    margins: tuple[float, ...]


class Prober:
    """A model runner plus how the engine chunks prompts (``engine.runner``, ``engine.chunker``
    and ``engine.model_fingerprint``) and its clip auxiliary model (``engine.clip``, None:
    the clip policy cannot run); holds no state of its own."""

    def __init__(self, runner: ModelRunner, chunker, model_fingerprint: str, clip=None):
        self.runner, self.chunker, self.fingerprint = runner, chunker, model_fingerprint
        self.clip = clip

    @classmethod
    def of(cls, engine) -> Prober:
        return cls(engine.runner, engine.chunker, engine.model_fingerprint,
                   getattr(engine, "clip", None))

    def _chunks(self, ids: np.ndarray, anchors: Sequence[int]):
        return self.chunker.split(ids, anchors=tuple(anchors), namespace="",
                                  model_fingerprint=self.fingerprint)

    def warm(self, store: ChunkStore, ids, anchors: Sequence[int] = ()) -> None:
        """Prefill ``ids`` with ``full`` and store its chunks and prefix in ``store``, as an
        earlier request to the engine would."""
        ids = np.asarray(ids, dtype=np.int32)
        plan = make_plan(store, ids, self._chunks(ids, anchors), policy="full",
                         args=PolicyArgs())
        try:
            commit(store, plan, run_prefill(self.runner, plan, len(ids)))
        finally:
            store.release(plan.entries)

    def run(self, store: ChunkStore, ids, anchors: Sequence[int], policy: str,
            args: PolicyArgs, new_tokens: int) -> PolicyRun:
        """Prefill ``ids`` under ``policy`` reading (never changing) ``store``, then decode
        ``new_tokens`` greedy tokens (EOS ignored, so every policy yields the same count)."""
        if new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
        ids = np.asarray(ids, dtype=np.int32)
        runner, n = self.runner, len(ids)
        if policy == "clip" and self.clip is None:
            raise ValueError("policy clip needs an auxiliary model; the engine has none")
        t0 = time.perf_counter()
        # As Engine._prefill: the auxiliary forward first, in the background on a GPU engine.
        job = None
        if policy == "clip":
            job = self.clip.start(ids, runner.device.type == "cuda"
                                  and self.clip.device.type == "cpu")
        plan = make_plan(store, ids, self._chunks(ids, anchors), policy=policy, args=args)
        try:
            outcome = run_prefill(runner, plan, n + new_tokens, job)
        finally:
            store.release(plan.entries)
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        seconds = time.perf_counter() - t0
        first = outcome.logits.float().cpu()
        logits, kv, tokens, margins = outcome.logits, outcome.kv, [], []
        for i in range(new_tokens):
            tok = int(torch.argmax(logits))
            tokens.append(tok)
            # a logit gap is the log-probability gap: softmax's normaliser cancels
            top2 = torch.topk(logits.float(), 2).values
            margins.append(float(top2[0] - top2[1]))
            if i + 1 == new_tokens:
                break
            pos = torch.tensor([n + i])
            h = runner.run_layers(kv, runner.embed(torch.tensor([tok])), pos, 0,
                                  runner.num_layers)
            logits = runner.logits(h)[0]
        return PolicyRun(first, tuple(tokens), plan.counts, seconds, tuple(margins))


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(P || Q) in nats of the softmax distributions of two float logit vectors."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return max(0.0, float((lp.exp() * (lp - lq)).sum()))


def first_difference(reference: Sequence[int], tokens: Sequence[int]) -> int | None:
    """The first position where two greedy sequences differ (None: they agree throughout)."""
    for i, (a, b) in enumerate(zip(reference, tokens)):
        if a != b:
            return i
    return None


def agreement(reference: Sequence[int], tokens: Sequence[int]) -> float:
    """Fraction of positions where two greedy sequences agree, counted up to the first
    difference (after it the contexts differ, so later matches mean little)."""
    if not reference:
        return 1.0
    at = first_difference(reference, tokens)
    return (min(len(reference), len(tokens)) if at is None else at) / len(reference)
