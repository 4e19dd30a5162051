"""Where each message's content lies in a rendered chat: the skeleton render (each content
replaced by a sentinel) walked against the real one (chunking/anchors.py, step 1).

The previous call's walk is kept in the RenderMemo: an agent's next turn shares most of its
skeleton and text with the last one, so its sentinels are searched for, and its contents
walked, only past that shared part. Every shortcut here gives what the full walk gives.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from operator import itemgetter
from typing import NamedTuple

from .recent import common_prefix

SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
_END = itemgetter(2)


class Located(NamedTuple):
    index: int  # message index
    s: int  # sentinel span in the skeleton render
    e: int
    rs: int  # content span in the real render
    re: int


class Alignment(NamedTuple):
    """One align() call's inputs and result, kept to align the next prompt's shared head."""

    skel_text: str
    text: str
    contents: list  # message i's content, per located sentinel
    found: list  # (message index, start, end) of each sentinel in skel_text
    located: list
    reach: list  # reach[k]: the furthest char of text entries 0..k were read to


def content_len(text: str, cur: int, content: str, after: str) -> int | None:
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


def align(skel_text: str, text: str, messages: list[dict], expected: list[int],
          memo=None) -> list[Located] | None:
    """Each content's span in ``text``, in sentinel order; None where the walk fails.
    ``memo`` (a RenderMemo) holds the last alignment; this call's replaces it."""
    last = memo.last_alignment if memo is not None else None
    kf = ps = 0
    if last is not None:
        # A match attempt reads no further than the next non-digit after its start, so the
        # scan up to the end of a sentinel inside the shared head finds what it found then.
        ps = common_prefix(last.skel_text, skel_text)
        kf = bisect_right(last.found, ps, key=_END)
    found = last.found[:kf] if kf else []
    found += [(int(m.group(1)), m.start(), m.end())
              for m in SENTINEL_RE.finditer(skel_text, found[-1][2] if kf else 0)]
    if [f[0] for f in found] != expected:
        return None  # a content dropped, repeated or reordered by the template
    contents = [messages[f[0]]["content"] for f in found]
    k0 = _reusable(last, skel_text, text, found, contents, ps, kf)
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
        n = content_len(text, cur, contents[k], after)
        if n is None:
            return None
        located.append(Located(i, s, e, cur, cur + n))
        cur, prev = cur + n, e
    if text[cur:] != skel_text[prev:]:
        return None
    if memo is not None:
        keep = max(0, min(k0, kf) - 1)  # entries whose next sentinel is the same too
        reach = last.reach[:keep] if keep else []
        top = reach[-1] if reach else -1
        for k in range(keep, len(found)):
            nxt = found[k + 1][1] if k + 1 < len(found) else len(skel_text)
            top = max(top, located[k].rs + len(contents[k]) + nxt - found[k][2])
            reach.append(top)
        memo.last_alignment = Alignment(skel_text, text, contents, found, located, reach)
    return located


def _reusable(last: Alignment | None, skel_text: str, text: str, found, contents, ps: int,
              kf: int) -> int:
    """How many leading entries of ``last.located`` the walk would produce again.

    Entry k is read from skel_text up to the next sentinel's start (its glue, its index and
    the glue after it) and from text up to cur + len(content) + len(after) at most (every
    candidate content_len tries, the verbatim one being the longest, and find() stopping at
    the chosen end). Equal inputs there, and the same content, give the same entry. Entries
    before kf - 1 have their sentinel and the next one in the shared skeleton head, so only
    their contents and how far into text they read (``reach``) are left to compare.
    """
    if last is None:
        return 0
    pt = common_prefix(last.text, text)
    m = min(len(last.located), len(found))
    k = max(0, min(kf - 1, m, bisect_right(last.reach, pt)))
    if contents[:k] != last.contents[:k]:
        k = next(j for j in range(k) if contents[j] != last.contents[j])
        return k
    old = last.found
    while k < m:
        e = found[k][2]
        nxt = found[k + 1][1] if k + 1 < len(found) else len(skel_text)
        old_nxt = old[k + 1][1] if k + 1 < len(old) else len(last.skel_text)
        if old[k] != found[k] or nxt != old_nxt or nxt > ps:
            break  # sentinel, glue before it or glue after it ("after") not the same
        if contents[k] != last.contents[k]:
            break
        if last.located[k].rs + len(contents[k]) + (nxt - e) > pt:
            break
        k += 1
    return k
