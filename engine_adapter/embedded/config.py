"""Configuration of the embedded engine (checked on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...chunking.config import ChunkerConfig

DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bfloat16", "float32")
POLICIES = ("full", "prefix", "pic", "blend")
ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class EngineConfig:
    """What the engine loads and how it reuses KV.

    ``cache_bytes`` bounds the chunk KV store (latent KV of all layers; ~9 KiB per token for
    the tiny model in float32, ~31 KiB for DeepSeek-V2-Lite in bfloat16). ``pic_k`` and
    ``blend_r`` are the defaults of the pic and blend policies; requests may override them.
    ``prefill_block`` caps the query tokens run together (bounds the attention mask memory).

    ``self_check`` runs guard.py at start: δ-rotation against the model's RoPE (relative error
    <= ``check_rope_tol``) and one probe prompt with ``policy`` against ``full`` (first-token
    KL <= ``check_max_kl`` nats, greedy agreement over ``check_tokens`` tokens >=
    ``check_min_agreement``); on failure the engine serves ``prefix`` only. The default
    thresholds only catch gross breakage (the shipped random-weight model passes them); set
    them per model from `irminsul eval quality`.
    """

    model_dir: str
    device: str = "auto"  # auto|cuda|cpu
    dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu)|bfloat16|float32
    cache_bytes: int = 1 << 30
    policy: str = "pic"  # full|prefix|pic|blend
    pic_k: int = 16
    blend_r: float = 0.10
    max_seq_len: int = 32768
    chunker: ChunkerConfig = field(default_factory=ChunkerConfig)
    attn_implementation: str = "sdpa"  # the library's attention: sdpa|eager
    prefill_block: int = 4096
    self_check: bool = True
    check_rope_tol: float = 1e-5
    check_max_kl: float = 1.0
    check_min_agreement: float = 0.0
    check_tokens: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.model_dir, str) or not self.model_dir:
            raise ValueError("model_dir must be a non-empty path string")
        for name, allowed in (("device", DEVICES), ("dtype", DTYPES), ("policy", POLICIES),
                              ("attn_implementation", ATTENTION)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        for name, low in (("cache_bytes", 0), ("pic_k", 0), ("max_seq_len", 1),
                          ("prefill_block", 1), ("check_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        r = self.blend_r
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ValueError(f"blend_r must be a number in [0, 1], got {r!r}")
        if not isinstance(self.self_check, bool):
            raise TypeError(f"self_check must be a bool, got {self.self_check!r}")
        for name in ("check_rope_tol", "check_max_kl", "check_min_agreement"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.check_min_agreement > 1:
            raise ValueError(f"check_min_agreement must be <= 1, got {self.check_min_agreement}")
        if isinstance(self.chunker, dict):
            object.__setattr__(self, "chunker", ChunkerConfig.from_json(self.chunker))
        if not isinstance(self.chunker, ChunkerConfig):
            raise TypeError(f"chunker must be a ChunkerConfig, got {type(self.chunker).__name__}")
