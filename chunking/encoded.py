"""Piece-wise encoding through the span cache, and mapping char offsets to token offsets.

For a byte-level BPE vocabulary (every token is a run of byte symbols) a token's length in
UTF-8 bytes is a table lookup, so token boundaries inside a cached piece are a cumsum over
its IDs and no offsets have to be kept or converted from Python tuples (which costs ~10% of
the encode itself). Other vocabularies keep each piece's char offsets.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import chain

import numpy as np
from tokenizers import Tokenizer, pre_tokenizers

from .added_tokens import NOT_ADDED, AddedTokenSplitter, Piece
from .anchors import SECTION_RE
from .recent import RecentPrompts
from .span_cache import SpanCache, SpanEncoding

_EMPTY = np.zeros(0, np.int32)
_PROBE_TEXTS = (
    "Hello world",
    "  two  spaces ",
    "line one\n\nline two\n",
    "\t\ttabs\r\n",
    "x = 12345678 + 9",
    "naïve café — 日本語のテキスト，中文。 😀👍🏽",
    "def f(a, b):\n    return a ** b  # note\n",
    '<document index="1">\n# Title\n---\n</document>',
    "   ",
    "\n",
    "a",
)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class Encoded:
    """An encoded text: IDs plus what is needed to map char offsets to token offsets."""

    def __init__(
        self,
        encoder: PieceEncoder,
        text: str,
        pieces: list[Piece],
        entries: list[SpanEncoding | None],
        ids: np.ndarray,
        tok_starts: list[int],
        base: Encoded | None = None,
        keep: int = 0,
    ):
        """``base``: an encoding whose first ``keep`` pieces (and their tokens) are ours."""
        self._enc = encoder
        self.text, self.pieces, self.entries, self.ids = text, pieces, entries, ids
        self._chars = (
            base._chars[:keep] + [p.start for p in pieces[keep:]]
            if base
            else [p.start for p in pieces]
        )
        self._toks = tok_starts
        self._sections = self._find_sections(base, keep)
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None  # _chars, _toks as arrays

    def chars_to_tokens(self, positions) -> list[int]:
        """char_to_token of each position, vectorised for positions at a piece start (message
        starts and content ends usually are: the template puts added tokens there)."""
        if not len(positions):
            return []
        if self._arrays is None:
            self._arrays = (np.asarray(self._chars, np.int64), np.asarray(self._toks, np.int64))
        chars, toks = self._arrays
        pos = np.asarray(positions, np.int64)
        k = np.searchsorted(chars, pos, side="right") - 1
        at_start = (k >= 0) & (chars[np.maximum(k, 0)] == pos)
        out = np.where(at_start, toks[np.maximum(k, 0)], 0).tolist()
        if not at_start.all():
            for j in np.flatnonzero(~at_start).tolist():
                out[j] = self.char_to_token(int(pos[j]))
        return out

    def char_to_token(self, pos: int) -> int:
        """Index of the first token starting at or after char ``pos`` (a token that
        straddles ``pos`` is skipped: the boundary moves to the next token)."""
        k = bisect_right(self._chars, pos) - 1
        if k < 0:
            return 0
        piece, entry, t0 = self.pieces[k], self.entries[k], self._toks[k]
        if pos == piece.start:
            return t0
        if pos >= piece.start + len(piece.text):
            return len(self.ids)
        if entry is None:  # inside an added token
            return t0 + 1
        return t0 + int(self._enc.local_tokens(piece.text, entry, [pos - piece.start])[0])

    def section_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(char offsets, token offsets) of section starts in the whole text."""
        return self._sections

    def _find_sections(self, base: Encoded | None, keep: int):
        chars, toks = [], []
        if base is not None:  # the kept pieces' sections are base's before the kept end
            end = self._chars[keep - 1] + len(self.pieces[keep - 1].text)
            bc, bt = base._sections
            m = bc < end
            chars.append(bc[m])
            toks.append(bt[m])
        for k in range(keep, len(self.pieces)):
            e = self.entries[k]
            if e is not None and len(e.section_chars):
                chars.append(e.section_chars.astype(np.int64) + self._chars[k])
                toks.append(e.section_tokens.astype(np.int64) + self._toks[k])
        if not chars:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(chars), np.concatenate(toks)

    def added_run_starts(self) -> list[int]:
        """Token offsets where a run of added tokens begins (whitespace pieces don't break it)."""
        if not self._enc.per_span:  # one piece: find the added tokens among the IDs
            mask = np.isin(self.ids, self._enc.added_ids)
            return np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]])).tolist()
        out, in_run = [], False
        for p, t0 in zip(self.pieces, self._toks):
            if p.token_id != NOT_ADDED:
                if not in_run:
                    out.append(t0)
                in_run = True
            elif not p.text.isspace():
                in_run = False
        return out


