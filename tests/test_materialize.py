"""Indexed materialisation: the torch reference against rope.materialize, and the fused Triton
kernel against the reference (on CUDA, or on CPU under TRITON_INTERPRET=1 when Triton is
installed). Random inputs, poisoned destinations, every slot checked."""

import pytest
import torch
from support.kernel_device import KERNEL_DEVICE, needs_kernel

from irminsul.kernels.materialize import materialize_indexed_ref
from irminsul.kernels.rope import RopeSpec, Segment, materialize

YARN = {"model_type": "deepseek_v2", "qk_rope_head_dim": 64, "max_position_embeddings": 163840,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40,
                            "original_max_position_embeddings": 4096, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}
PLAIN = {"model_type": "deepseek_v2", "qk_rope_head_dim": 64, "max_position_embeddings": 4096,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
V3_HALF = {**YARN, "model_type": "deepseek_v3", "rope_interleave": True}
SPECS = {"yarn": RopeSpec.from_hf_config(YARN), "plain": RopeSpec.from_hf_config(PLAIN),
         "v3-half": RopeSpec.from_hf_config(V3_HALF)}
POISON = 1234.0


def _case(n_tokens, layers, rank, dtype, max_shift, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n_src, n_dst = n_tokens + 7, 2 * n_tokens + 11
    src_ckv = torch.randn(layers, n_src, rank, generator=g).to(dtype)
    src_kpe = torch.randn(layers, n_src, 64, generator=g).to(dtype)
    src_index = torch.randperm(n_src, generator=g)[:n_tokens]
    dst_index = torch.randperm(n_dst, generator=g)[:n_tokens]
    src_pos = torch.randint(0, 131072, (n_tokens,), generator=g)
    shift = torch.randint(-max_shift, max_shift + 1, (n_tokens,), generator=g)
    dst_pos = (src_pos + shift).clamp(0, 131071)
    dst_ckv = torch.full((layers, n_dst, rank), POISON, dtype=dtype)
    dst_kpe = torch.full((layers, n_dst, 64), POISON, dtype=dtype)
    tensors = [src_ckv, src_kpe, src_index, src_pos, dst_ckv, dst_kpe, dst_index, dst_pos]
    return [t.to(device) for t in tensors]


def _assert_close_kpe(got, want, dtype, layout):
    # error relative to each rotation pair's magnitude: a rotation mixes a pair's two values
    w = want.float()
    if layout == "interleaved":
        pair = w.reshape(*w.shape[:-1], -1, 2).norm(dim=-1).repeat_interleave(2, -1)
    else:  # pairs (i, i + dim/2)
        half = w.shape[-1] // 2
        norm = torch.sqrt(w[..., :half] ** 2 + w[..., half:] ** 2)
        pair = torch.cat((norm, norm), dim=-1)
    err = (got.float() - want.float()).abs()
    if dtype == torch.float32:
        assert (err <= 1e-6 * pair + 1e-30).all(), err.max()
    else:
        ulp = 2.0 ** (torch.floor(torch.log2(pair.clamp_min(1e-30))) - 7)
        assert (err <= ulp).all(), (err / ulp).max()


def test_reference_equals_segment_materialize():
    spec = SPECS["yarn"]
    g = torch.Generator().manual_seed(0)
    layers, n, rank = 3, 40, 32
    c_kv, k_pe = torch.randn(layers, n, rank, generator=g), torch.randn(layers, n, 64, generator=g)
    a_ckv, a_kpe = torch.zeros(layers, 100, rank), torch.zeros(layers, 100, 64)
    b_ckv, b_kpe = a_ckv.clone(), a_kpe.clone()
    materialize(a_ckv, a_kpe, [Segment(c_kv, k_pe, 500, 9000, 30)], spec)
    materialize_indexed_ref(c_kv, k_pe, torch.arange(n), torch.arange(500, 500 + n), b_ckv,
                            b_kpe, torch.arange(30, 30 + n), torch.arange(9000, 9000 + n), spec)
    assert torch.equal(a_ckv, b_ckv) and torch.equal(a_kpe, b_kpe)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_writes_only_the_destination_slots(dtype):
    args = _case(50, 2, 64, dtype, 128, seed=1)
    src_ckv, _, src_index, _, dst_ckv, dst_kpe, dst_index, _ = args
    materialize_indexed_ref(*args, SPECS["plain"])
    untouched = torch.ones(dst_ckv.shape[1], dtype=torch.bool)
    untouched[dst_index] = False
    assert (dst_ckv[:, untouched] == POISON).all() and (dst_kpe[:, untouched] == POISON).all()
    assert torch.equal(dst_ckv[:, dst_index], src_ckv[:, src_index])  # c_KV bit-identical


@needs_kernel
@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tokens,max_shift", [(1, 5), (37, 128), (300, 131071)])
def test_kernel_matches_reference(spec_name, dtype, n_tokens, max_shift):
    from irminsul.kernels.materialize_triton import materialize_indexed_triton

    spec = SPECS[spec_name]
    layers, rank = (5, 512) if KERNEL_DEVICE == "cuda" else (5, 40)  # 5: a partial layer group
    args = _case(n_tokens, layers, rank, dtype, max_shift, seed=n_tokens, device=KERNEL_DEVICE)
    ref = [a.clone() for a in args]
    materialize_indexed_triton(*args, spec)
    materialize_indexed_ref(*ref, spec)
    dst_ckv, dst_kpe, dst_index = args[4], args[5], args[6]
    untouched = torch.ones(dst_ckv.shape[1], dtype=torch.bool, device=dst_ckv.device)
    untouched[dst_index] = False
    assert (dst_ckv[:, untouched] == POISON).all() and (dst_kpe[:, untouched] == POISON).all()
    assert torch.equal(dst_ckv, ref[4])  # c_KV copied bit for bit
    _assert_close_kpe(dst_kpe[:, dst_index], ref[5][:, dst_index], dtype, spec.output_layout)
