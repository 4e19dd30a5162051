"""Fused Triton kernel for indexed KV materialisation (see kernels/materialize.py).

One launch covers every layer: program (i, g) moves tokens [i*BLOCK_T, (i+1)*BLOCK_T) of the
layers of group g, computing each token's rotation once for all of them. c_KV rows are copied as they are; each k_pe pair is rotated by the exact angle difference
fl(dst_pos*f) - fl(src_pos*f) (float32 angles as a fresh prefill has them, their difference and
cos/sin in float64, so 128K-position shifts lose nothing), applied in float32 and rounded once
to the storage dtype. The bytes moved are the floor: each source row read once, each
destination row written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from irminsul.kernels.materialize import check_indexed_args
from irminsul.kernels.rope import RopeSpec


@triton.jit
def _materialize_kernel(
    src_ckv, src_kpe, dst_ckv, dst_kpe,
    src_index, dst_index, src_pos, dst_pos, inv_freq,
    n_tokens, n_layers, rank,
    s_ckv_l, s_ckv_t, s_kpe_l, s_kpe_t, d_ckv_l, d_ckv_t, d_kpe_l, d_kpe_t,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, HALF: tl.constexpr,
    LAYERS_PER_PROG: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    pid_t = tl.program_id(0)
    first_layer = tl.program_id(1) * LAYERS_PER_PROG
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < n_tokens
    si = tl.load(src_index + t, mask=tmask, other=0).to(tl.int64)
    di = tl.load(dst_index + t, mask=tmask, other=0).to(tl.int64)

    # The rotation depends on the token, not the layer: compute it once for all the layers
    # this program moves (float64 cos/sin are the kernel's only real arithmetic).
    j = tl.arange(0, HALF)
    f = tl.load(inv_freq + j)
    p0 = tl.load(src_pos + t, mask=tmask, other=0).to(tl.float32)
    p1 = tl.load(dst_pos + t, mask=tmask, other=0).to(tl.float32)
    a0 = p0[:, None] * f[None, :]  # float32, as a fresh prefill computes its angles
    a1 = p1[:, None] * f[None, :]
    d = a1.to(tl.float64) - a0.to(tl.float64)  # exact
    c = tl.cos(d).to(tl.float32)  # float64 in: the precise libdevice path, never an approx
    s = tl.sin(d).to(tl.float32)
    w = tl.arange(0, 2 * HALF)
    r = tl.arange(0, BLOCK_R)
    cmask = tmask[:, None] & (r[None, :] < rank)
    kmask = tmask[:, None]

    for k in tl.static_range(LAYERS_PER_PROG):
        layer = (first_layer + k).to(tl.int64)
        lmask = layer < n_layers
        # c_KV: a straight row copy
        row = tl.load(src_ckv + layer * s_ckv_l + si[:, None] * s_ckv_t + r[None, :],
                      mask=cmask & lmask)
        tl.store(dst_ckv + layer * d_ckv_l + di[:, None] * d_ckv_t + r[None, :], row,
                 mask=cmask & lmask)
        # k_pe: rotate every pair (x1, x2) by the exact angle difference
        src = src_kpe + layer * s_kpe_l + si[:, None] * s_kpe_t
        dst = dst_kpe + layer * d_kpe_l + di[:, None] * d_kpe_t
        if INTERLEAVED:
            # one contiguous 2*HALF-wide row, split into its (even, odd) pairs in registers
            x = tl.load(src + w[None, :], mask=kmask & lmask).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_T, HALF, 2)))
            y = tl.reshape(tl.join(x1 * c - x2 * s, x2 * c + x1 * s), (BLOCK_T, 2 * HALF))
            tl.store(dst + w[None, :], y.to(dst_kpe.dtype.element_ty), mask=kmask & lmask)
        else:
            x1 = tl.load(src + j[None, :], mask=kmask & lmask).to(tl.float32)
            x2 = tl.load(src + HALF + j[None, :], mask=kmask & lmask).to(tl.float32)
            tl.store(dst + j[None, :], (x1 * c - x2 * s).to(dst_kpe.dtype.element_ty),
                     mask=kmask & lmask)
            tl.store(dst + HALF + j[None, :], (x2 * c + x1 * s).to(dst_kpe.dtype.element_ty),
                     mask=kmask & lmask)


_INV_FREQ_CACHE: dict[tuple[RopeSpec, torch.device], torch.Tensor] = {}


def materialize_indexed_triton(src_ckv, src_kpe, src_index, src_pos, dst_ckv, dst_kpe,
                               dst_index, dst_pos, spec: RopeSpec, *, block_t: int = 8,
                               layers_per_prog: int = 4, num_warps: int = 4) -> None:
    """Launch the fused kernel; arguments as :func:`materialize_indexed_ref`."""
    check_indexed_args(src_ckv, src_kpe, src_index, src_pos, dst_ckv, dst_kpe, dst_index,
                       dst_pos, spec)
    n = src_index.numel()
    if n == 0:
        return
    dev = dst_ckv.device
    key = (spec, dev)
    inv = _INV_FREQ_CACHE.get(key)
    if inv is None:
        inv = _INV_FREQ_CACHE[key] = spec.inv_freq_tensor(dev)
    idx = [x.to(dev).contiguous() for x in (src_index, dst_index, src_pos, dst_pos)]
    layers, rank = src_ckv.shape[0], src_ckv.shape[2]
    grid = (triton.cdiv(n, block_t), triton.cdiv(layers, layers_per_prog))
    _materialize_kernel[grid](
        src_ckv, src_kpe, dst_ckv, dst_kpe, *idx, inv, n, layers, rank,
        src_ckv.stride(0), src_ckv.stride(1), src_kpe.stride(0), src_kpe.stride(1),
        dst_ckv.stride(0), dst_ckv.stride(1), dst_kpe.stride(0), dst_kpe.stride(1),
        BLOCK_T=block_t, BLOCK_R=triton.next_power_of_2(rank), HALF=spec.dim // 2,
        LAYERS_PER_PROG=layers_per_prog,
        INTERLEAVED=spec.output_layout == "interleaved",
        num_warps=num_warps,
    )
