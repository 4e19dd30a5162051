"""Split text at a tokenizer's added tokens, the way `tokenizers` does before pre-tokenizing.

`tokenizers` finds added tokens (special or not) with a leftmost-longest match, cuts the
input there, and runs normalizer, pre-tokenizer and model on each piece in between on its
own. Splitting the same way here lets each piece be encoded (and cached) separately. The
match is a regex built as a trie of the token strings: a flat alternation of ~1300 tokens
would be tried one by one at every '<' of a code-heavy prompt.

Whether the split really matches the library is checked at load time (see
ModelTokenizer.self_check); lstrip/rstrip/single_word tokens are handled with regex
approximations, so for them the check is what makes the result trustworthy.
"""

from __future__ import annotations

import re
from typing import NamedTuple

NOT_ADDED = -1


class Piece(NamedTuple):
    """text == whole[start:start + len(text)]; token_id >= 0 when the piece is an added token."""

    start: int
    text: str
    token_id: int


def _trie_pattern(words: list[str]) -> str:
    """A regex matching any of ``words``, longest first at each position."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = True

    def emit(node: dict) -> str:
        end = "" in node
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # Greedy optional: try the longer token first, fall back to the shorter one.
        return f"(?:{body})?" if end else body

    return emit(trie)


class AddedTokenSplitter:
    """Finds added tokens in text. ``tokens`` are the tokenizer.json "added_tokens" entries."""

    def __init__(self, tokens: list[dict]):
        self.ids: dict[str, int] = {}
        plain: list[str] = []
        flagged: list[str] = []
        for t in tokens:
            content = t["content"]
            if not content:
                continue
            self.ids[content] = int(t["id"])
            if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
                core = re.escape(content)
                if t.get("single_word"):
                    core = rf"(?<!\w){core}(?!\w)"
                left = r"\s*" if t.get("lstrip") else ""
                right = r"\s*" if t.get("rstrip") else ""
                flagged.append(left + core + right)
            else:
                plain.append(content)
        self.has_flagged = bool(flagged)
        self.max_len = max((len(c) for c in self.ids), default=0)
        parts = flagged + ([_trie_pattern(plain)] if plain else [])
        self._re = re.compile("|".join(parts)) if parts else None

    def _token_id(self, matched: str) -> int:
        for cand in (matched, matched.lstrip(), matched.rstrip(), matched.strip()):
            tid = self.ids.get(cand)
            if tid is not None:
                return tid
        raise AssertionError(f"added-token regex matched unknown text {matched!r}")

    def split(self, text: str, pos: int = 0) -> list[Piece]:
        """Pieces tiling ``text[pos:]`` in order (starts are offsets in ``text``); added
        tokens are pieces of their own. ``pos`` must be a split point of the whole text."""
        if self._re is None:
            return [Piece(pos, text[pos:], NOT_ADDED)] if pos < len(text) else []
        pieces: list[Piece] = []
        for m in self._re.finditer(text, pos):
            s, e = m.span()
            if s == e:
                continue
            if s > pos:
                pieces.append(Piece(pos, text[pos:s], NOT_ADDED))
            pieces.append(Piece(s, m.group(), self._token_id(m.group())))
            pos = e
        if pos < len(text):
            pieces.append(Piece(pos, text[pos:], NOT_ADDED))
        return pieces
