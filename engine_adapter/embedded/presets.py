"""Named DeepSeek-V2-shaped configs with random weights, for tests and benchmarks.

No weights are downloaded: a preset is a config, and :func:`build_checkpoint` instantiates
transformers' own DeepseekV2ForCausalLM from it with a seeded RNG and writes it with
``save_pretrained``, so the engine loads it like any local checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# DeepSeek-V2's own YaRN settings (config.json of DeepSeek-V2 / V2-Lite).
YARN_ROPE: dict[str, Any] = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
PLAIN_ROPE: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}

_TINY: dict[str, Any] = {
    "vocab_size": 4096,  # the shipped tiny tokenizer has exactly 4096 tokens
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": None,
    "kv_lora_rank": 512,  # MLA's latent width, as in every DeepSeek-V2/V3 model
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 64,
    "v_head_dim": 64,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "topk_method": "greedy",
    "routed_scaling_factor": 1.0,
    "max_position_embeddings": 163840,
    "rope_parameters": YARN_ROPE,
    # Wider than transformers' 0.02 so that random attention is far from uniform: context then
    # visibly changes a token's KV, and approximate reuse has an error worth measuring.
    "initializer_range": 0.08,
    "tie_word_embeddings": False,
}

_V2_LITE: dict[str, Any] = {
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_shared_experts": 2,
    "first_k_dense_replace": 1,
    "topk_method": "greedy",
    "routed_scaling_factor": 1.0,
    "max_position_embeddings": 163840,
    "rope_parameters": YARN_ROPE,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
}

# The shipped trained model (examples/models/train_model.py): DeepSeek-V2 attention (MLA with
# a 128-dim latent and the 64-dim decoupled YaRN rope key) with dense MLPs in every layer —
# an MoE trains several times slower in transformers' expert loop and the 10-minute budget is
# better spent on tokens. YaRN as DeepSeek's, at factor 4 over a 4096-token original window.
_TRAINED: dict[str, Any] = {
    **_TINY,
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "kv_lora_rank": 128,
    "first_k_dense_replace": 6,
    "max_position_embeddings": 16384,
    "rope_parameters": {**YARN_ROPE, "factor": 4.0},
    "initializer_range": 0.02,
}
# Its CacheClip auxiliary model: two layers reading the prompt to score tokens for recompute.
_TRAINED_AUX: dict[str, Any] = {
    **_TRAINED,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "first_k_dense_replace": 2,
}

# A CacheClip auxiliary model for tests (clip.py): two dense layers, half of tiny-mla's
# width, sharing its 4096-token tokenizer.
_TINY_AUX: dict[str, Any] = {
    **_TINY,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "kv_lora_rank": 64,
    "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "first_k_dense_replace": 2,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-mla": _TINY,
    "tiny-mla-plain": {**_TINY, "rope_parameters": PLAIN_ROPE, "max_position_embeddings": 163840},
    "tiny-aux": _TINY_AUX,
    "v2-lite": _V2_LITE,
    "irminsul-mla": _TRAINED,
    "irminsul-aux": _TRAINED_AUX,
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def preset_config(name: str, **overrides: Any):
    """A transformers DeepseekV2Config for preset ``name`` (overrides win)."""
    from transformers import DeepseekV2Config

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    kw = {**PRESETS[name], **overrides}
    kw["rope_parameters"] = dict(kw["rope_parameters"])
    return DeepseekV2Config(**kw)


def build_checkpoint(
    preset: str,
    out_dir: str | Path,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    init_in_dtype: bool = False,
    **overrides: Any,
) -> Path:
    """Write a random-weight checkpoint of ``preset`` to out_dir; returns out_dir.

    Weights come from transformers' initialiser under ``torch.manual_seed(seed)`` (same seed,
    same bytes). The tokenizer files of ``tokenizer_dir`` are copied next to the weights, and
    its generation_config.json (else tokenizer_config.json) gives the bos/eos/pad ids; its
    generation_config.json is kept byte for byte even when tokenizer_dir is out_dir.
    ``device="cuda"`` initialises on the GPU and ``init_in_dtype`` in ``dtype`` rather than
    float32 (fast and half the memory for v2-lite; either gives other bytes).
    """
    import torch
    from transformers import DeepseekV2ForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special, gen_bytes = {}, None
    if tokenizer_dir is not None:
        special, gen_bytes = copy_tokenizer(Path(tokenizer_dir), out)
    cfg = preset_config(preset, **special, **overrides)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    if init_in_dtype:
        torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = DeepseekV2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    if gen_bytes is not None:
        (out / "generation_config.json").write_bytes(gen_bytes)
    return out


def copy_tokenizer(src: Path, out: Path) -> tuple[dict[str, Any], bytes | None]:
    """Copy the tokenizer files; return (special token ids, generation_config.json bytes)."""
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src / 'tokenizer.json'} not found")
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
            shutil.copyfile(src / name, out / name)
    gen_path = src / "generation_config.json"
    if gen_path.is_file():
        gen_bytes = gen_path.read_bytes()
        gen = json.loads(gen_bytes)
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        return {k: gen[k] for k in keys if gen.get(k) is not None}, gen_bytes
    vocab = json.loads((src / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", ())}
    tok_cfg_path = src / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}

    def token_id(field: str):
        tok = tok_cfg.get(field)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return ids.get(tok) if isinstance(tok, str) else None

    special = {f"{k}_token_id": token_id(f"{k}_token") for k in ("bos", "eos", "pad")}
    return {k: v for k, v in special.items() if v is not None}, None
