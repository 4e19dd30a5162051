"""MLA attention in the absorbed form over a latent slot buffer, queries at any positions.

For queries (head h, query i) at position pos[i] and slots s of one layer:

    score(h, i, s) = scale * (q_lat[h, i] . latent[s] + q_pe[h, i] . rot[s])   if s <= pos[i]
    out(h, i)      = sum_s softmax_s(score(h, i, s)) latent[s]

``q_lat`` is q_nope already multiplied by W_UK (absorbed.py does that and applies W_UV to
the output). Query i sees slots 0..pos[i] of ``latent`` [T, rank] / ``rot`` [T, rope_dim]:
the placed and computed KV of the prompt up to itself. A query at pos[i] >= T (the padded
queries of a CUDA-graph bucket, graphs.py) sees slot 0 alone: its output is discarded, and
keeping it to one slot keeps the kernel from walking the whole context for it.

``mla_attention_ref`` is plain torch (the CPU path's maths, the kernel's test oracle);
kernels/mla_attention_triton.py is the fused kernel the engine runs on CUDA.
"""

from __future__ import annotations

import torch

# The fused kernel splits a query's slots across programs in runs of at least SPLIT_SLOTS,
# its partial results (float32, padded_width(rank) per row and split) within PARTIAL_BYTES.
SPLIT_SLOTS, PARTIAL_BYTES = 1024, 128 << 20


def padded_width(n: int) -> int:
    """The kernel's tile width for a feature dimension: a power of two, at least 16."""
    return max(16, 1 << (n - 1).bit_length())


def splits_for(reach: int, rows: int, rank: int) -> int:
    """How many programs share the longest walk, ``reach`` slots, of ``rows`` (head, query)
    rows: one per SPLIT_SLOTS slots, fewer when the partial results would pass PARTIAL_BYTES."""
    cap = max(1, PARTIAL_BYTES // (rows * padded_width(rank) * 4))
    return max(1, min(-(-reach // SPLIT_SLOTS), cap))


def check_args(q_lat, q_pe, latent, rot, positions) -> None:
    """The shapes both forms rely on; raises ValueError naming the problem."""
    if q_lat.dim() != 3 or q_pe.dim() != 3 or latent.dim() != 2 or rot.dim() != 2:
        raise ValueError("need q_lat [H, q, rank], q_pe [H, q, rope], latent [T, rank], "
                         "rot [T, rope]")
    heads, q, rank = q_lat.shape
    if q_pe.shape[:2] != (heads, q):
        raise ValueError(f"q_pe {tuple(q_pe.shape)} does not match q_lat {tuple(q_lat.shape)}")
    if latent.shape[1] != rank or rot.shape[1] != q_pe.shape[2]:
        raise ValueError("latent/rot widths must match q_lat/q_pe")
    if latent.shape[0] != rot.shape[0] or latent.shape[0] < 1:
        raise ValueError("latent and rot must hold the same T >= 1 slots")
    if positions.shape != (q,):
        raise ValueError(f"need one position per query ({q}), got {tuple(positions.shape)}")


def mla_attention_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                      rot: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """[H, q, rank] in latent's dtype; float32 scores and softmax."""
    check_args(q_lat, q_pe, latent, rot, positions)
    t = latent.shape[0]
    scores = (q_lat.float() @ latent.float().T + q_pe.float() @ rot.float().T) * scale
    pos = positions.to(latent.device)
    limit = torch.where(pos < t, pos, torch.zeros_like(pos))  # past the slots: slot 0 only
    hidden = torch.arange(t, device=latent.device)[None, :] > limit[:, None]
    scores = scores.masked_fill(hidden[None], float("-inf"))
    return (scores.softmax(-1) @ latent.float()).to(latent.dtype)
