"""Prefill FLOPs: hand computations, DeepSeek-V2-Lite's published size, and transformers'
DeepseekV2 counted by torch's FLOP counter."""

import pytest

from irminsul.engine_adapter.contract import ReuseCounts
from irminsul.proxy.flops import (
    DEFAULT_FLOPS_PER_JOULE,
    ModelDims,
    attention_flops,
    energy_joules,
    param_counts,
    prefill_flops,
    reuse_savings,
)

SMALL = {  # q-LoRA, one dense layer then two MoE layers
    "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
    "num_hidden_layers": 3, "num_attention_heads": 4, "n_routed_experts": 5,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
    "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
    "v_head_dim": 6, "tie_word_embeddings": False,
}  # fmt: skip

# deepseek-ai/DeepSeek-V2-Lite config.json (the fields that shape compute)
V2_LITE = {
    "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "tie_word_embeddings": False,
}  # fmt: skip


def test_small_config_by_hand():
    c = param_counts(ModelDims.from_hf_config(SMALL))
    # per layer: q_a 32*24 + q_b 24*4*(8+4) + kv_a 32*(16+4) + kv_b 16*4*(8+6) + o 4*6*32
    attention_layer = 768 + 1152 + 640 + 896 + 768
    assert c.attention == 3 * attention_layer == 12672
    # layer 0 dense: 3*32*48; layers 1-2: router 32*5 + (2 routed + 1 shared) * 3*32*16
    assert c.mlp_active == 4608 + 2 * (160 + 3 * 1536) == 14144
    assert c.lm_head == 97 * 32
    # norms: 2*32 + kv 16 + q 24 per layer; all 5+1 experts; embedding, head, final norm
    assert c.total == 3 * (4224 + 104) + 4608 + 2 * (160 + 6 * 1536) + 2 * 3104 + 32 == 42584
    # F(10, 0): 2*A*10 + 2*3104 (one position's logits) + 2*3*4*(12+6) * 10*11/2
    assert prefill_flops(SMALL, 10, 0) == 2 * 26816 * 10 + 6208 + 432 * 55 == 566288
    # F(4, 6): four tokens after six cached ones attend to 4*6 + 4*5/2 = 34 keys in all
    assert prefill_flops(SMALL, 4, 6) == 2 * 26816 * 4 + 6208 + 432 * 34
    assert attention_flops(ModelDims.from_hf_config(SMALL), 4, 6) == 432 * 34
    assert prefill_flops(SMALL, 10, 0, logits_tokens=0) == 566288 - 6208


def test_deepseek_v2_lite_matches_its_published_size():
    c = param_counts(ModelDims.from_hf_config(V2_LITE))
    assert c.total == pytest.approx(15.7e9, rel=0.005)  # "15.7B total parameters"
    assert 2.3e9 < c.activated < 2.5e9  # "2.4B activated"
    # no q-LoRA: q_proj 2048*16*192, kv_a 2048*576, kv_b 512*16*256, o 16*128*2048
    assert c.attention == 27 * (6291456 + 1179648 + 2097152 + 4194304)
    # ~4.5 GFLOPs per prompt token of linear work
    assert prefill_flops(V2_LITE, 1, 0, logits_tokens=0) == pytest.approx(4.48e9, rel=0.01)


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_against_transformers_deepseek_v2(q_lora_rank):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from torch.utils.flop_counter import FlopCounterMode

    hf = transformers.DeepseekV2Config(**{**SMALL, "q_lora_rank": q_lora_rank},
                                       num_key_value_heads=4, max_position_embeddings=64)
    hf._attn_implementation = "eager"  # plain matmuls the counter sees
    hf._experts_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.DeepseekV2ForCausalLM(hf).eval()
    dims = ModelDims.from_hf_config({**SMALL, "q_lora_rank": q_lora_rank})
    counts = param_counts(dims)
    assert counts.total == sum(p.numel() for p in model.parameters())

    tokens = 10
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randint(0, 97, (1, tokens)))
    flops = counter.get_flop_counts()
    by_op = {str(k): v for k, v in flops["Global"].items()}
    # the attention modules' own batched matmuls: transformers 5.17's rotary embedding also
    # multiplies by a batched matmul, outside them (5.25's multiplies elementwise)
    attn_bmm = sum(v for name, ops in flops.items() if name.endswith(".self_attn")
                   for op, v in ops.items() if str(op) == "aten.bmm")
    # transformers computes logits at every position and routes each token to exactly top-k
    # experts, so its matmuls are the linear part of F with logits_tokens = tokens.
    linear = prefill_flops(dims, tokens, 0, logits_tokens=tokens) - attention_flops(dims, tokens)
    assert by_op["aten.mm"] == linear
    # Eager attention multiplies the full T x T score matrix, masked afterwards; F counts the
    # causal half-plus-diagonal: T*(T+1)/2 of the T*T query-key pairs.
    assert attn_bmm > 0
    assert attention_flops(dims, tokens) == attn_bmm * (tokens + 1) / (2 * tokens)


def test_reuse_savings_by_hand():
    # Nothing reused: nothing saved.
    none = ReuseCounts(prompt_tokens=10, new_tokens=10)
    assert reuse_savings(SMALL, none).flops == 0
    # Nine tokens from the exact prefix, the last computed: the linear work of nine tokens and
    # their queries' attention (1 + 2 + ... + 9 keys).
    nine = ReuseCounts(prompt_tokens=10, exact_prefix_tokens=9, new_tokens=1)
    saved = reuse_savings(SMALL, nine)
    assert saved.flops == 2 * 26816 * 9 + 432 * 45
    assert saved.joules == saved.flops / DEFAULT_FLOPS_PER_JOULE
    # Everything reused: all but the last position's logits.
    every = ReuseCounts(prompt_tokens=10, exact_prefix_tokens=4, reused_tokens=6)
    assert reuse_savings(SMALL, every).flops == 566288 - 6208
    # Computed tokens counted last: a lower bound, below the same count computed first.
    mixed = ReuseCounts(prompt_tokens=10, exact_prefix_tokens=2, reused_tokens=5,
                        recomputed_tokens=1, new_tokens=2)
    lower = reuse_savings(SMALL, mixed).flops
    computed_first = prefill_flops(SMALL, 10) - prefill_flops(SMALL, 3)
    assert 0 < lower < computed_first


def test_energy_default_and_parameter():
    assert DEFAULT_FLOPS_PER_JOULE == pytest.approx(5.714e11, rel=1e-3)  # 400 TFLOP/s / 700 W
    assert energy_joules(1e15) == pytest.approx(1750.0)
    assert energy_joules(1e15, flops_per_joule=1e12) == 1000.0
    with pytest.raises(ValueError):
        energy_joules(1.0, flops_per_joule=0)


def test_bad_configs_and_arguments_are_refused():
    with pytest.raises(ValueError, match="kv_lora_rank"):
        ModelDims.from_hf_config({k: v for k, v in SMALL.items() if k != "kv_lora_rank"})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelDims.from_hf_config({**SMALL, "num_experts_per_tok": 6})
    with pytest.raises(ValueError, match="hidden"):
        ModelDims.from_hf_config({**SMALL, "hidden_size": 0})
    with pytest.raises(ValueError):
        prefill_flops(SMALL, -1)
    with pytest.raises(ValueError):
        prefill_flops(SMALL, 3, logits_tokens=4)
