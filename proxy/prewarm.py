"""Pre-warm requests for SGLang with the irminsul radix-cache backend (``--prewarm N``).

SGLang prefills a request as "prefix from cache + one contiguous extend", so its irminsul
backend places only the run of content hits that follows the exact prefix
(engine_adapter/sglang/DESIGN.md, Holes). A header rewritten every turn therefore costs an
agent every hit behind it: the header's new tokens come first. Before forwarding such a
request, the proxy sends the prompt up to the start of each run of hits that follows unseen
tokens as its own prefill-only request (``/generate``, the token IDs it tokenized, SGLang's
``max_new_tokens: 0``); each enters SGLang's tree, so the next request's exact prefix (or
composed prefix) reaches the run, and the backend places it. Verified at the cache level
against SGLang's real classes (tests/test_sglang_backend.py, the pre-warm test).

The runs are the proxy's guess: it chunks each prompt as the backend chunks a chat request,
over the token IDs alone (no anchors reach the backend through the OpenAI endpoints), and a
cut is the start of such a chunk that repeats an earlier prompt's, after one that does not
(Pipeline.prewarm_ends; tests/test_sglang_backend.py runs that choice against the backend).
A wrong guess costs one extra prefill pass, never a wrong token (the backend compares token
IDs).

Accounting. SGLang reports the pre-warmed head as the real request's ``cached_tokens``,
though it was computed a moment before for this very request. So the request's split is
rebuilt here (:meth:`Prewarmed.split`): the exact prefix is what SGLang had before the first
pre-warm; every token a pre-warm or the request itself computed is new, where a pre-warm
reports its placed tokens (``meta_info.cached_tokens_details.irminsul``) they are reused; the
request's own placed tokens are invisible in OpenAI usage and are counted as computed. It may
under-state what the cache saved, never over-state it. The client's ``cached_tokens`` and the
savings row both get this split.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from irminsul.engine_adapter.contract import ReuseCounts
from irminsul.proxy.forward import upstream_call
from irminsul.proxy.usage import reuse_counts, token_count

log = logging.getLogger(__name__)

# Fields of the request that decide which cache partition SGLang matches it in: a pre-warm
# must be stored where the request will look (extra_key, cache_salt, the LoRA adapter).
SCOPE_FIELDS = ("extra_key", "cache_salt", "lora_path", "lora_id")


@dataclass(frozen=True)
class Warmed:
    """One pre-warm's answer: its prompt, SGLang's exact prefix of it, what was placed."""

    prompt_tokens: int
    cached_tokens: int
    reused_tokens: int = 0

    @property
    def computed(self) -> int:
        return max(0, self.prompt_tokens - self.cached_tokens - self.reused_tokens)


@dataclass
class Prewarmed:
    """The pre-warms sent for one request, in order."""

    done: list[Warmed] = field(default_factory=list)

    def split(self, usage: Mapping) -> dict:
        """OpenAI ``usage`` of the real request with the request's honest split added as
        ``usage["irminsul"]`` (see the module docstring); unchanged when it lacks the counts
        needed or no pre-warm was answered."""
        prompt = token_count(usage.get("prompt_tokens"))
        details = usage.get("prompt_tokens_details")
        cached = token_count(details.get("cached_tokens")) if isinstance(details, Mapping) else None
        if not self.done or prompt is None or cached is None or cached > prompt:
            return dict(usage)
        exact = min(self.done[0].cached_tokens, prompt)
        new = min(prompt - exact, sum(w.computed for w in self.done) + (prompt - cached))
        counts = ReuseCounts(prompt_tokens=prompt, exact_prefix_tokens=exact,
                             reused_tokens=prompt - exact - new, new_tokens=new, policy="pic")
        return {**usage, "irminsul": counts.to_json()}


def _read(payload) -> Warmed | None:
    meta = payload.get("meta_info") if isinstance(payload, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    prompt, cached = token_count(meta.get("prompt_tokens")), token_count(meta.get("cached_tokens"))
    if prompt is None or cached is None or cached > prompt:
        return None
    # SGLang's backend reports its split in cached_tokens_details (its only open slot); an
    # engine speaking the wire contract itself (irminsul serve) puts it in meta_info
    details = meta.get("cached_tokens_details")
    counts = reuse_counts(details.get("irminsul")) if isinstance(details, Mapping) else None
    counts = counts or reuse_counts(meta.get("irminsul"))
    reused = counts.reused_tokens if counts is not None else 0
    return Warmed(prompt, cached, min(reused, prompt - cached))


async def prewarm(upstream, ids: Sequence[int], ends: Sequence[int], scope: Mapping,
                  headers: Mapping[str, str]) -> Prewarmed:
    """Send ``ids[:end]`` for each end, in order, as prefill-only /generate requests in the
    request's cache partition (``scope``); stop at the first failure (logged: the request
    itself still goes, it only loses what the rest would have placed)."""
    out = Prewarmed()
    extra = {k: scope[k] for k in SCOPE_FIELDS if scope.get(k) is not None}
    for end in ends:
        body = {"input_ids": [int(t) for t in ids[:end]],
                "sampling_params": {"max_new_tokens": 0}, "stream": False, **extra}
        try:
            async with upstream_call(upstream, "POST", "/generate", headers=headers,
                                     data=json.dumps(body).encode()) as resp:
                raw = await resp.read()
                status = resp.status
        except Exception as e:  # noqa: BLE001 - a failed pre-warm must not fail the request
            log.warning("pre-warm of %d tokens failed (%s: %s); forwarding without the rest",
                        end, type(e).__name__, e)
            break
        warmed = None
        if status == 200:
            try:
                warmed = _read(json.loads(raw))
            except ValueError:
                warmed = None
        if warmed is None:
            log.warning("pre-warm of %d tokens: upstream answered %d without usable meta_info; "
                        "forwarding without the rest", end, status)
            break
        out.done.append(warmed)
    return out
