"""RopeSpec, apply_rope and δ-rotation against transformers' own DeepSeek RoPE code."""

from __future__ import annotations

import inspect

import pytest
import torch
from support.models import plain_model, yarn_model  # noqa: F401  (fixtures)
from transformers import DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2RotaryEmbedding,
    apply_rotary_emb,
)
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3

from irminsul.engine_adapter.embedded.model_runner import ModelRunner
from irminsul.engine_adapter.embedded.presets import PRESETS, YARN_ROPE, preset_config
from irminsul.kernels.rope import RopeSpec, Segment, apply_rope, delta_rotate, materialize

MAX_POS = 163840  # max_position_embeddings of the presets (YaRN factor 40 x 4096)
ROPE_PRESETS = ("tiny-mla", "tiny-mla-plain")


def _positions(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random source positions and destinations shifted by up to +-128K (clamped in range)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, MAX_POS, (n,), generator=g)
    delta = torch.randint(-131072, 131073, (n,), generator=g)
    return src, (src + delta).clamp(0, MAX_POS - 1)


def _hf_v2(rot, x, positions):
    """k_pe as DeepseekV2Attention computes it (x: [T, 64] before RoPE)."""
    _, k = apply_rotary_emb(x[None, None], x[None, None], rot(x, positions[None]))
    return k[0, 0]


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at |v| (bfloat16: 8 significant bits, float32: 24)."""
    bits = 8 if dtype == torch.bfloat16 else 24
    e = torch.frexp(v.float().abs().clamp_min(1e-30)).exponent
    return torch.ldexp(torch.ones_like(v, dtype=torch.float32), e - bits)


# transformers 5.25 forms the rope angles position * inv_freq elementwise, as apply_rope does,
# and the two agree bit for bit; 5.17 forms them with a matmul, whose rounding differs by up
# to an ulp of the result
_LIBRARY_ANGLES_ELEMENTWISE = "@" not in inspect.getsource(DeepseekV2RotaryEmbedding.forward)


def _pair_norm(k: torch.Tensor) -> torch.Tensor:
    """Magnitude of each interleaved rotation pair, repeated onto both members."""
    return k.float().reshape(*k.shape[:-1], -1, 2).norm(dim=-1).repeat_interleave(2, dim=-1)


@pytest.mark.parametrize("preset", ROPE_PRESETS)
def test_spec_matches_transformers(preset):
    cfg = preset_config(preset)
    rot = DeepseekV2RotaryEmbedding(cfg)
    spec = RopeSpec.from_hf_config(cfg)
    assert torch.equal(spec.inv_freq_tensor(), rot.inv_freq)  # bit-identical
    assert spec.attention_scaling == rot.attention_scaling
    assert spec.rope_type == cfg.rope_parameters["rope_type"]
    assert (spec.input_layout, spec.output_layout) == ("interleaved", "interleaved")
    as_dict = {**PRESETS[preset], "model_type": "deepseek_v2"}  # a config.json-like dict
    assert RopeSpec.from_hf_config(as_dict) == spec


def test_yarn_attention_factor_not_one_when_mscales_differ():
    # DeepSeek-V2 ships mscale == mscale_all_dim (factor 1); V3-style configs need not.
    cfg = preset_config("tiny-mla", rope_parameters={**YARN_ROPE, "mscale": 1.0})
    rot = DeepseekV2RotaryEmbedding(cfg)
    spec = RopeSpec.from_hf_config(cfg)
    assert spec.attention_scaling == rot.attention_scaling != 1.0
    assert torch.equal(spec.inv_freq_tensor(), rot.inv_freq)


def test_v3_layouts_and_apply_rope_match_transformers():
    for interleave in (True, False):
        cfg = DeepseekV3Config(
            hidden_size=256, num_attention_heads=4, qk_rope_head_dim=64, qk_nope_head_dim=64,
            v_head_dim=64, kv_lora_rank=512, q_lora_rank=None, rope_interleave=interleave,
            rope_parameters={**YARN_ROPE, "mscale": 1.0}, max_position_embeddings=MAX_POS,
        )
        spec = RopeSpec.from_hf_config(cfg)
        assert spec.output_layout == "half"
        assert spec.input_layout == ("interleaved" if interleave else "half")
        rot = v3.DeepseekV3RotaryEmbedding(cfg)
        x = torch.randn(256, 64)
        src, dst = _positions(256, 3)
        fn = v3.apply_rotary_pos_emb_interleave if interleave else v3.apply_rotary_pos_emb
        ref = {}
        for name, pos in (("src", src), ("dst", dst)):
            cos, sin = rot(x, pos[None])
            ref[name] = fn(x[None, None], x[None, None], cos, sin)[1][0, 0]
            assert torch.equal(apply_rope(x, pos, spec), ref[name])
        moved = delta_rotate(ref["src"], src, dst, spec)
        assert ((moved - ref["dst"]).abs().amax(-1) / ref["dst"].abs().amax(-1)).max() <= 1e-6


@pytest.mark.parametrize("preset", ROPE_PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_rotate_equals_fresh_rope(preset, dtype):
    cfg = preset_config(preset)
    rot, spec = DeepseekV2RotaryEmbedding(cfg), RopeSpec.from_hf_config(cfg)
    x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    src, dst = _positions(2048, 2)
    stored, fresh = _hf_v2(rot, x, src), _hf_v2(rot, x, dst)
    ours = apply_rope(x, src, spec)
    if _LIBRARY_ANGLES_ELEMENTWISE:
        assert torch.equal(ours, stored)
    else:
        assert ((ours.float() - stored.float()).abs() <= _ulp(_pair_norm(stored), dtype)).all()
    moved = delta_rotate(stored, src, dst, spec)
    assert moved.dtype == dtype
    err = (moved.float() - fresh.float()).abs()
    if dtype == torch.float32:
        assert (err.amax(-1) / fresh.abs().amax(-1)).max() <= 1e-6
    else:
        # Within one bf16 ulp of the pair's magnitude: a rotation mixes a pair's members, so
        # a small member inherits rounding of its large partner in the fresh result too.
        assert (err <= _ulp(_pair_norm(fresh), torch.bfloat16)).all()
    assert torch.equal(delta_rotate(stored, src, src, spec), stored)


class _Capture:
    """A past_key_values that records what the attention caches and returns it unchanged."""

    def update(self, k_nope, k_pe, layer_idx, *args, **kwargs):
        self.c_kv, self.k_pe = k_nope[0, 0].clone(), k_pe[0, 0].clone()
        return k_nope, k_pe


def _layer0_latents(runner: ModelRunner, ids: torch.Tensor, positions: torch.Tensor):
    """Layer 0's cached latents for ids at positions, computed by the library's attention."""
    h = runner.embed(ids)
    cap = _Capture()
    with torch.inference_mode():
        runner.layers[0](h, attention_mask=None, position_ids=positions[None],
                         use_cache=True, **{runner.cache_kwarg: cap},
                         position_embeddings=runner.model.model.rotary_emb(h, positions[None]))
    return cap.c_kv, cap.k_pe


@pytest.mark.parametrize("fixture", ["yarn_model", "plain_model"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer0_reuse_matches_fresh_prefill(request, fixture, dtype):
    runner = ModelRunner(request.getfixturevalue(fixture), device="cpu", dtype=dtype)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, runner.vocab_size, (48,), generator=g)
    for trial in range(4):
        start = int(torch.randint(0, MAX_POS - 48, (1,), generator=g))
        new_start = int(torch.randint(0, MAX_POS - 48, (1,), generator=g))
        src = torch.arange(start, start + 48)
        dst = torch.arange(new_start, new_start + 48)
        c0, k0 = _layer0_latents(runner, ids, src)
        c1, k1 = _layer0_latents(runner, ids, dst)
        buf_c = torch.zeros(1, 64, runner.rank, dtype=runner.dtype)
        buf_k = torch.zeros(1, 64, runner.rope_dim, dtype=runner.dtype)
        materialize(buf_c, buf_k, [Segment(c0[None], k0[None], start, new_start, 8)],
                    runner.spec)
        assert torch.equal(buf_c[0, 8:56], c1)  # c_KV is position-free: bit-identical
        err = (buf_k[0, 8:56].float() - k1.float()).abs()
        if runner.dtype == torch.float32:
            assert (err.amax(-1) / k1.abs().amax(-1)).max() <= 1e-6
        else:
            assert (err <= _ulp(_pair_norm(k1), torch.bfloat16)).all()
        assert not buf_c[0, :8].any() and not buf_c[0, 56:].any()  # nothing else written


def test_spec_refuses_other_models_and_rope_types():
    with pytest.raises(ValueError, match="model_type"):
        RopeSpec.from_hf_config({"model_type": "llama", "qk_rope_head_dim": 64})
    bad = {**PRESETS["tiny-mla"], "model_type": "deepseek_v2",
           "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}
    with pytest.raises(ValueError, match="rope_type"):
        RopeSpec.from_hf_config(bad)
    with pytest.raises(ValueError, match="inv_freq"):
        RopeSpec(64, (1.0,) * 31)
