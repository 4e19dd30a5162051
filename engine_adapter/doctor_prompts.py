"""The prompts `irminsul doctor` sends: fresh content behind two different headers."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Random prompt IDs are drawn from [LOW_ID, HIGH_ID): ordinary tokens in every DeepSeek-family
# vocabulary (specials sit at the very start or end), and under the tiny model's 4096.
LOW_ID, HIGH_ID = 100, 1000


class Prompts(NamedTuple):
    a: np.ndarray  # header A + content
    b: np.ndarray  # header B + the same content
    content_start: int  # where the content starts in b: no exact prefix can reach past it


def prompts(cfg) -> Prompts:
    """For a DoctorConfig ``cfg`` (seed, model_dir, content_tokens), two prompts: different headers (differing at the first token after any BOS) before
    the same content. Both header B's end and every line of the content are drawn from the
    seed, so no earlier prompt shares them: an exact prefix of b ends inside header B."""
    rng = np.random.default_rng(cfg.seed)
    if cfg.model_dir is None:
        body = rng.integers(LOW_ID, HIGH_ID, cfg.content_tokens, dtype=np.int32)
        head_a = rng.integers(LOW_ID, HIGH_ID, 12, dtype=np.int32)
        head_b = rng.integers(LOW_ID, HIGH_ID, 19, dtype=np.int32)
        head_b[0] = LOW_ID + (head_a[0] - LOW_ID + 1) % (HIGH_ID - LOW_ID)
        return Prompts(np.concatenate([head_a, body]), np.concatenate([head_b, body]),
                       len(head_b))
    from ..chunking.tokenizer import ModelTokenizer

    tok = ModelTokenizer.from_dir(cfg.model_dir)
    words = ("value", "total", "count", "offset", "limit", "index", "weight", "score")
    lines: list[str] = []
    while sum(len(tok.encode(line)) for line in lines) < cfg.content_tokens:
        n = rng.integers(1 << 20, 1 << 40)
        w = words[rng.integers(len(words))]
        lines.append(f"def {w}_{n:x}({w}):\n    return {w} * {n % 97} + {n % 10007}")
    content = tok.encode("\n".join(lines) + "\n")
    nonce = rng.integers(1 << 40, 1 << 60)
    head_a = tok.encode_prompt(f"Session started on Monday at 09:14, id {nonce:x}.\n\n").ids
    head_b = tok.encode_prompt(f"Today is Friday 17:42 in Lisbon, ticket {nonce + 1:x}.\n\n").ids
    head_a, head_b = np.asarray(head_a, np.int32), np.asarray(head_b, np.int32)
    return Prompts(np.concatenate([head_a, content]), np.concatenate([head_b, content]),
                   len(head_b))
