"""Read token usage from upstream answers, and report savings back in each API's convention.

What the client gets: "cached" means *tokens whose prefill was skipped*, i.e. exact prefix plus
content reuse (``ReuseCounts.saved_tokens``). OpenAI chat/completions:
``usage.prompt_tokens_details.cached_tokens``; Responses: ``usage.input_tokens_details
.cached_tokens``; Anthropic: ``usage.cache_read_input_tokens`` (and ``input_tokens`` the rest,
since Anthropic's input_tokens leaves cache reads out); SGLang /generate:
``meta_info.cached_tokens``. The split stays under ``irminsul`` (ReuseCounts.to_json()).

A stock engine reports only its exact prefix, which is already what it skipped: its usage is
relayed unchanged. Rewrites return new dicts; inputs are never mutated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from irminsul.engine_adapter.contract import ReuseCounts


class UpstreamUsage(NamedTuple):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    exact_prefix: int | None = None  # cached tokens as the upstream reported them
    counts: ReuseCounts | None = None  # irminsul split, when the upstream sent one


def token_count(v: Any) -> int | None:
    """``v`` if it is a token count (an int >= 0, not a bool), else None."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def reuse_counts(d: Any) -> ReuseCounts | None:
    """An engine's irminsul split (ReuseCounts) from its JSON, or None if it is not one."""
    if not isinstance(d, Mapping):
        return None
    try:
        return ReuseCounts.from_json(dict(d))
    except (TypeError, ValueError):
        return None  # counts that do not add up are not savings we can report


def read_openai(usage: Any) -> UpstreamUsage | None:
    """Chat/completions ``usage`` (also Responses, whose names differ)."""
    if not isinstance(usage, Mapping):
        return None
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return UpstreamUsage(token_count(prompt), token_count(completion), token_count(cached),
                         reuse_counts(usage.get("irminsul")))


def rewrite_openai(usage: dict, *, details_key: str = "prompt_tokens_details") -> dict:
    """``usage`` with cached_tokens = saved tokens, when it carries an irminsul split."""
    counts = reuse_counts(usage.get("irminsul"))
    if counts is None:
        return usage
    details = usage.get(details_key)
    details = dict(details) if isinstance(details, Mapping) else {}
    details["cached_tokens"] = counts.saved_tokens
    return {**usage, details_key: details}


def read_generate(meta: Any) -> UpstreamUsage | None:
    if not isinstance(meta, Mapping):
        return None
    return UpstreamUsage(token_count(meta.get("prompt_tokens")), token_count(meta.get("completion_tokens")),
                         token_count(meta.get("cached_tokens")), reuse_counts(meta.get("irminsul")))


def rewrite_generate(meta: dict) -> dict:
    counts = reuse_counts(meta.get("irminsul"))
    return meta if counts is None else {**meta, "cached_tokens": counts.saved_tokens}


def read_anthropic(usage: Any) -> UpstreamUsage | None:
    """Anthropic usage: prompt = input + cache reads + cache writes."""
    if not isinstance(usage, Mapping):
        return None
    counts = reuse_counts(usage.get("irminsul"))
    inp = token_count(usage.get("input_tokens"))
    read = token_count(usage.get("cache_read_input_tokens"))
    write = token_count(usage.get("cache_creation_input_tokens")) or 0
    prompt = None if inp is None else inp + (read or 0) + write
    if counts is not None:
        prompt = counts.prompt_tokens
        read = counts.exact_prefix_tokens  # what the engine's own cached count means
    return UpstreamUsage(prompt, token_count(usage.get("output_tokens")), read, counts)


def rewrite_anthropic(usage: dict) -> dict:
    counts = reuse_counts(usage.get("irminsul"))
    if counts is None:
        return usage
    out = {**usage, "cache_read_input_tokens": counts.saved_tokens}
    if "input_tokens" in usage:
        out["input_tokens"] = counts.prompt_tokens - counts.saved_tokens
    return out


def merge(a: UpstreamUsage | None, b: UpstreamUsage | None) -> UpstreamUsage | None:
    """Fields of ``b`` where set, else ``a``'s (stream events report usage piecewise)."""
    if a is None or b is None:
        return b or a
    return UpstreamUsage(*(y if y is not None else x for x, y in zip(a, b)))
