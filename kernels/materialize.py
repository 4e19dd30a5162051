"""Indexed KV materialisation: gather stored MLA latents, δ-rotate k_pe, scatter into slots.

The slot-indexed form of :func:`irminsul.kernels.rope.materialize`, the shape a serving pool
needs (SGLang's MLA pool is addressed by token slots): for every token t and every layer l,

    dst_ckv[l, dst_index[t]] = src_ckv[l, src_index[t]]
    dst_kpe[l, dst_index[t]] = δ-rotate(src_kpe[l, src_index[t]], src_pos[t] -> dst_pos[t])

``materialize_indexed`` dispatches to the fused Triton kernel (kernels/materialize_triton.py,
one launch for all layers) for CUDA tensors when Triton is importable, and to
``materialize_indexed_ref`` (plain torch, any device: the CPU path and the test oracle)
otherwise. Both change only ``dst_ckv``/``dst_kpe``, and only at ``dst_index``.
"""

from __future__ import annotations

from irminsul.kernels.rope import RopeSpec, delta_rotate


def check_indexed_args(src_ckv, src_kpe, src_index, src_pos, dst_ckv, dst_kpe, dst_index,
                       dst_pos, spec: RopeSpec) -> None:
    """Shapes, dtypes and devices the kernel relies on; raises ValueError naming the problem."""
    if src_ckv.dim() != 3 or dst_ckv.dim() != 3 or src_kpe.dim() != 3 or dst_kpe.dim() != 3:
        raise ValueError("src/dst c_kv and k_pe must be [layers, tokens, dim]")
    layers = src_ckv.shape[0]
    if {src_kpe.shape[0], dst_ckv.shape[0], dst_kpe.shape[0]} != {layers}:
        raise ValueError("src and dst must have the same number of layers")
    if src_ckv.shape[2] != dst_ckv.shape[2]:
        raise ValueError(f"c_kv rank differs: {src_ckv.shape[2]} vs {dst_ckv.shape[2]}")
    if src_kpe.shape[2] != spec.dim or dst_kpe.shape[2] != spec.dim:
        raise ValueError(f"k_pe dim must be the rope dim {spec.dim}")
    n = src_index.numel()
    if not (dst_index.numel() == src_pos.numel() == dst_pos.numel() == n):
        raise ValueError("need one src index, dst index, src and dst position per token")
    if src_ckv.shape[1] != src_kpe.shape[1] or dst_ckv.shape[1] != dst_kpe.shape[1]:
        raise ValueError("c_kv and k_pe must hold the same tokens")
    if src_ckv.dtype != dst_ckv.dtype or src_kpe.dtype != dst_kpe.dtype:
        raise ValueError("src and dst dtypes must match (the copy does not convert)")
    for t in (src_ckv, src_kpe, dst_ckv, dst_kpe):
        if t.stride(2) != 1:
            raise ValueError("the feature dimension must be contiguous (stride 1)")


def materialize_indexed_ref(src_ckv, src_kpe, src_index, src_pos, dst_ckv, dst_kpe, dst_index,
                            dst_pos, spec: RopeSpec) -> None:
    """The torch reference: exact angle difference, rotation in float32, one rounding."""
    check_indexed_args(src_ckv, src_kpe, src_index, src_pos, dst_ckv, dst_kpe, dst_index,
                       dst_pos, spec)
    if src_index.numel() == 0:
        return
    dev = dst_ckv.device
    si, di = src_index.to(dev).long(), dst_index.to(dev).long()
    dst_ckv[:, di] = src_ckv[:, si]
    dst_kpe[:, di] = delta_rotate(src_kpe[:, si], src_pos.to(dev), dst_pos.to(dev), spec)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def materialize_indexed(src_ckv, src_kpe, src_index, src_pos, dst_ckv, dst_kpe, dst_index,
                        dst_pos, spec: RopeSpec) -> None:
    """Fused Triton kernel on CUDA tensors when Triton is there, else the torch reference."""
    if dst_ckv.is_cuda and triton_available():
        from irminsul.kernels.materialize_triton import materialize_indexed_triton

        materialize_indexed_triton(src_ckv, src_kpe, src_index, src_pos, dst_ckv, dst_kpe,
                                   dst_index, dst_pos, spec)
    else:
        materialize_indexed_ref(src_ckv, src_kpe, src_index, src_pos, dst_ckv, dst_kpe,
                                dst_index, dst_pos, spec)
