"""``--reorder stable-first``: move the volatile parts of a system prompt after the stable ones.

Agents put things that change every turn or session near the top of their system prompt: the
date and time, the working directory, a git status snapshot, a token budget. Behind a stock
(exact-prefix) engine everything after the first such line is recomputed on every request.
Moving those lines to the end of their system text lets the prefix cache keep the stable part.

Trade-off (why it is off by default): the model then sees a different prompt from the one the
agent wrote. Nothing is dropped, but instructions that say "the environment below" may then
point to text that now comes later, and a model tuned on the agent's exact layout may behave
differently. With an irminsul-mode engine it is not needed (content reuse does not depend on
position), so the proxy applies it to stock upstreams only.

What moves, per system text (a string, or each text block / system message on its own):
paragraphs (blank-line separated) whose first line is a volatile section heading (git status,
recent commits) move whole; in other paragraphs, single lines that match a volatile pattern
(dates, times, cwd, token budgets) move. The moved parts keep their relative order.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from irminsul.proxy.system_text import map_system_texts

_MONTHS = ("jan(uary)?|feb(ruary)?|mar(ch)?|apr(il)?|may|june?|july?|aug(ust)?|"
           "sep(t(ember)?)?|oct(ober)?|nov(ember)?|dec(ember)?")
VOLATILE_LINE = re.compile(
    "|".join([
        r"\b\d{4}-\d{2}-\d{2}\b",  # ISO date
        r"\b\d{1,2}/\d{1,2}/\d{2,4}\b",  # 12/31/2025
        rf"\b({_MONTHS})\.? \d{{1,2}}(st|nd|rd|th)?,? \d{{4}}\b",  # March 3, 2025
        rf"\b\d{{1,2}} ({_MONTHS}) \d{{4}}\b",  # 3 March 2025
        r"\b\d{1,2}:\d{2}(:\d{2})?\s*(am|pm|utc|z)?\b",  # 14:05, 2:05 pm
        r"\b(today'?s date|current (date|time)|timestamp|the time is|now is)\b",
        r"^\s*[-*]?\s*(working directory|current working directory|cwd|pwd)\s*:",
        r"^\s*[-*]?\s*(current branch|git branch|git status)\s*:",
        r"\b(token budget|tokens? (left|remaining)|remaining (budget|tokens))\b",
        r"\bcontext (window )?(left|remaining)\b",
        r"<(budget|token_budget|total_tokens)>",
    ]),
    re.IGNORECASE,
)  # fmt: skip
VOLATILE_HEADING = re.compile(
    r"^\s*(#+\s*)?(gitstatus|git status|status|recent commits|current branch)\s*:?",
    re.IGNORECASE,
)
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def split_sections(text: str) -> list[str]:
    """The blank-line separated paragraphs of ``text`` (empty ones left out)."""
    return [p for p in _PARAGRAPH.split(text) if p.strip()]


class Reordered(NamedTuple):
    text: str
    moved: int  # lines or paragraphs moved


def stable_first(text: str) -> Reordered:
    """``text`` with its volatile paragraphs and lines moved to the end (module docstring)."""
    stable: list[str] = []
    volatile: list[str] = []
    for para in _PARAGRAPH.split(text):
        lines = para.split("\n")
        if VOLATILE_HEADING.match(lines[0]):
            volatile.append(para)
            continue
        keep = [ln for ln in lines if not VOLATILE_LINE.search(ln)]
        moved = [ln for ln in lines if VOLATILE_LINE.search(ln)]
        if keep:
            stable.append("\n".join(keep))
        if moved:
            volatile.append("\n".join(moved))
    if not volatile:
        return Reordered(text, 0)
    out = "\n\n".join([*stable, *volatile])
    if text.endswith("\n") and not out.endswith("\n"):
        out += "\n"
    return Reordered(out, len(volatile))


def reorder_body(body: dict, api: str) -> tuple[dict, int]:
    """A copy of ``body`` with every system text put stable-first; and how many parts moved.
    ``body`` itself is not changed."""
    moved = 0

    def fn(text: str) -> str:
        nonlocal moved
        r = stable_first(text)
        moved += r.moved
        return r.text

    out = map_system_texts(body, api, fn)
    return (out, moved) if moved else (body, 0)
