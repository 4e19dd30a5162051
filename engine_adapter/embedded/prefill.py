"""Executing a Plan: fill the KV buffer from the store, compute the rest, store the result."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from ...kernels.rope import Segment, materialize
from .model_runner import KVBuffer, ModelRunner
from .planner import RECOMPUTED, REUSED, Plan
from .store import ChunkStore, KVEntry

if TYPE_CHECKING:
    from .clip import ClipJob


class PrefillOutcome(NamedTuple):
    logits: torch.Tensor  # float32 [vocab] at the last prompt position
    source: np.ndarray  # the plan's sources with blend's / clip's picks marked RECOMPUTED
    kv: KVBuffer  # holds the prompt's KV in slots [0, N)


def run_prefill(runner: ModelRunner, plan: Plan, capacity: int,
                clip: ClipJob | None = None) -> PrefillOutcome:
    """Build the prompt's KV per ``plan`` in a new buffer of ``capacity`` slots. A clip plan
    needs ``clip``, the auxiliary model's forward over the prompt (clip.AuxModel.start)."""
    n = len(plan.ids)
    kv = runner.new_kv(max(capacity, n))
    place(runner, plan, kv)
    kv.length = n
    ids = torch.from_numpy(plan.ids.astype(np.int64))
    source = plan.source.copy()
    if plan.policy == "clip" and len(plan.blend_candidates):
        if clip is None:
            raise ValueError("a clip plan needs the auxiliary model's job (clip=)")
        h, picked = _clip(runner, plan, kv, ids, clip)
        source[picked] = RECOMPUTED
    elif plan.policy != "blend" or len(plan.blend_candidates) == 0:
        q = torch.from_numpy(plan.compute)
        h = runner.run_layers(kv, runner.embed(ids[q]), q, 0, runner.num_layers)
    else:
        q, picked = _blend(runner, plan, kv, ids)
        source[picked] = RECOMPUTED
        h = runner.run_layers(kv, q[1], q[0], 1, runner.num_layers)
    return PrefillOutcome(runner.logits(h[:, -1:])[0], source, kv)


def place(runner: ModelRunner, plan: Plan, kv: KVBuffer) -> None:
    """Fill kv's slots from the store: the exact prefix as it is, placements δ-rotated.

    ``runner.placement`` "triton": the fused kernel, one launch for the whole request (prefix
    parts are segments with no position change); "torch": plain copies plus the torch
    reference (the CPU path and the oracle the kernel is tested against)."""
    prefix, done = [], 0
    for entry, used in plan.prefix.parts:  # exact prefix: same positions, plain copy
        used = min(used, plan.prefix_len - done)
        if used <= 0:
            break
        prefix.append(Segment(entry.c_kv[:, :used], entry.k_pe[:, :used], done, done, done))
        done += used
    segments = []
    for p in plan.placements:
        sl = slice(p.offset, p.offset + p.length)
        seg = Segment(p.entry.c_kv[:, sl], p.entry.k_pe[:, sl], p.entry.position + p.offset,
                      p.start, p.start)
        # Same position (the trie's approximate tail, a chunk where it was): a plain copy,
        # bit for bit what was stored.
        (prefix if seg.src_position == seg.dst_position else segments).append(seg)
    if runner.placement == "triton":
        from ...kernels.materialize_triton import materialize_segments_triton

        materialize_segments_triton(kv.c_kv, kv.k_pe, prefix + segments, runner.spec)
        return
    for s in prefix:
        n = s.c_kv.shape[1]
        kv.c_kv[:, s.dst_slot : s.dst_slot + n] = s.c_kv
        kv.k_pe[:, s.dst_slot : s.dst_slot + n] = s.k_pe
    materialize(kv.c_kv, kv.k_pe, segments, runner.spec)


