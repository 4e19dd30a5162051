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
_YEARS = [  # each needs four digits in a row
    r"\b\d{4}-\d{2}-\d{2}\b",  # ISO date
]
_SLASHED = r"\b\d{1,2}/\d{1,2}/\d{2,4}\b"  # 12/31/2025
_NAMED = [  # four digits in a row too
    rf"\b({_MONTHS})\.? \d{{1,2}}(st|nd|rd|th)?,? \d{{4}}\b",  # March 3, 2025
    rf"\b\d{{1,2}} ({_MONTHS}) \d{{4}}\b",  # 3 March 2025
]
_CLOCK = r"\b\d{1,2}:\d{2}(:\d{2})?\s*(am|pm|utc|z)?\b"  # 14:05, 2:05 pm
_DATED = [*_YEARS, _SLASHED, *_NAMED, _CLOCK]
_WORDED = [  # each needs one of _KEYWORDS
    r"\b(today'?s date|current (date|time)|timestamp|the time is|now is)\b",
    r"^\s*[-*]?\s*(working directory|current working directory|cwd|pwd)\s*:",
    r"^\s*[-*]?\s*(current branch|git branch|git status)\s*:",
    r"\b(token budget|tokens? (left|remaining)|remaining (budget|tokens))\b",
    r"\bcontext (window )?(left|remaining)\b",
    r"<(budget|token_budget|total_tokens)>",
]
_KEYWORDS = ("date", "time", "now is", "directory", "cwd", "pwd", "branch", "git status",
             "token", "budget", "context")
# A line is volatile if VOLATILE_LINE finds a match in it (the definition); is_volatile()
# answers the same, faster.
VOLATILE_LINE = re.compile("|".join(_DATED + _WORDED), re.IGNORECASE)
_WORDED_LINE = re.compile("|".join(_WORDED), re.IGNORECASE)
_YEAR_LINE = re.compile("|".join(_YEARS + _NAMED), re.IGNORECASE)
_SLASHED_LINE = re.compile(_SLASHED)
_CLOCK_LINE = re.compile(_CLOCK, re.IGNORECASE)
_FOUR_DIGITS = re.compile(r"\d{4}")
_DIGIT = re.compile(r"\d")


def is_volatile(line: str) -> bool:
    """``VOLATILE_LINE.search(line) is not None``, without running the whole pattern on lines
    that cannot match: on an ASCII line (where IGNORECASE is plain ASCII case and \\d is 0-9)
    the year and month-name dates need four digits in a row, 12/31/2025 a digit and a '/',
    a clock a digit and a ':', the worded patterns one of _KEYWORDS in lower case. Other
    lines get the whole pattern. The month names made scanning every line cost ~0.25 us a
    character: 4 ms for a 17K-character system prompt, on a new session's critical path."""
    if not line.isascii():
        return VOLATILE_LINE.search(line) is not None
    if _FOUR_DIGITS.search(line) and _YEAR_LINE.search(line):
        return True
    if ("/" in line or ":" in line) and _DIGIT.search(line):
        if "/" in line and _SLASHED_LINE.search(line):
            return True
        if ":" in line and _CLOCK_LINE.search(line):
            return True
    low = line.lower()
    return any(k in low for k in _KEYWORDS) and _WORDED_LINE.search(line) is not None


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
        flags = [is_volatile(ln) for ln in lines]
        keep = [ln for ln, v in zip(lines, flags) if not v]
        moved = [ln for ln, v in zip(lines, flags) if v]
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
