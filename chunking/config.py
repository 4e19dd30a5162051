"""Configuration of the content-defined chunker (see chunking/README.md for the defaults' why)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# Rolling-hash window in tokens. 32 tokens carry far more entropy than the 32-bit hash can
# hold (a token ID has ~17 bits), and a window no longer than min_tokens makes every cut
# decision depend only on the tokens of the chunk being cut (see hash_window).
MAX_HASH_WINDOW = 32
_MAX_NORMALIZATION = 4
_MAX_AVG = 1 << 24  # keeps the strict threshold (2**32 / (avg << normalization)) >= 1


@dataclass(frozen=True)
class ChunkerConfig:
    """Chunk-length bounds in tokens plus the gear seed; values are checked on construction.

    ``normalization`` is FastCDC's normalisation level: before ``avg_tokens`` a cut needs a
    hash 2**normalization times rarer than 1/avg, after it 2**normalization times likelier,
    which pulls chunk lengths towards ``avg_tokens``.
    """

    min_tokens: int = 64
    avg_tokens: int = 256
    max_tokens: int = 1024
    seed: int = 0
    normalization: int = 2

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                # ValueError, not TypeError: configs arrive as JSON and callers catch ValueError
                msg = f"ChunkerConfig.{f.name} must be an int, got {value!r}"
                raise ValueError(msg)  # noqa: TRY004
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens}")
        if self.avg_tokens < self.min_tokens:
            raise ValueError(
                f"avg_tokens ({self.avg_tokens}) must be >= min_tokens ({self.min_tokens})"
            )
        if self.max_tokens < self.avg_tokens:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be >= avg_tokens ({self.avg_tokens})"
            )
        if self.avg_tokens > _MAX_AVG:
            raise ValueError(f"avg_tokens must be <= {_MAX_AVG}, got {self.avg_tokens}")
        if not 0 <= self.normalization <= _MAX_NORMALIZATION:
            raise ValueError(
                f"normalization must be in [0, {_MAX_NORMALIZATION}], got {self.normalization}"
            )
        if not 0 <= self.seed < 1 << 64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")

    @property
    def hash_window(self) -> int:
        """Tokens the rolling hash covers: a power of two, at most 32 and at most min_tokens.

        Because a cut is only considered once a chunk holds min_tokens >= hash_window tokens,
        the hash that decides it never sees tokens before the chunk's start, hence never
        tokens of a previous anchor segment.
        """
        return min(MAX_HASH_WINDOW, 1 << (self.min_tokens.bit_length() - 1))

    @property
    def strict_threshold(self) -> int:
        """A cut before avg_tokens needs hash < this (probability 1 / (avg << normalization))."""
        return max(1, (1 << 32) // (self.avg_tokens << self.normalization))

    @property
    def loose_threshold(self) -> int:
        """A cut after avg_tokens needs hash < this (probability (1 << normalization) / avg)."""
        return min(1 << 32, ((1 << 32) << self.normalization) // self.avg_tokens)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> ChunkerConfig:
        """Build from ``to_json``'s dict; missing keys take defaults, unknown keys are refused."""
        if not isinstance(d, dict):
            msg = f"chunker config must be an object, got {type(d).__name__}"
            raise ValueError(msg)  # noqa: TRY004
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown chunker config keys: {', '.join(map(str, unknown))}")
        return cls(**d)
