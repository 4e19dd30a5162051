"""Fused Triton kernel for indexed KV materialisation (see kernels/materialize.py).

One launch covers every layer: program (i, g) moves tokens [i*BLOCK_T, (i+1)*BLOCK_T) of the
layers of group g, computing each token's rotation once for all of them. c_KV rows are copied as they are; each k_pe pair is rotated by the exact angle difference
fl(dst_pos*f) - fl(src_pos*f) (float32 angles as a fresh prefill has them, their difference and
cos/sin in float64, so 128K-position shifts lose nothing), applied in float32 and rounded once
to the storage dtype. The bytes moved are the floor: each source row read once, each
destination row written once.
"""

from __future__ import annotations

import numpy as np
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
    seg_ckv_off, seg_kpe_off, seg_ckv_l, seg_kpe_l,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, HALF: tl.constexpr,
    LAYERS_PER_PROG: tl.constexpr, INTERLEAVED: tl.constexpr,
    SEGMENTED: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid_t = tl.program_id(0)
    first_layer = tl.program_id(1) * LAYERS_PER_PROG
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < n_tokens
    di = tl.load(dst_index + t, mask=tmask, other=0).to(tl.int64)
    if SEGMENTED:
        # Per token: element offset of its layer-0 row from the src base pointer, and the
        # layer stride of the entry it lives in (entries are separate tensors).
        oc = tl.load(seg_ckv_off + t, mask=tmask, other=0)
        ok = tl.load(seg_kpe_off + t, mask=tmask, other=0)
        lc = tl.load(seg_ckv_l + t, mask=tmask, other=0)
        lk = tl.load(seg_kpe_l + t, mask=tmask, other=0)
        if ALIGNED:  # checked on the host: lets the compiler keep 16-byte vector accesses
            oc, ok = tl.multiple_of(oc, 16), tl.multiple_of(ok, 16)
            lc, lk = tl.multiple_of(lc, 16), tl.multiple_of(lk, 16)
    else:
        si = tl.load(src_index + t, mask=tmask, other=0).to(tl.int64)

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
        if SEGMENTED:
            ckv_row = src_ckv + layer * lc[:, None] + oc[:, None]
            src = src_kpe + layer * lk[:, None] + ok[:, None]
        else:
            ckv_row = src_ckv + layer * s_ckv_l + si[:, None] * s_ckv_t
            src = src_kpe + layer * s_kpe_l + si[:, None] * s_kpe_t
        row = tl.load(ckv_row + r[None, :], mask=cmask & lmask)
        tl.store(dst_ckv + layer * d_ckv_l + di[:, None] * d_ckv_t + r[None, :], row,
                 mask=cmask & lmask)
        # k_pe: rotate every pair (x1, x2) by the exact angle difference
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
        0, 0, 0, 0,
        BLOCK_T=block_t, BLOCK_R=triton.next_power_of_2(rank), HALF=spec.dim // 2,
        LAYERS_PER_PROG=layers_per_prog,
        INTERLEAVED=spec.output_layout == "interleaved",
        SEGMENTED=False, ALIGNED=False,
        num_warps=num_warps,
    )


