"""Fused MLA attention in the absorbed form (semantics: kernels/mla_attention.py).

Why a kernel: the torch form materialises float32 scores [H, q, T] and runs scale, mask,
softmax and the cast as separate passes over them; for pic's ~200 recomputed queries at 8K
slots that was ~20 of the 44 ms the GPU spent on a request (H100 profile,
bench/results/2026-11-23-h100-gpu_ttft-8k-graphs-profile.txt), and at 32K it grows 4x.

Here one program takes BLOCK_M (head, query) rows, query-major, so a tile holds a few
queries of neighbouring positions, and streams the latent slots once with an online
softmax (FlashAttention's recurrence): scores never leave registers. All heads share one
latent K/V (MLA absorbed is multi-query), so a row is just (h, i). The tile walks slots
only up to its largest position: pic's header tokens sit at the prompt's start and see a
few hundred slots, not the whole context. Dot products accumulate in float32; the
probabilities enter the value product in the storage dtype, as the torch form's cast does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from irminsul.kernels.mla_attention import check_args


@triton.jit
def _step(start, ql, qp, m, den, acc, limit, KL, KP, s_kl, s_kp, T, scale_log2e, dr, dp,
          in_r, in_p, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """One block of BLOCK_N slots from ``start``: the online-softmax update of (m, den, acc)."""
    cols = start + tl.arange(0, BLOCK_N)
    inb = cols < T
    kl = tl.load(KL + cols[:, None] * s_kl + dr[None, :], mask=inb[:, None] & in_r[None, :],
                 other=0.0)
    kp = tl.load(KP + cols[:, None] * s_kp + dp[None, :], mask=inb[:, None] & in_p[None, :],
                 other=0.0)
    if IEEE:
        s = tl.dot(ql, tl.trans(kl), input_precision="ieee")
        s += tl.dot(qp, tl.trans(kp), input_precision="ieee")
    else:
        s = tl.dot(ql, tl.trans(kl))
        s += tl.dot(qp, tl.trans(kp))
    s = tl.where(cols[None, :] < limit[:, None], s * scale_log2e, float("-inf"))
    # slot 0 is in every row's first block, so m is finite from the first step on
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    den = den * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p.to(kl.dtype), kl, input_precision="ieee")
    else:
        pv = tl.dot(p.to(kl.dtype), kl)
    return m_new, den, acc * alpha[:, None] + pv


@triton.jit
def _mla_attention_kernel(
    QL, QP, KL, KP, POS, O,
    s_qlh, s_qlq, s_qph, s_qpq, s_kl, s_kp, s_oh, s_oq,
    rows_total, heads, T, scale_log2e,
    RANK: tl.constexpr, ROPE: tl.constexpr, RANK_P: tl.constexpr, ROPE_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    INTERPRET: tl.constexpr, STAGES: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < rows_total
    qi = tl.where(valid, rows // heads, 0)
    h = rows % heads
    pos = tl.load(POS + qi, mask=valid, other=0)
    # slots a row sees: 0..pos, or slot 0 alone past the buffer (padded rows) or off the end
    limit = tl.where(valid & (pos < T), pos + 1, 1)
    hi = tl.max(limit, axis=0)  # the tile's reach: blocks past it are never loaded
    dr = tl.arange(0, RANK_P)
    dp = tl.arange(0, ROPE_P)
    in_r = dr < RANK
    in_p = dp < ROPE
    ql = tl.load(QL + h[:, None] * s_qlh + qi[:, None] * s_qlq + dr[None, :],
                 mask=valid[:, None] & in_r[None, :], other=0.0)
    qp = tl.load(QP + h[:, None] * s_qph + qi[:, None] * s_qpq + dp[None, :],
                 mask=valid[:, None] & in_p[None, :], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, RANK_P], tl.float32)
    if INTERPRET:
        # Triton's interpreter (the CPU tests) cannot bound range() by a runtime value
        start = hi * 0
        while start < hi:
            m, den, acc = _step(start, ql, qp, m, den, acc, limit, KL, KP, s_kl, s_kp, T,
                                scale_log2e, dr, dp, in_r, in_p, BLOCK_N, IEEE)
            start += BLOCK_N
    else:
        # a for loop, which the compiler software-pipelines (a while loop it does not)
        for start in tl.range(0, hi, BLOCK_N, num_stages=STAGES):
            m, den, acc = _step(start, ql, qp, m, den, acc, limit, KL, KP, s_kl, s_kp, T,
                                scale_log2e, dr, dp, in_r, in_p, BLOCK_N, IEEE)
    out = acc / den[:, None]
    tl.store(O + h[:, None] * s_oh + qi[:, None] * s_oq + dr[None, :],
             out.to(O.dtype.element_ty), mask=valid[:, None] & in_r[None, :])


BLOCK_M, BLOCK_N, WARPS, STAGES = 16, 64, 4, 2


def mla_attention_triton(q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                         rot: torch.Tensor, positions: torch.Tensor, scale: float,
                         block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                         warps: int = WARPS, stages: int = STAGES) -> torch.Tensor:
    """[H, q, rank] in latent's dtype (see kernels/mla_attention.py for the semantics)."""
    check_args(q_lat, q_pe, latent, rot, positions)
    heads, q, rank = q_lat.shape
    rope = q_pe.shape[2]
    for name, t in (("q_lat", q_lat), ("q_pe", q_pe), ("latent", latent), ("rot", rot)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous")
    q_lat, q_pe = q_lat.to(latent.dtype), q_pe.to(latent.dtype)
    out = torch.empty(heads, q, rank, dtype=latent.dtype, device=latent.device)
    pos = positions.to(device=latent.device, dtype=torch.int64).contiguous()
    rows = heads * q
    grid = (triton.cdiv(rows, block_m),)
    _mla_attention_kernel[grid](
        q_lat, q_pe, latent, rot, pos, out,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        latent.stride(0), rot.stride(0), out.stride(0), out.stride(1),
        rows, heads, latent.shape[0], scale * 1.4426950408889634,
        RANK=rank, ROPE=rope, RANK_P=max(16, triton.next_power_of_2(rank)),
        ROPE_P=max(16, triton.next_power_of_2(rope)), BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=latent.dtype == torch.float32,
        INTERPRET=os.environ.get("TRITON_INTERPRET") == "1", STAGES=stages, num_warps=warps)
    return out
