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

from irminsul.kernels.mla_attention import check_args, padded_width


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
    # A row may see none of these slots yet (a split that starts past its position while a
    # neighbour in the tile reaches further): its max stays -inf, and exp2 is taken against 0
    # then, so it keeps zero weight instead of becoming -inf - -inf = NaN.
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    den = den * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p.to(kl.dtype), kl, input_precision="ieee")
    else:
        pv = tl.dot(p.to(kl.dtype), kl)
    return m_new, den, acc * alpha[:, None] + pv


@triton.jit
def _mla_attention_kernel(
    QL, QP, KL, KP, POS, O, PM, PD, PACC,
    s_qlh, s_qlq, s_qph, s_qpq, s_kl, s_kp, s_oh, s_oq,
    rows_total, heads, T, split, scale_log2e,
    RANK: tl.constexpr, ROPE: tl.constexpr, RANK_P: tl.constexpr, ROPE_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    INTERPRET: tl.constexpr, STAGES: tl.constexpr, PARTIAL: tl.constexpr,
):
    """Program (tile, s) attends the tile's rows over slots [s * split, (s + 1) * split).
    With PARTIAL it leaves its running max, denominator and unnormalised sum in PM / PD /
    PACC for combine(); without (one split) it writes the normalised output to O."""
    tile = tl.program_id(0)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < rows_total
    qi = tl.where(valid, rows // heads, 0)
    h = rows % heads
    pos = tl.load(POS + qi, mask=valid, other=0)
    # slots a row sees: 0..pos, or slot 0 alone past the buffer (padded rows) or off the end
    limit = tl.where(valid & (pos < T), pos + 1, 1)
    lo = tl.program_id(1) * split
    hi = tl.minimum(tl.max(limit, axis=0), lo + split)  # blocks past the reach: never loaded
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
        start = lo
        while start < hi:
            m, den, acc = _step(start, ql, qp, m, den, acc, limit, KL, KP, s_kl, s_kp, T,
                                scale_log2e, dr, dp, in_r, in_p, BLOCK_N, IEEE)
            start += BLOCK_N
    else:
        # a for loop, which the compiler software-pipelines (a while loop it does not)
        for start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
            m, den, acc = _step(start, ql, qp, m, den, acc, limit, KL, KP, s_kl, s_kp, T,
                                scale_log2e, dr, dp, in_r, in_p, BLOCK_N, IEEE)
    if PARTIAL:
        at = tl.program_id(1) * rows_total + rows
        tl.store(PM + at, m, mask=valid)
        tl.store(PD + at, den, mask=valid)
        tl.store(PACC + at[:, None] * RANK_P + dr[None, :], acc, mask=valid[:, None])
    else:
        out = acc / den[:, None]
        tl.store(O + h[:, None] * s_oh + qi[:, None] * s_oq + dr[None, :],
                 out.to(O.dtype.element_ty), mask=valid[:, None] & in_r[None, :])


BLOCK_M, BLOCK_N, WARPS, STAGES = 16, 64, 4, 2
def mla_attention_triton(q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                         rot: torch.Tensor, positions: torch.Tensor, scale: float,
                         block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                         warps: int = WARPS, stages: int = STAGES,
                         splits: int = 1) -> torch.Tensor:
    """[H, q, rank] in latent's dtype (see kernels/mla_attention.py for the semantics).
    ``splits`` > 1 divides every query's slots among that many programs and combines their
    partial softmaxes (flash-decoding): the longest walk, not the total work, bounds a block
    with a query far into the context (splits_for chooses it from the host's positions)."""
    check_args(q_lat, q_pe, latent, rot, positions)
    heads, q, rank = q_lat.shape
    rope = q_pe.shape[2]
    for name, t in (("q_lat", q_lat), ("q_pe", q_pe), ("latent", latent), ("rot", rot)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous")
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    q_lat, q_pe = q_lat.to(latent.dtype), q_pe.to(latent.dtype)
    t = latent.shape[0]
    dev = latent.device
    out = torch.empty(heads, q, rank, dtype=latent.dtype, device=dev)
    pos = positions.to(device=dev, dtype=torch.int64).contiguous()
    rows = heads * q
    width = padded_width(rank)
    split = triton.cdiv(triton.cdiv(t, splits), block_n) * block_n  # whole blocks a program
    n = triton.cdiv(t, split)
    partial = n > 1
    if partial:
        pm = torch.empty(n, rows, dtype=torch.float32, device=dev)
        pd = torch.empty(n, rows, dtype=torch.float32, device=dev)
        pacc = torch.empty(n, rows, width, dtype=torch.float32, device=dev)
    else:
        pm = pd = pacc = out  # unused
    _mla_attention_kernel[(triton.cdiv(rows, block_m), n)](
        q_lat, q_pe, latent, rot, pos, out, pm, pd, pacc,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        latent.stride(0), rot.stride(0), out.stride(0), out.stride(1),
        rows, heads, t, split, scale * 1.4426950408889634,
        RANK=rank, ROPE=rope, RANK_P=width, ROPE_P=padded_width(rope),
        BLOCK_M=block_m, BLOCK_N=block_n, IEEE=latent.dtype == torch.float32,
        INTERPRET=os.environ.get("TRITON_INTERPRET") == "1", STAGES=stages, PARTIAL=partial,
        num_warps=warps)
    if partial:
        combine(pm, pd, pacc, out)
    return out


def combine(pm: torch.Tensor, pd: torch.Tensor, pacc: torch.Tensor, out: torch.Tensor) -> None:
    """out [H, q, rank] from the splits' (max, denominator, unnormalised sum) per row, rows
    query-major; a split a row never reached has max -inf and weighs nothing."""
    heads, q, rank = out.shape
    top = pm.amax(0)  # finite: every row's first split holds its slot 0
    w = torch.exp2(pm - top)
    den = (w * pd).sum(0)
    acc = torch.einsum("sr,srd->rd", w, pacc)[:, :rank] / den[:, None]
    out.copy_(acc.view(q, heads, rank).transpose(0, 1))