def materialize_segments_triton(dst_ckv: torch.Tensor, dst_kpe: torch.Tensor, segments,
                                spec: RopeSpec, *, block_t: int = 8, layers_per_prog: int = 4,
                                num_warps: int = 4) -> None:
    """:func:`irminsul.kernels.rope.materialize` in one launch for all segments and layers.

    The store keeps every chunk's KV in its own tensors ([L, T, rank] / [L, T, dim], any
    layer and token strides), so there is no single source tensor to index. Rather than
    copying the chunks into one staging tensor (twice the bytes) or moving the store into a
    slab allocator, the kernel addresses them all relative to one base: per token, the element
    offset of its layer-0 row from the lowest-addressed segment, and its entry's layer stride
    (one small host-built table, one host-to-device copy). The rows are then read once, in
    place, wherever the allocator put them. A segment with src_position == dst_position is a
    plain copy (angle difference exactly 0: cos 1, sin 0), so exact-prefix parts ride along.
    """
    segs = [s for s in segments if s.c_kv.shape[1]]
    if not segs:
        return
    dev, dt = dst_ckv.device, dst_ckv.dtype
    for s in segs:
        if s.c_kv.device != dev or s.k_pe.device != dev:
            raise ValueError("segments must live on the destination's device")
        if s.c_kv.dtype != dt or s.k_pe.dtype != dst_kpe.dtype:
            raise ValueError("segment and destination dtypes must match (the copy does not convert)")
        if s.c_kv.dim() != 3 or s.k_pe.dim() != 3 or s.c_kv.shape[:2] != s.k_pe.shape[:2]:
            raise ValueError("a segment's c_kv/k_pe must be [layers, tokens, dim] of one length")
        if (s.c_kv.shape[0], s.c_kv.shape[2], s.k_pe.shape[2]) != (
                dst_ckv.shape[0], dst_ckv.shape[2], dst_kpe.shape[2]):
            raise ValueError("segment layers / rank / rope dim differ from the destination's")
        if s.c_kv.stride(2) != 1 or s.k_pe.stride(2) != 1:
            raise ValueError("the feature dimension must be contiguous (stride 1)")
    base_c = min((s.c_kv for s in segs), key=lambda x: x.data_ptr())
    base_k = min((s.k_pe for s in segs), key=lambda x: x.data_ptr())
    lengths = np.array([s.c_kv.shape[1] for s in segs], dtype=np.int64)
    n = int(lengths.sum())
    within = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)

    def per_token(values) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype=np.int64), lengths)

    def rows(base, views) -> tuple[np.ndarray, np.ndarray]:
        size = base.element_size()
        gaps = [v.data_ptr() - base.data_ptr() for v in views]
        if any(g % size for g in gaps):
            raise ValueError("segment storage is not aligned to its element size")
        off = per_token([g // size for g in gaps]) + within * per_token([v.stride(1) for v in views])
        return off, per_token([v.stride(0) for v in views])

    ckv_off, ckv_l = rows(base_c, [s.c_kv for s in segs])
    kpe_off, kpe_l = rows(base_k, [s.k_pe for s in segs])
    table = np.stack([
        per_token([s.src_position for s in segs]) + within,
        per_token([s.dst_position for s in segs]) + within,
        per_token([s.dst_slot for s in segs]) + within,
        ckv_off, kpe_off, ckv_l, kpe_l,
    ])
    aligned = bool((table[3:] % 16 == 0).all())
    idx = torch.from_numpy(table).to(dev, non_blocking=False)
    src_pos, dst_pos, dst_index = idx[0], idx[1], idx[2]
    if int(table[2].max()) >= dst_ckv.shape[1] or int(table[2].min()) < 0:
        raise ValueError("a segment's destination slots fall outside the buffer")
    if dst_kpe.shape[2] != spec.dim or dst_ckv.shape[:2] != dst_kpe.shape[:2]:
        raise ValueError(f"destination k_pe must have the rope dim {spec.dim} and c_kv's slots")
    key = (spec, dev)
    inv = _INV_FREQ_CACHE.get(key)
    if inv is None:
        inv = _INV_FREQ_CACHE[key] = spec.inv_freq_tensor(dev)
    layers, rank = dst_ckv.shape[0], dst_ckv.shape[2]
    grid = (triton.cdiv(n, block_t), triton.cdiv(layers, layers_per_prog))
    _materialize_kernel[grid](
        base_c, base_k, dst_ckv, dst_kpe, dst_index, dst_index, src_pos, dst_pos, inv, n,
        layers, rank, 0, 0, 0, 0,
        dst_ckv.stride(0), dst_ckv.stride(1), dst_kpe.stride(0), dst_kpe.stride(1),
        idx[3], idx[4], idx[5], idx[6],
        BLOCK_T=block_t, BLOCK_R=triton.next_power_of_2(rank), HALF=spec.dim // 2,
        LAYERS_PER_PROG=layers_per_prog,
        INTERLEAVED=spec.output_layout == "interleaved",
        SEGMENTED=True, ALIGNED=aligned,
        num_warps=num_warps,
    )