def _blend(runner: ModelRunner, plan: Plan, kv: KVBuffer, ids: torch.Tensor):
    """CacheBlend's selection. Layer 0 runs for every non-prefix token (its KV depends only on
    the token and position); the placed tokens whose fresh layer-1 latents differ most from the
    placed ones are picked. Returns ((positions, layer-0 hidden) to run in layers 1..; picks)."""
    q0 = torch.arange(plan.prefix_len, len(plan.ids))
    h0 = runner.run_layers(kv, runner.embed(ids[q0]), q0, 0, 1)
    cand = torch.from_numpy(plan.blend_candidates)
    if runner.num_layers > 1 and plan.blend_count < len(cand):
        dev = cand.to(runner.device)
        c_new, k_new = runner.probe_kv(1, h0[:, dev - plan.prefix_len], dev)
        score = (c_new.float() - kv.c_kv[1, dev].float()).square().sum(-1)
        score += (k_new.float() - kv.k_pe[1, dev].float()).square().sum(-1)
        picked = cand[score.topk(plan.blend_count).indices.cpu()]
    else:
        picked = cand
    q1 = torch.from_numpy(np.union1d(plan.compute, picked.numpy()))
    return (q1, h0[:, (q1 - plan.prefix_len).to(runner.device)]), picked.numpy()


def _clip(runner: ModelRunner, plan: Plan, kv: KVBuffer, ids: torch.Tensor, job: ClipJob):
    """CacheClip. The computed tokens before the first placed one attend only to the prefix and
    each other, so they run first, through every layer, while the auxiliary model (on its own
    thread when this runner is on a GPU) is still reading the prompt; then the picks join the
    remaining computed tokens: two query blocks, as run_layers splits long ones (a later block
    sees the slots an earlier one wrote), so the result is one pass's up to rounding.
    Returns (last hidden state, picked positions)."""
    first = int(plan.blend_candidates[0])
    head = plan.compute[plan.compute < first]
    if len(head):
        q = torch.from_numpy(head)
        runner.run_layers(kv, runner.embed(ids[q]), q, 0, runner.num_layers)
    picked = job.pick(plan.blend_candidates, plan.blend_count)
    q = torch.from_numpy(np.union1d(plan.compute[plan.compute > first], picked))
    return runner.run_layers(kv, runner.embed(ids[q]), q, 0, runner.num_layers), picked


def commit(store: ChunkStore, plan: Plan, outcome: PrefillOutcome, namespace: str = "",
           approximate: bool = False) -> list[tuple[str, KVEntry]] | None:
    """Store the prompt's chunks: the exactly computed leading chunks extend the prefix trie,
    chunks without a content hit enter the content index (one entry shared by both).
    ``approximate`` (content policies only): the chunks from the first reused token on extend
    the trie too, as its approximate tail, with the KV this prefill composed there (a hit
    chunk's own copy: placed, carved, at this position).
    Returns the trie path [(chunk key, entry)] if the whole prompt is exact, else None."""
    kv, source = outcome.kv, outcome.source
    reused = np.flatnonzero(source == REUSED)
    exact_end = int(reused[0]) if reused.size else len(plan.ids)
    approximate = approximate and plan.policy in ("pic", "blend", "clip")
    # Trie edges this prompt matched whole, by start position: reused as they are.
    edges = {e.position: e for e, used in plan.prefix.parts if used == len(e)}
    tails = {e.position: e for e, off, used in plan.prefix.tail if off + used == len(e)}
    hits = set(plan.hit_chunks)
    path: list[tuple[str, KVEntry]] = []
    n_exact = 0  # path entries before the approximate tail
    for i, ref in enumerate(plan.chunks):
        exact = ref.end <= exact_end
        entry = edges.get(ref.start)
        if entry is None or len(entry) != ref.end - ref.start or ref.end > plan.prefix_len:
            entry = None
            tail = tails.get(ref.start) if approximate and not exact else None
            if tail is not None and len(tail) == ref.end - ref.start:
                entry = tail  # placed as it was: this path's KV is that entry's
            elif i not in hits or exact or approximate:
                entry = KVEntry(plan.ids[ref.start : ref.end], ref.start,
                                kv.c_kv[:, ref.start : ref.end].clone(),
                                kv.k_pe[:, ref.start : ref.end].clone(),
                                prev_key=plan.chunks[i - 1].key if i else None)
        if entry is not None and (exact or approximate) and len(path) == i:
            path.append((ref.key, entry))
            n_exact += exact
        if entry is not None and i not in hits:
            store.put(ref.key, entry)
    if path:
        store.insert_prefix(namespace, path, approximate_from=n_exact if approximate else None)
    return path if exact_end == len(plan.ids) else None
