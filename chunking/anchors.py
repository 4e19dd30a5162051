"""Structural boundaries of a rendered chat: where each message starts and where its content is.

A message starts where the template's output for the messages before it ends (the prefix
definition: render(messages[:i]) is a prefix of render(messages)). Rendering every prefix
costs O(n^2) template steps, so instead:

1. The chat is rendered once more with each message's content replaced by a sentinel.
   Walking both renders together gives each content's char span in the real text (the
   template glue between sentinels must appear verbatim; content may have been stripped):
   alignment.py.
2. The glue before a content ends with that message's header ("<|user|>", ...). Headers
   are learned per role from one exact prefix render the first time a glue does not end
   with a known one, then matched as the longest known suffix.

Both steps keep the last call's result in the RenderMemo, and the next turn of a
conversation recomputes only what follows the part it shares with it (what it reuses is
what it would compute again: tests/test_chat_layout_reuse.py).
3. When the walk fails (a template that branches on content), every prefix is rendered
   for real, with the lengths cached across calls by a digest of the message prefix.

Section starts inside contents (markdown headings, XML-like opening and closing tags,
'---' lines at line start) are found by SECTION_RE on the encoded pieces, then kept if
inside a content. (tokenizer.py adds one more kind: a content's end where a long stretch
of template glue, such as the tool schemas, follows it.)
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from operator import attrgetter
from typing import NamedTuple

import xxhash

from .alignment import align
from .chat import ChatTemplateError
from .layout_memo import HeaderBook, RenderMemo
from .recent import common_prefix

# A line that opens a section: "# Heading" (1-6 '#', then a blank), "<tag ...>" or "---";
# or one that closes a tagged block, "</tag>": the block's last section then ends the same
# way whatever wrapper or neighbour comes after it (a document retrieved last, then first).
# Matched at the newline before it, so the anchor is that match's start + 1.
SECTION_RE = re.compile(
    r"\n(?=#{1,6}[ \t]|</?[A-Za-z][\w.:-]*(?:[ \t][^>\n]*)?/?>|-{3,}[ \t]*(?:\r?\n|$))"
)

_GEN = "\x00generation"  # HeaderBook key of the generation prompt (no role is named so)
_INDEX = attrgetter("index")
_PAST_END = 1 << 62  # a start read up to the skeleton's end: it moves when the skeleton grows
MAX_EXACT_MESSAGES = 1024  # exact mode renders this many prefixes at most (O(n^2) steps)

Render = Callable[[list, bool], str]  # (messages, add_generation_prompt) -> rendered text


class ChatLayout(NamedTuple):
    message_starts: tuple[int, ...]  # char offset where message i starts; message 0 at 0
    contents: tuple[tuple[int, int] | None, ...]  # char span of message i's content
    generation_start: int | None  # char offset of a non-empty generation prompt
    exact: bool  # True when found by rendering every prefix (no content spans)


def _skeleton(messages: list[dict], nonempty_only: bool) -> list[dict] | None:
    out, any_sentinel = [], False
    for i, m in enumerate(messages):
        c = m.get("content")
        if isinstance(c, str) and (c or not nonempty_only):
            m = {**m, "content": f"\ue000{i}\ue001"}
            any_sentinel = True
        out.append(m)
    return out if any_sentinel else None


def chat_layout(
    render: Render,
    messages: list[dict],
    text: str,
    add_generation_prompt: bool,
    book: HeaderBook,
    memo: RenderMemo,
    cache_key: Callable[[], bytes],
    max_learn: int = 16,
) -> ChatLayout:
    """Message starts and content spans of ``text`` = render(messages, add_generation_prompt).

    ``cache_key()`` identifies the template and its variables (tools, ...) in ``memo``.
    """
    for nonempty_only in (False, True):
        skel = _skeleton(messages, nonempty_only)
        if skel is None:
            continue
        key = xxhash.xxh3_128_digest(
            b"S" + cache_key() + repr((skel, add_generation_prompt)).encode()
        )
        skel_text = memo.get(key)
        if skel_text is None:
            try:
                skel_text = render(skel, add_generation_prompt)
            except ChatTemplateError:
                skel_text = ""  # remembered as "this skeleton does not render"
            memo.put(key, skel_text)
        if not skel_text:
            continue
        expected = [i for i, m in enumerate(skel) if m is not messages[i]]
        located = align(skel_text, text, messages, expected, memo)
        if located is not None:
            return _from_alignment(render, messages, skel, skel_text, located,
                                   add_generation_prompt, book, max_learn, memo)
    return _exact(render, messages, text, add_generation_prompt, memo, cache_key)


class _Starts(NamedTuple):
    """One _from_alignment call's message starts, kept to reuse the next turn's head."""

    book: HeaderBook
    skel_text: str
    located: list
    roles: list
    starts: list[int]
    reach: list[int]  # reach[i]: the furthest skeleton char starts[:i + 1] were read from
    settled: int  # starts[:settled] came from durable answers (the book's, no render)


def _settled_head(last: _Starts | None, book, skel_text, located, roles) -> int:
    """How many leading starts of the last call this one would compute again, the same.

    Message i's start is read from its role, skel_text up to reach[i] and the located
    contents before that (to place the glue in the real text); from the book when settled,
    whose answer for a glue never changes once given (an exact memo is written once, and a
    header that ends a glue is never outgrown: a longer one ending it would have been
    matched by the shorter when it was learned).
    """
    if last is None or last.book is not book:
        return 0
    kl = _common_len(located, last.located)
    limit = min(common_prefix(last.skel_text, skel_text),
                located[kl].s - 1 if kl < len(located) else len(skel_text),
                last.located[kl].s - 1 if kl < len(last.located) else len(skel_text))
    r = min(bisect_right(last.reach, limit), last.settled, len(roles))
    return _common_len(roles[:r], last.roles[:r])


def _common_len(a: list, b: list) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _from_alignment(render, messages, skel, skel_text, located, agp, book, max_learn, memo):
    n = len(messages)
    ends = [loc.e for loc in located]
    budget = [max_learn]
    roles = [m.get("role") for m in messages]
    last = memo.last_starts
    r = _settled_head(last, book, skel_text, located, roles)

    def to_real(q: int) -> int:  # skeleton offset (in glue) -> real offset
        k = bisect_right(ends, q) - 1
        return q if k < 0 else q + located[k].re - located[k].e

    def exact_end(count: int) -> int | None:
        """len(render(skel[:count])) if a prefix of the skeleton render, else -1;
        None when this call's render budget is spent."""
        if budget[0] <= 0:
            return None
        budget[0] -= 1
        try:
            r = render(skel[:count], False)
        except ChatTemplateError:
            return -1
        return len(r) if skel_text.startswith(r) else -1

    starts = last.starts[:r] + [0] * (n - r) if r else [0] * n
    reach = last.reach[:r] if r else []
    top, settled = reach[-1] if r else -1, r
    j = bisect_left(located, r, key=_INDEX)  # located[j]: the first at or after message r
    prev = located[j - 1] if j else None  # the last located message before i
    for i in range(r, n):
        loc = located[j] if j < len(located) and located[j].index == i else None
        durable = True
        if i > 0:
            lo = prev.e if prev is not None else 0
            hi = located[j].s if j < len(located) else len(skel_text)
            top = max(top, hi if j < len(located) else _PAST_END)
            start = None
            if loc is not None and prev is not None and prev.index == i - 1:
                role, glue = str(roles[i]), skel_text[lo:hi]
                hl = book.match(role, glue)
                if hl is None:
                    p = exact_end(i)
                    if p is not None:  # None: out of budget, try again next call
                        hl = hi - p if lo <= p <= hi else -1
                        book.learn(role, glue, hl)
                start = hi - hl if hl is not None and hl >= 0 else None
                durable = hl is not None and book.match(role, glue) == hl
            else:  # no located content here or before: an exact render places it, once
                key = f"\x01{roles[i]}@{i - (prev.index if prev else -1)}"
                glue = skel_text[lo:hi]
                rel = book.recall(key, glue)
                if rel is None:
                    p = exact_end(i)
                    if p is not None:
                        rel = p - lo if lo <= p <= hi else -1
                        book.remember(key, glue, rel)
                start = lo + rel if rel is not None and rel >= 0 else None
                durable = rel is not None and book.recall(key, glue) == rel
            starts[i] = max(to_real(start if start is not None else lo), starts[i - 1])
        reach.append(top)
        settled += settled == i and durable
        if loc is not None:
            prev = loc
            j += 1
    memo.last_starts = _Starts(book, skel_text, located, roles, starts, reach, settled)
    gen = None
    if agp:
        lo = prev.e if prev is not None else 0
        glue = skel_text[lo:]
        hl = book.match(_GEN, glue)
        if hl is None:
            g = exact_end(n)
            if g is not None:
                hl = len(skel_text) - g if g >= lo else -1
                book.learn(_GEN, glue, hl)
        if hl is not None and hl > 0:
            gen = to_real(len(skel_text) - hl)
    contents: list = [None] * n
    for loc in located:
        contents[loc.index] = (loc.rs, loc.re)
    return ChatLayout(tuple(starts), tuple(contents), gen, False)


