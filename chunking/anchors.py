"""Structural boundaries of a rendered chat: where each message starts and where its content is.

A message starts where the template's output for the messages before it ends (the prefix
definition: render(messages[:i]) is a prefix of render(messages)). Rendering every prefix
costs O(n^2) template steps, so instead:

1. The chat is rendered once more with each message's content replaced by a sentinel.
   Walking both renders together gives each content's char span in the real text (the
   template glue between sentinels must appear verbatim; content may have been stripped).
2. The glue before a content ends with that message's header ("<|user|>", ...). Headers
   are learned per role from one exact prefix render the first time a glue does not end
   with a known one, then matched as the longest known suffix.
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
from bisect import bisect_right
from collections.abc import Callable
from typing import NamedTuple

import xxhash

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

_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
_GEN = "\x00generation"  # HeaderBook key of the generation prompt (no role is named so)
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


def _content_len(text: str, cur: int, content: str, after: str) -> int | None:
    """Length of the rendered form of ``content`` at text[cur:], followed by glue ``after``."""
    if text.startswith(content, cur) and text.startswith(after, cur + len(content)):
        return len(content)  # verbatim, the usual case
    for cand in dict.fromkeys((content.strip(), content.lstrip(), content.rstrip())):
        if text.startswith(cand, cur) and text.startswith(after, cur + len(cand)):
            return len(cand)
    if after:  # a template that keeps only part of the content (e.g. drops reasoning)
        j = text.find(after, cur)
        if j >= 0 and text[cur:j] in content:
            return j - cur
    return None


class _Located(NamedTuple):
    index: int  # message index
    s: int  # sentinel span in the skeleton render
    e: int
    rs: int  # content span in the real render
    re: int


class _Alignment(NamedTuple):
    """One _align call's inputs and result, kept to align the next prompt's shared head."""

    skel_text: str
    text: str
    contents: list  # message i's content, per located sentinel
    found: list  # (message index, start, end) of each sentinel in skel_text
    located: list


def _reusable(last: _Alignment | None, skel_text: str, text: str, found, messages) -> int:
    """How many leading entries of ``last.located`` the walk below would produce again.

    Entry k is read from skel_text up to the next sentinel's start (its glue, its index and
    the glue after it) and from text up to cur + len(content) + len(after) at most (every
    candidate _content_len tries, the verbatim one being the longest, and find() stopping at
    the chosen end). Equal inputs there, and the same content, give the same entry.
    """
    if last is None:
        return 0
    ps = common_prefix(last.skel_text, skel_text)
    pt = common_prefix(last.text, text)
    k, m = 0, min(len(last.located), len(found))
    while k < m:
        i, _, e = found[k]
        nxt = found[k + 1][1] if k + 1 < len(found) else len(skel_text)
        old = last.found
        old_nxt = old[k + 1][1] if k + 1 < len(old) else len(last.skel_text)
        if old[k] != found[k] or nxt != old_nxt or nxt > ps:
            break  # sentinel, glue before it or glue after it ("after") not the same
        content = messages[i]["content"]
        if content != last.contents[k]:
            break
        if last.located[k].rs + len(content) + (nxt - e) > pt:
            break
        k += 1
    return k


def _align(skel_text: str, text: str, messages: list[dict], expected: list[int],
           memo: RenderMemo | None = None):
    found = [(int(m.group(1)), m.start(), m.end()) for m in _SENTINEL_RE.finditer(skel_text)]
    if [f[0] for f in found] != expected:
        return None  # a content dropped, repeated or reordered by the template
    last = memo.last_alignment if memo is not None else None
    k0 = _reusable(last, skel_text, text, found, messages)
    located = last.located[:k0] if k0 else []
    cur = located[-1].re if k0 else 0
    prev = found[k0 - 1][2] if k0 else 0
    for k in range(k0, len(found)):
        i, s, e = found[k]
        glue = skel_text[prev:s]
        if not text.startswith(glue, cur):
            return None
        cur += len(glue)
        after = skel_text[e : found[k + 1][1] if k + 1 < len(found) else len(skel_text)]
        n = _content_len(text, cur, messages[i]["content"], after)
        if n is None:
            return None
        located.append(_Located(i, s, e, cur, cur + n))
        cur, prev = cur + n, e
    if text[cur:] != skel_text[prev:]:
        return None
    if memo is not None:
        contents = [messages[f[0]]["content"] for f in found]
        memo.last_alignment = _Alignment(skel_text, text, contents, found, located)
    return located


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
        located = _align(skel_text, text, messages, expected, memo)
        if located is not None:
            return _from_alignment(
                render, messages, skel, skel_text, located, add_generation_prompt, book, max_learn
            )
    return _exact(render, messages, text, add_generation_prompt, memo, cache_key)


def _from_alignment(render, messages, skel, skel_text, located, agp, book, max_learn):
    n = len(messages)
    by_index = {loc.index: loc for loc in located}
    ends = [loc.e for loc in located]
    budget = [max_learn]

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

    starts, prev = [0] * n, None  # prev: last located message before i
    for i in range(n):
        loc = by_index.get(i)
        if i > 0:
            lo = prev.e if prev is not None else 0
            hi = loc.s if loc is not None else _next_start(located, i, len(skel_text))
            start = None
            if loc is not None and prev is not None and prev.index == i - 1:
                role, glue = str(messages[i].get("role")), skel_text[lo:hi]
                hl = book.match(role, glue)
                if hl is None:
                    p = exact_end(i)
                    if p is not None:  # None: out of budget, try again next call
                        hl = hi - p if lo <= p <= hi else -1
                        book.learn(role, glue, hl)
                start = hi - hl if hl is not None and hl >= 0 else None
            else:  # no located content here or before: an exact render places it, once
                key = f"\x01{messages[i].get('role')}@{i - (prev.index if prev else -1)}"
                glue = skel_text[lo:hi]
                rel = book.recall(key, glue)
                if rel is None:
                    p = exact_end(i)
                    if p is not None:
                        rel = p - lo if lo <= p <= hi else -1
                        book.remember(key, glue, rel)
                start = lo + rel if rel is not None and rel >= 0 else None
            starts[i] = max(to_real(start if start is not None else lo), starts[i - 1])
        if loc is not None:
            prev = loc
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
    contents = tuple((by_index[i].rs, by_index[i].re) if i in by_index else None for i in range(n))
    return ChatLayout(tuple(starts), contents, gen, False)


def _next_start(located, i: int, default: int) -> int:
    for loc in located:
        if loc.index > i:
            return loc.s
    return default


def _exact(
    render, messages, text, agp, memo: RenderMemo, cache_key: Callable[[], bytes]
) -> ChatLayout:
    n = len(messages)
    starts = [0] * n
    h = xxhash.xxh3_128(b"P" + cache_key())
    for i in range(1, n + 1):
        h.update(
            json.dumps(messages[i - 1], sort_keys=True, ensure_ascii=False, default=str).encode(
                "utf-8", "surrogatepass"
            )
        )
        if i == n and not agp:
            break
        key = h.digest()
        p = memo.get(key)
        if p is None and i <= MAX_EXACT_MESSAGES:
            try:
                r = render(messages[:i], False)
                p = len(r) if text.startswith(r) else -1
            except ChatTemplateError:
                p = -1
            memo.put(key, p)
        if i < n:
            starts[i] = max(p if p is not None and p >= 0 else 0, starts[i - 1])
        elif p is not None and 0 <= p < len(text):
            return ChatLayout(tuple(starts), (None,) * n, p, True)
    return ChatLayout(tuple(starts), (None,) * n, None, True)
