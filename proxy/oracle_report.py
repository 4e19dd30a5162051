"""``irminsul traces recovery``: the recovery analysis of one trace file, as a table per family.

Works on generated traces and on recorded traffic (proxy --record files, bare chat bodies):
tokenize with the model's tokenizer, chunk as the proxy would, and print what an exact-prefix
cache gets and what content reuse would add (proxy/oracle.py defines every column).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.keys import Chunker
from irminsul.proxy.oracle import OracleConfig, Recovery, Summary, analyze, summarize, trace_items
from irminsul.proxy.trace_io import load_trace

METHOD_LABELS = (("content", "CDC"), ("content_net", "CDC net"), ("fixed", "fixed blocks"),
                 ("fixed_net", "fixed net"))


def pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def by_family(rows: Sequence[Recovery]) -> list[tuple[str, Summary]]:
    """(family, summary) per family in order of appearance, then ``all`` when several."""
    names: dict[str, list[Recovery]] = {}
    for r in rows:
        names.setdefault(r.family or "-", []).append(r)
    out = [(name, summarize(group)) for name, group in names.items()]
    if len(out) > 1:
        out.append(("all", summarize(rows)))
    return out


def render(table: list[tuple[str, Summary]]) -> str:
    """Rows: family, requests, mean prompt tokens, exact-prefix share, oracle share of the
    prompt; then per method its recovery above the exact prefix as share of the prompt / of
    the prefix cache's misses / of the oracle."""
    head = ["family   ", "reqs", " tokens", " exact", "oracle"]
    head += [f"{label:<20}" for _, label in METHOD_LABELS]
    lines = [" | ".join(head)]
    for name, s in table:
        if not s.requests:
            continue
        cells = [f"{name:<9}", f"{s.requests:>4}", f"{s.prompt_tokens / s.requests:>7.0f}",
                 pct(s.exact_prefix_tokens / max(1, s.prompt_tokens)),
                 pct(s.shares("oracle").of_prompt)]
        for method, _ in METHOD_LABELS:
            sh = s.shares(method)
            cells.append(f"{pct(sh.of_prompt)} {pct(sh.of_misses)} {pct(sh.of_oracle)}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def recovery_report(trace: str | Path, tokenizer_dir: str | Path, chunker: ChunkerConfig,
                    config: OracleConfig, *, limit: int | None = None) -> str:
    """Load, tokenize and analyse ``trace``; the table with a line saying how it was made."""
    from irminsul.chunking.tokenizer import ModelTokenizer

    tok = ModelTokenizer.from_dir(tokenizer_dir)
    requests = load_trace(trace, limit=limit)
    rows = analyze(trace_items(requests, tok), Chunker(chunker), config)
    intro = (f"{len(rows)} requests, tokenizer {tok.name}, chunks {chunker.min_tokens}/"
             f"{chunker.avg_tokens}/{chunker.max_tokens} (min/avg/max), fixed blocks of "
             f"{config.fixed_block}, carve-out {config.carve_tokens}, oracle runs >= "
             f"{config.oracle_min_tokens} tokens, exact prefix per {config.prefix_scope}.\n"
             "Each method: recovery above the exact prefix as share of the prompt / of the "
             "prefix cache's misses / of the oracle.")
    return intro + "\n\n" + render(by_family(rows))
