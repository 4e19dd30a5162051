"""CUDA graphs of the decoder stack for blocks of few queries: pic's recomputed tokens and
decode steps, replayed without the host.

Why: on an H100 a pic request at 8K tokens was bound by the host, not the GPU (the GPU was
busy 46 of 153 ms; a request recomputing one token still took ~70 ms: bench/NOTES.md). A
block of a few hundred queries launches ~50 small kernels per layer through Python, 27
layers deep. A CUDA graph records those launches once per shape and replays them in one
call; the kernels are the same ones, so are the results (the library's modules and the
absorbed attention run unchanged while recording).

A graph is fixed in its tensors' shapes and addresses, hence:
- queries are padded to a bucket (``query_bucket``). Padded queries sit at the arena's
  scratch slot, past every slot a graph shows, so their KV writes land there and no real
  query attends to them; their outputs are dropped. Every token's MLP, MoE and norms are
  per-token, so padding changes nothing for the real queries;
- the visible slots are padded to a bucket (``slot_bucket``); as in the eager path, query
  at position p sees slots <= p, so the extra slots are masked;
- the KV lives in one arena owned here, lent to one request at a time (the engine serves
  one request at a time). A request that gets another buffer (arena lent, or larger than
  it; a buffer grown past it) runs eagerly: speed changes, never results.

On a CPU (``capture=False``, the tests' mode) the same padded blocks run eagerly over the
same static buffers, so the padding, masking and arena logic is checked without a GPU.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model_runner import KVBuffer, ModelRunner

log = logging.getLogger(__name__)

MAX_GRAPHS = 256  # captured shapes kept; the oldest go first


def query_bucket(q: int) -> int:
    """Queries a block of ``q`` is padded to: powers of two up to 64, then multiples of 64
    (pic's few hundred recomputed tokens waste at most 63 padded rows)."""
    if q < 1:
        raise ValueError(f"a block needs at least one query, got {q}")
    if q <= 64:
        return 1 << (q - 1).bit_length()
    return -(-q // 64) * 64


def slot_bucket(t: int) -> int:
    """Visible slots ``t`` is padded to: multiples of an eighth of the power of two at or
    below ``t``, at least 512 (under 1/8 more slots attended past 4K; 8 shapes per doubling
    of the context)."""
    if t < 1:
        raise ValueError(f"a block sees at least one slot, got {t}")
    step = max(512, (1 << (t.bit_length() - 1)) // 8)
    return -(-t // step) * step


class _ArenaCache:
    """The ``past_key_values`` a recorded block sees: writes the block's latents into their
    slots of the arena and returns its first ``visible`` slots. Unlike the eager cache it
    leaves the per-request expansion memo alone (kept outside the graph, see run)."""

    def __init__(self, c_kv: torch.Tensor, k_pe: torch.Tensor, slots: torch.Tensor,
                 visible: int):
        self.c_kv, self.k_pe, self.slots, self.visible = c_kv, k_pe, slots, visible

    def update(self, k_nope, k_pe, layer_idx, *args, **kwargs):
        t = self.visible
        self.c_kv[layer_idx].index_copy_(0, self.slots, k_nope[0, 0])
        self.k_pe[layer_idx].index_copy_(0, self.slots, k_pe[0, 0])
        return self.c_kv[layer_idx, :t][None, None], self.k_pe[layer_idx, :t][None, None]


class _Recorded:
    """One shape: static inputs (hidden, positions), the body, and its CUDA graph (None on a
    CPU: replay runs the body)."""

    def __init__(self, hidden: torch.Tensor, positions: torch.Tensor,
                 body: Callable[[], torch.Tensor]):
        self.hidden, self.positions, self.body = hidden, positions, body
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def replay(self) -> torch.Tensor:
        if self.graph is None:
            self.out = self.body()
        else:
            self.graph.replay()
        return self.out


class Graphs:
    """The arena and the recorded shapes of one ModelRunner."""

    def __init__(self, runner: ModelRunner, max_slots: int, capture: bool):
        self.runner, self.capture = runner, capture
        # slots [0, scratch) hold tokens; slot ``scratch`` takes the padded queries' writes
        self.scratch = slot_bucket(max_slots)
        self.arena = runner.alloc_kv(self.scratch + 1)
        self._lent: weakref.ref | None = None
        self._recorded: dict[tuple[int, int, int, int, int], _Recorded] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.failed: str | None = None  # why recording stopped (then every block is eager)
        self.replays = self.recordings = 0
        self.eager_blocks = 0  # absorbed blocks that ran eagerly (arena lent, too long, ...)

    # ---- the arena ---------------------------------------------------------------------
    def lend(self, capacity: int) -> KVBuffer | None:
        """A KV buffer over the arena if it is free and ``capacity`` slots fit, else None.
        The arena is free again once that buffer is garbage (tracked by a weak reference),
        so a caller holding two buffers at once gets a fresh one for the second."""
        if capacity > self.scratch or (self._lent is not None and self._lent() is not None):
            return None
        # views without the scratch slot: a buffer that must grow past it moves out
        kv = type(self.arena)(self.arena.c_kv[:, : self.scratch],
                              self.arena.k_pe[:, : self.scratch], arena=self, wanted=capacity)
        self._lent = weakref.ref(kv)
        return kv

    def owns(self, kv: KVBuffer) -> bool:
        return kv.arena is self and kv.c_kv.data_ptr() == self.arena.c_kv.data_ptr()

    # ---- blocks --------------------------------------------------------------------------
    def run(self, kv: KVBuffer, hidden: torch.Tensor, positions: torch.Tensor, visible: int,
            first: int, last: int) -> torch.Tensor | None:
        """Layers [first, last) for queries ``hidden`` [1, q, h] at sorted ``positions`` [q]
        (on the device) seeing slots [0, visible): the output [1, q, h], or None when this
        block cannot be replayed (the caller then runs it eagerly)."""
        q = positions.numel()
        slots = slot_bucket(visible)
        if self.failed is not None or not self.owns(kv) or slots > self.scratch:
            self.eager_blocks += 1
            return None
        # the attention form and its splits are chosen per block (model_runner.attention_costs)
        key = (first, last, query_bucket(q), slots, self.runner.splits)
        rec = self._recorded.get(key)
        fresh = rec is None
        if fresh:
            rec = self._new(key)
        rec.hidden[:, :q].copy_(hidden)
        rec.hidden[:, q:].zero_()
        rec.positions[:q].copy_(positions)
        rec.positions[q:].fill_(self.scratch)
        if fresh and self.capture:
            try:
                self._record(rec)
            except Exception as e:  # noqa: BLE001  (any capture failure: serve eagerly)
                self.failed = f"{type(e).__name__}: {e}"
                self._recorded.pop(key, None)
                log.warning("CUDA graph recording failed; decoder blocks run eagerly from "
                            "now on: %s", self.failed)
                self.eager_blocks += 1
                return None
        out = rec.replay()[:, :q].clone()  # the static output is the next replay's
        self.replays += 1
        # the dense path's per-head expansions of these slots are stale now
        kv.expanded[first:last, positions] = False
        return out

    def _new(self, key: tuple[int, int, int, int, int]) -> _Recorded:
        first, last, queries, slots, _ = key
        r = self.runner
        hidden = torch.zeros(1, queries, r.config.hidden_size, dtype=r.dtype, device=r.device)
        positions = torch.zeros(queries, dtype=torch.long, device=r.device)
        cache = _ArenaCache(self.arena.c_kv, self.arena.k_pe, positions, slots)
        arange = torch.arange(slots, device=r.device)
        low = torch.finfo(r.dtype).min

        def body() -> torch.Tensor:
            # padded rows (at the scratch slot, past every shown slot) see every slot: their
            # softmax stays finite, and their output is dropped
            hide = arange[None, :] > positions[:, None]
            mask = torch.zeros(hide.shape, dtype=r.dtype, device=r.device)
            mask = mask.masked_fill_(hide, low)[None, None]
            return r.layer_stack(hidden, positions, mask, cache, first, last)

        rec = _Recorded(hidden, positions, body)
        while len(self._recorded) >= MAX_GRAPHS:
            self._recorded.pop(next(iter(self._recorded)))
        self._recorded[key] = rec
        return rec

    def _record(self, rec: _Recorded) -> None:
        """Warm up on a side stream (library and cuBLAS set-up, the absorbed attention's
        choice of product), then record. Both runs write the real queries' latents into
        their slots, the same values the replays write."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            rec.body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            rec.out = rec.body()
        rec.graph = graph
        self.recordings += 1

    def stats(self) -> dict:
        return {"recorded": self.capture, "shapes": len(self._recorded),
                "recordings": self.recordings, "replays": self.replays, "eager_blocks": self.eager_blocks,
                "arena_slots": self.scratch, "failed": self.failed}