def _hash(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


class _PrefixHashes:
    """Whether a rendered prefix (length in chars, _hash) is the head of ``text``: one
    streaming hash over the text, fed up to each asked length in turn (the asked lengths
    grow with the messages, so the text is hashed about once)."""

    def __init__(self, text: str):
        self.text = text
        self._h, self._at = xxhash.xxh3_64(), 0

    def length_if_prefix(self, length: int, digest: int) -> int:
        if length < 0 or length > len(self.text):
            return -1
        if length < self._at:
            self._h, self._at = xxhash.xxh3_64(), 0
        self._h.update(self.text[self._at : length].encode("utf-8", "surrogatepass"))
        self._at = length
        return length if self._h.intdigest() == digest else -1


def _exact(
    render, messages, text, agp, memo: RenderMemo, cache_key: Callable[[], bytes]
) -> ChatLayout:
    n = len(messages)
    starts = [0] * n
    h = xxhash.xxh3_128(b"P" + cache_key())
    # The memo keeps what a prefix of the messages renders to (its length and hash), never
    # whether this text starts with it: a template that gathers a late system message into
    # the head renders the same first messages differently under a longer list.
    head = _PrefixHashes(text)
    for i in range(1, n + 1):
        h.update(
            json.dumps(messages[i - 1], sort_keys=True, ensure_ascii=False, default=str).encode(
                "utf-8", "surrogatepass"
            )
        )
        if i == n and not agp:
            break
        key = h.digest()
        rendered = memo.get(key)
        if rendered is None and i <= MAX_EXACT_MESSAGES:
            try:
                r = render(messages[:i], False)
                rendered = (len(r), _hash(r))
            except ChatTemplateError:
                rendered = (-1, 0)
            memo.put(key, rendered)
        p = None if rendered is None else head.length_if_prefix(*rendered)
        if i < n:
            starts[i] = max(p if p is not None and p >= 0 else 0, starts[i - 1])
        elif p is not None and 0 <= p < len(text):
            return ChatLayout(tuple(starts), (None,) * n, p, True)
    return ChatLayout(tuple(starts), (None,) * n, None, True)
