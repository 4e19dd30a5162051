"""The absorbed-form MLA attention: the torch reference against a per-query loop written from
the definition, the fused Triton kernel against the reference (on CUDA, or on the CPU under
TRITON_INTERPRET=1), and the engine with the kernel against the torch form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.kernel_device import KERNEL_DEVICE, needs_kernel
from support.models import yarn_model  # noqa: F401

from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine, SamplingParams
from irminsul.kernels.mla_attention import mla_attention_ref


def _inputs(heads, q, t, rank, rope, dtype, device, seed=0, beyond=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype).to(device)

    # sorted positions anywhere in [0, t), the last ``beyond`` past the slots (padded rows)
    pos = torch.sort(torch.randperm(t, generator=g)[: q - beyond]).values
    pos = torch.cat([pos, torch.full((beyond,), t + 7)])
    return (r(heads, q, rank, std=0.3), r(heads, q, rope, std=0.3), r(t, rank), r(t, rope),
            pos.to(device))


def test_reference_is_the_definition():
    q_lat, q_pe, latent, rot, pos = _inputs(3, 9, 40, 12, 4, torch.float64, "cpu", beyond=2)
    got = mla_attention_ref(q_lat, q_pe, latent, rot, pos, 0.37)
    for h in range(3):
        for i in range(9):
            n = int(pos[i]) + 1 if pos[i] < 40 else 1
            s = (latent[:n] @ q_lat[h, i] + rot[:n] @ q_pe[h, i]) * 0.37
            want = torch.softmax(s, 0) @ latent[:n]
            torch.testing.assert_close(got[h, i], want)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,q,t,rank,rope,splits", [
    (3, 37, 301, 48, 16, 1),   # odd sizes: padded feature dims, a partial last block
    (3, 37, 301, 48, 16, 3),   # ... the slots split across programs (rows of one tile
                               # reaching into different splits: some see none of one)
    (16, 40, 700, 512, 64, 1),  # DeepSeek-V2-Lite's widths
    (16, 40, 700, 512, 64, 4),
    (6, 1, 33, 128, 64, 1),     # one query
    (6, 1, 200, 128, 64, 8),    # one query, more splits than whole blocks: fewer are used
])
def test_kernel_matches_reference(dtype, heads, q, t, rank, rope, splits):
    from irminsul.kernels.mla_attention_triton import mla_attention_triton

    if dtype == torch.bfloat16 and KERNEL_DEVICE == "cpu":
        pytest.skip("Triton 3.6's interpreter multiplies bfloat16 tiles wrongly in tl.dot "
                    "(off by 1e10 on a 16x16 product): checked on CUDA")
    args = _inputs(heads, q, t, rank, rope, dtype, KERNEL_DEVICE, seed=q, beyond=min(3, q - 1))
    want = mla_attention_ref(*args, 0.21)
    got = mla_attention_triton(*args, 0.21, splits=splits)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # and the mask matters: with every query seeing everything the answer differs
    loose = mla_attention_ref(*args[:4], torch.full_like(args[4], t - 1), 0.21)
    assert (loose.float() - want.float()).abs().max() > 10 * tol


@needs_kernel
def test_kernel_rejects_bad_shapes():
    from irminsul.kernels.mla_attention_triton import mla_attention_triton

    q_lat, q_pe, latent, rot, pos = _inputs(2, 4, 20, 16, 16, torch.float32, KERNEL_DEVICE)
    with pytest.raises(ValueError, match="one position per query"):
        mla_attention_triton(q_lat, q_pe, latent, rot, pos[:3], 1.0)
    with pytest.raises(ValueError, match="widths"):
        mla_attention_triton(q_lat, q_pe, latent[:, :8], rot, pos, 1.0)
    with pytest.raises(ValueError, match="splits"):
        mla_attention_triton(q_lat, q_pe, latent, rot, pos, 1.0, splits=0)


def test_splits_follow_the_longest_walk():
    from irminsul.kernels.mla_attention import PARTIAL_BYTES, SPLIT_SLOTS, splits_for

    assert splits_for(100, 16, 512) == 1  # a short walk: one program
    assert splits_for(8 * SPLIT_SLOTS, 16, 512) == 8
    many = splits_for(32 * SPLIT_SLOTS, 4096, 512)  # the partials' memory bounds it
    assert 1 <= many < 32 and many * 4096 * 512 * 4 <= PARTIAL_BYTES


@pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="the engine on the CPU with the kernel "
                    "interpreted (TRITON_INTERPRET=1); on CUDA tests/test_engine_gpu.py")
def test_engine_with_the_kernel_matches_the_torch_form(yarn_model, monkeypatch):  # noqa: F811
    from irminsul.kernels import mla_attention_triton as kernel_mod

    calls = []
    inner = kernel_mod.mla_attention_triton

    def counted(*args, **kwargs):
        calls.append(args[0].shape[1])
        return inner(*args, **kwargs)

    monkeypatch.setattr(kernel_mod, "mla_attention_triton", counted)
    g = np.random.default_rng(0)
    sections = [g.integers(10, 4000, n).astype(np.int32) for n in (60, 80, 70)]
    warm = np.concatenate([g.integers(10, 4000, 20), *sections]).astype(np.int32)
    # a new header long enough that its block takes the kernel (model_runner.attention_costs)
    edit = np.concatenate([g.integers(10, 4000, 124), sections[1], sections[0],
                           sections[2]]).astype(np.int32)
    outs = {}
    for kernel in ("torch", "triton"):
        e = Engine(EngineConfig(model_dir=str(yarn_model), device="cpu", self_check=False,
                                attention_kernel=kernel, cuda_graphs="on", max_seq_len=1024))
        e.prefill(warm, anchors=(0, 20, 80, 160), policy="full")
        out = e.prefill(edit, anchors=(0, 124, 204, 264), policy="pic", policy_args={"k": 4})
        toks = [o.token_id for o in e.generate(edit, SamplingParams(max_new_tokens=4),
                                               anchors=(0, 124, 204, 264), policy="pic")]
        outs[kernel] = (out, toks)
        assert bool(calls) == (kernel == "triton")
        front = torch.arange(200)  # a block of many queries
        assert bool(e.runner.fused_splits(front, 200)) == (kernel == "triton")
    assert calls  # the pic blocks did attend with the kernel
    (a, ta), (b, tb) = outs["torch"], outs["triton"]
    assert a.counts == b.counts and a.counts.reused_tokens > 0
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    assert ta == tb
