"""Configuration of the SGLang backend (no SGLang import).

SGLang builds the cache through a factory that receives only SGLang's own arguments, so the
few Irminsul settings come from the environment of the server process, read once into this
frozen dataclass: IRMINSUL_SGLANG_POLICY, IRMINSUL_SGLANG_PIC_K, IRMINSUL_SGLANG_MAX_PROMPTS.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ...chunking.config import ChunkerConfig

# blend and clip need a layer-1 pass over placed tokens inside SGLang's model forward, which a
# cache backend cannot add: they are not offered here (a request asking for them gets pic).
SGLANG_POLICIES = ("prefix", "pic")


@dataclass(frozen=True)
class SGLangReuseConfig:
    policy: str = "pic"  # "prefix": SGLang's radix cache only; "pic": plus content hits
    pic_k: int = 0  # tokens recomputed at the start of each run that changed left context
    max_prompts: int = 4096  # prompts the content index remembers (sites, not KV: SGLang's)
    chunker: ChunkerConfig = field(default_factory=ChunkerConfig)

    def __post_init__(self) -> None:
        if self.policy not in SGLANG_POLICIES:
            raise ValueError(f"IRMINSUL_SGLANG_POLICY must be one of {SGLANG_POLICIES}, "
                             f"got {self.policy!r}")
        if self.pic_k < 0:
            raise ValueError(f"IRMINSUL_SGLANG_PIC_K must be >= 0, got {self.pic_k}")
        if self.max_prompts < 1:
            raise ValueError(f"IRMINSUL_SGLANG_MAX_PROMPTS must be >= 1, got {self.max_prompts}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SGLangReuseConfig:
        env = os.environ if env is None else env

        def integer(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {raw!r}") from None

        return cls(
            policy=env.get("IRMINSUL_SGLANG_POLICY") or "pic",
            pic_k=integer("IRMINSUL_SGLANG_PIC_K", 0),
            max_prompts=integer("IRMINSUL_SGLANG_MAX_PROMPTS", 4096),
        )
