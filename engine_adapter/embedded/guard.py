"""The engine's start-up self-check: is content reuse safe to serve on this model?

Two checks, both cheap (well under a second on the tiny model on CPU):

1. δ-rotation against the model's own RoPE: random vectors are rotated by the library's rotary
   embedding (the module the attention layers call) at random positions; moving them with
   ``kernels.rope.delta_rotate`` must land on the library's result at the new positions
   (relative error <= ``check_rope_tol``: 1e-5 by default, above the ~2e-7 seen on CPU and CUDA
   and far below what an off-by-one position or a wrong YaRN factor gives), and
   ``apply_rope`` must match the library at the source positions (the RopeSpec read from the
   config is the one the model uses).
2. A probe: one prompt whose reused chunk moved (a longer header before it, a question after)
   is run with the configured reuse policy and with ``full`` on a scratch store; the KL of
   the first-token distributions and the greedy agreement must stay within the engine's
   quality gate (gate.py: the model's irminsul.json, config values winning over it).

If either fails, the engine serves ``prefix`` (bit-exact) for every request and reports why.
The check never touches the engine's store or counters.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import torch

from ...kernels.rope import apply_rope, delta_rotate
from .planner import PolicyArgs
from .probe import Prober, agreement, kl_divergence
from .store import ChunkStore

log = logging.getLogger(__name__)

REUSE_POLICIES = ("pic", "blend", "clip")
_HEADERS = ("Session started 2025-01-01 09:00. Working directory: /srv/app\n",
            ("Session started 2025-03-17 18:42:07 for user maria. Working directory: "
            "/home/maria/projects/app, branch feature/cache, 3 files changed\n"))
_BODY = ("# Deploy notes\n\nThe service reads its settings from config.toml at start. The "
         "cache directory must be writable; the key for the staging cluster is ORCHID-7741. "
         "Logs rotate daily and are kept for fourteen days. To roll back, stop the worker, "
         "restore the previous release folder and start it again. Health checks poll /health "
         "every ten seconds; three failures restart the container.\n")
_QUESTION = "What is the key for the staging cluster?"


class CheckResult(NamedTuple):
    """The self-check's outcome: ``ok`` False means the engine serves ``prefix`` only."""

    ok: bool
    requested_policy: str
    served_policy: str
    reasons: tuple[str, ...]  # why it failed (empty when ok)
    rope_error: float  # max relative error of δ-rotation against the library's RoPE
    probe_kl: float | None  # KL(full || policy) at the first generated position
    probe_agreement: float | None  # greedy agreement over the probe's tokens
    probe_reused: int  # tokens the probe reused (0: the probe could not exercise reuse)
    seconds: float
    gate_source: str = "default"  # where the thresholds came from (Gate.source)

    def to_json(self) -> dict[str, Any]:
        return self._asdict() | {"reasons": list(self.reasons)}


def _library_rope(runner, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [T, dim] rotated as the model's own attention rotates k_pe."""
    rot = runner.model.model.rotary_emb
    pe = rot(x, positions[None])
    if runner.config.model_type == "deepseek_v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb

        return apply_rotary_emb(x[None, None], x[None, None], pe)[1][0, 0]
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3

    fn = (v3.apply_rotary_pos_emb_interleave if getattr(runner.config, "rope_interleave", True)
          else v3.apply_rotary_pos_emb)
    return fn(x[None, None], x[None, None], *pe)[1][0, 0]


def rope_error(runner, max_position: int, tokens: int = 256, seed: int = 0) -> float:
    """Max relative error (per token: max abs error / max abs value) of apply_rope and of
    δ-rotation against the library's RoPE at random positions below ``max_position``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, runner.spec.dim, generator=g).to(runner.device)
    src = torch.randint(0, max_position, (tokens,), generator=g).to(runner.device)
    dst = torch.randint(0, max_position, (tokens,), generator=g).to(runner.device)
    with torch.inference_mode():
        stored, fresh = _library_rope(runner, x, src), _library_rope(runner, x, dst)
        pairs = ((apply_rope(x, src, runner.spec), stored),
                 (delta_rotate(stored, src, dst, runner.spec), fresh))
        return max(float(((got.float() - ref.float()).abs().amax(-1)
                          / ref.float().abs().amax(-1).clamp_min(1e-30)).max())
                   for got, ref in pairs)


def _probe(engine, policy: str, args: PolicyArgs, new_tokens: int):
    tok = engine.tokenizer
    msgs = [{"role": "system", "content": _HEADERS[0]}, {"role": "user", "content": _BODY}]
    before = tok.encode_chat(msgs, add_generation_prompt=False)
    msgs = [{"role": "system", "content": _HEADERS[1]}, {"role": "user", "content": _BODY},
            {"role": "user", "content": _QUESTION}]
    after = tok.encode_chat(msgs)
    prober, store = Prober.of(engine), ChunkStore(1 << 30)
    prober.warm(store, before.ids, before.anchors)
    got = prober.run(store, after.ids, after.anchors, policy, args, new_tokens)
    ref = prober.run(ChunkStore(0), after.ids, after.anchors, "full", args, new_tokens)
    return kl_divergence(ref.logits, got.logits), agreement(ref.tokens, got.tokens), got.counts


def self_check(engine) -> CheckResult:
    """Run both checks for ``engine`` (its config names the policy, ``engine.gate`` the
    thresholds); log the outcome. Does not change the engine: the caller applies
    ``served_policy``."""
    cfg, gate, t0 = engine.config, engine.gate, time.perf_counter()
    reasons: list[str] = []
    max_pos = min(int(getattr(engine.runner.config, "max_position_embeddings", 0)
                      or cfg.max_seq_len), cfg.max_seq_len)
    err = rope_error(engine.runner, max(max_pos, 2))
    if not err <= cfg.check_rope_tol:
        reasons.append(f"δ-rotation differs from the model's RoPE by {err:.3g} (relative; "
                       f"limit {cfg.check_rope_tol:g})")
    kl = agree = None
    reused = 0
    if cfg.policy in REUSE_POLICIES:
        kl, agree, counts = _probe(engine, cfg.policy, engine.defaults_for(cfg.policy),
                                   gate.tokens)
        reused = counts.reused_tokens
        if not kl <= gate.max_kl:
            reasons.append(f"probe: KL(full || {cfg.policy}) {kl:.4f} nats above the limit "
                           f"{gate.max_kl:g} ({gate.source} gate)")
        if not agree >= gate.min_agreement:
            reasons.append(f"probe: greedy agreement with full {agree:.2f} below the limit "
                           f"{gate.min_agreement:g} ({gate.source} gate)")
    ok = not reasons
    served = cfg.policy if ok else "prefix"
    result = CheckResult(ok, cfg.policy, served, tuple(reasons), err, kl, agree, reused,
                         round(time.perf_counter() - t0, 4), gate.source)
    if ok:
        log.info("self-check passed for policy %s (rope error %.2g, probe KL %s, agreement "
                 "%s; %s)", cfg.policy, err, _fmt(kl), _fmt(agree), gate.describe())
    else:
        log.warning("self-check failed, serving prefix only instead of %s: %s (%s)",
                    cfg.policy, "; ".join(reasons), gate.describe())
    return result


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