class PieceEncoder:
    """Encodes text piece by piece (or whole, when ``per_span`` is False)."""

    def __init__(self, tokenizer: Tokenizer, splitter: AddedTokenSplitter, options):
        self._tok = tokenizer
        self.splitter = splitter
        self.cache = SpanCache(options.cache_entries, options.cache_chars)
        self.recent = RecentPrompts(options.recent_prompts)
        self.per_span = True
        self._one = {tid: np.array([tid], np.int32) for tid in splitter.ids.values()}
        self.added_ids = np.array(sorted(splitter.ids.values()), np.int32)
        self._fast = hasattr(tokenizer, "encode_batch_fast")
        self._byte_len = self._byte_lengths()

    def _byte_lengths(self) -> np.ndarray | None:
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        vocab = self._tok.get_vocab(with_added_tokens=False)
        table = np.zeros(
            max(self._tok.get_vocab_size(True), max(vocab.values(), default=0) + 1), np.int64
        )
        added = set(self.splitter.ids.values())
        for token, tid in vocab.items():
            if tid in added:
                continue  # added tokens are pieces of their own, never inside a piece
            if not alphabet.issuperset(token):
                return None  # not a byte-level vocabulary
            table[tid] = len(token)
        return table

    # --- encoding -------------------------------------------------------------------------
    def _encode_new(self, texts: list[str], offsets: bool = False) -> list[SpanEncoding]:
        """Encode pieces the cache does not have; ``offsets`` keeps char offsets even for a
        byte-level vocabulary (whole-string mode: added tokens are inside the text)."""
        byte_mode = self._byte_len is not None and not offsets
        try:
            if byte_mode and self._fast and len(texts) > 1:
                encs = self._tok.encode_batch_fast(texts, add_special_tokens=False)
            elif len(texts) > 1:
                encs = self._tok.encode_batch(texts, add_special_tokens=False)
            else:
                encs = [self._tok.encode(texts[0], add_special_tokens=False)]
        except TypeError as e:  # what tokenizers raises for a str it cannot take as UTF-8
            bad = next((t for t in texts if not _is_utf8(t)), None)
            if bad is None:
                raise
            raise ValueError(
                f"text cannot be tokenized: it holds a lone UTF-16 surrogate (near {bad[:40]!r})"
            ) from e
        out = []
        for text, enc in zip(texts, encs):
            ids = np.array(enc.ids, np.int32)
            starts = None
            if not byte_mode:
                flat = np.fromiter(chain.from_iterable(enc.offsets), np.int64, 2 * len(ids))
                starts = np.maximum.accumulate(flat[0::2]) if len(ids) else _EMPTY
            entry = SpanEncoding(ids, _EMPTY, _EMPTY, starts)
            secs = [m.start() + 1 for m in SECTION_RE.finditer(text)]
            if secs:
                entry = entry._replace(
                    section_chars=np.array(secs, np.int32),
                    section_tokens=self.local_tokens(text, entry, secs),
                )
            out.append(entry)
        return out

    def local_tokens(self, text: str, entry: SpanEncoding, positions: list[int]) -> np.ndarray:
        """Token offsets (within the piece) of char ``positions`` (sorted) in ``text``."""
        if entry.char_starts is not None:
            return np.searchsorted(entry.char_starts, positions, side="left").astype(np.int32)
        lengths = self._byte_len[entry.ids]
        starts = np.cumsum(lengths) - lengths
        byte_pos, b, prev = [], 0, 0
        for p in positions:
            b += len(text[prev:p].encode("utf-8"))
            byte_pos.append(b)
            prev = p
        return np.searchsorted(starts, byte_pos, side="left").astype(np.int32)

    def encode(self, text: str, use_cache: bool = True) -> Encoded:
        """Encode ``text``; with ``use_cache``, through the piece cache and recent prompts."""
        if not self.per_span:
            pieces = [Piece(0, text, NOT_ADDED)] if text else []
            entries = self._encode_new([text], offsets=True) if text else []
            return self._assemble(text, pieces, entries)
        old, keep = None, 0
        if use_cache and not self.splitter.has_flagged:  # \s* of lstrip tokens: no margin
            found = self.recent.best(text)
            if found is not None:
                old, n = found
                if n == len(text) == len(old.text):
                    return old
                keep = self._reusable(old, n)
        if keep:
            last = old.pieces[keep - 1]
            pieces = old.pieces[:keep] + self.splitter.split(text, last.start + len(last.text))
            entries = old.entries[:keep] + [None] * (len(pieces) - keep)
        else:
            pieces = self.splitter.split(text)
            entries = [None] * len(pieces)
        missing: dict[str, list[int]] = {}
        for k in range(keep, len(pieces)):
            p = pieces[k]
            if p.token_id == NOT_ADDED:
                hit = self.cache.get(p.text) if use_cache else None
                if hit is None:
                    missing.setdefault(p.text, []).append(k)
                entries[k] = hit
        if missing:
            texts = list(missing)
            for t, e in zip(texts, self._encode_new(texts)):
                if use_cache:
                    self.cache.put(t, e)
                for k in missing[t]:
                    entries[k] = e
        enc = self._assemble(text, pieces, entries, old if keep else None, keep)
        if use_cache:
            self.recent.add(enc)
        return enc

    def _reusable(self, old: Encoded, common: int) -> int:
        """How many of ``old``'s pieces a text sharing its first ``common`` chars splits
        into identically: up to an added token that starts at least one longest-token length
        before the first difference (the longest-match choice there saw only shared text)."""
        k = bisect_right(old._chars, common - self.splitter.max_len) - 1
        while k >= 0 and old.pieces[k].token_id == NOT_ADDED:
            k -= 1
        return k + 1

    def _assemble(
        self, text, pieces, entries, old: Encoded | None = None, keep: int = 0
    ) -> Encoded:
        if old is not None:
            t = old._toks[keep - 1] + 1  # the kept prefix ends with an added token
            arrays, tok_starts = [old.ids[:t]], old._toks[:keep]
        else:
            arrays, tok_starts, t = [], [], 0
        for k in range(keep, len(pieces)):
            p, e = pieces[k], entries[k]
            tok_starts.append(t)
            a = self._one[p.token_id] if e is None else e.ids
            arrays.append(a)
            t += len(a)
        ids = np.concatenate(arrays) if arrays else _EMPTY
        return Encoded(self, text, pieces, entries, ids, tok_starts, old, keep)

    # --- self-check -----------------------------------------------------------------------
    def probes(self, added_tokens: list[dict], max_tokens: int = 24) -> list[str]:
        """Strings where piece-wise encoding could differ from whole-string encoding."""
        flagged = [
            t for t in added_tokens if t.get("lstrip") or t.get("rstrip") or t.get("single_word")
        ]
        plain = [t for t in added_tokens if t not in flagged]
        step = max(1, len(plain) // max_tokens)
        chosen = [t["content"] for t in flagged + plain[::step]]
        out = list(_PROBE_TEXTS)
        for i, tok in enumerate(chosen):
            a, b = _PROBE_TEXTS[i % len(_PROBE_TEXTS)], _PROBE_TEXTS[(i + 3) % len(_PROBE_TEXTS)]
            out += [f"{a}{tok}{b}", f" {tok} ", f"\n{tok}\n\n", f"{tok}{tok}x", f"{b} {tok}{a}"]
        out.append("\n".join(_PROBE_TEXTS).join(chosen) if chosen else "")
        return out

    def self_check(self, added_tokens: list[dict]) -> str | None:
        """The first probe whose piece-wise encoding differs from the library's (or whose
        byte lengths do not add up, which turns byte-length mapping off); None if all agree."""
        for text in self.probes(added_tokens):
            whole = self._tok.encode(text, add_special_tokens=False).ids
            if self.encode(text, use_cache=False).ids.tolist() != whole:
                return text
        if self._byte_len is not None:
            for text in self.probes(added_tokens):
                for p in self.splitter.split(text):
                    ids = self._tok.encode(p.text, add_special_tokens=False).ids
                    if p.token_id == NOT_ADDED and int(self._byte_len[ids].sum()) != len(
                        p.text.encode()
                    ):
                        self._byte_len = None  # e.g. add_prefix_space: keep offsets instead
                        break
                if self._byte_len is None:
                    break
        return None
