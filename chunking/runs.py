"""Runs of chunks a later prompt repeats: where a pre-warm request ends.

SGLang's irminsul backend places one run of content hits per request, right after the exact
prefix (engine_adapter/sglang/DESIGN.md, Holes). A prefill-only request that ends where such a
run starts makes that run placeable: the proxy's ``--prewarm`` (proxy/prewarm.py) and
``irminsul doctor`` against SGLang both pick their end points here.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..engine_adapter.contract import ChunkRef


def cuts(chunks: Sequence[ChunkRef], seen: Sequence[tuple[int, int]], *, limit: int,
         min_tokens: int, k: int = 0) -> tuple[int, ...]:
    """Where to end pre-warm requests: the start of each run of seen chunks (``seen``: their
    spans) that follows an unseen chunk and spans at least ``min_tokens`` tokens, plus ``k``
    tokens into the run (pic's carve-out: computed by the pre-warm, in their new left
    context; the backend places the run from there); the first ``limit``, in prompt order."""
    if limit <= 0:
        return ()
    hit = {(s, e) for s, e in seen}
    out: list[int] = []
    i = 0
    while i < len(chunks) and len(out) < limit:
        if (chunks[i].start, chunks[i].end) not in hit:
            i += 1
            continue
        j = i
        while j < len(chunks) and (chunks[j].start, chunks[j].end) in hit:
            j += 1
        start, end = chunks[i].start, chunks[j - 1].end
        if i > 0 and end - start >= min_tokens:  # a run behind unseen tokens
            out.append(start + min(k, end - start - 1))
        i = j
    return tuple(out)
