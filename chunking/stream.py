"""Streaming detokenisation: turn generated token IDs into text one token at a time.

A token may end in the middle of a UTF-8 character (byte-level BPE) or change how the
previous tokens decode (leading-space rules), so text is only emitted once it is stable.
`tokenizers.decoders.DecodeStream` does this in Rust; the fallback keeps a short window of
recent IDs and emits the difference between decoding the window with and without the new
token, holding back text that ends in U+FFFD (an incomplete character).
"""

from __future__ import annotations

from tokenizers import Tokenizer

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None


class StreamDecoder:
    """Feed token IDs with ``step``; each call returns the new text (possibly "")."""

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = True, use_rust: bool = True
    ):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._rust = (
            DecodeStream(skip_special_tokens=skip_special_tokens)
            if use_rust and DecodeStream is not None
            else None
        )
        self._ids: list[int] = []
        self._prefix = 0  # window start: decoding starts here so leading-space rules hold
        self._read = 0  # IDs before this index have been emitted

    @property
    def uses_rust(self) -> bool:
        return self._rust is not None

    def step(self, token_id: int) -> str:
        token_id = int(token_id)
        if self._rust is not None:
            return self._rust.step(self._tok, token_id) or ""
        self._ids.append(token_id)
        done = self._tok.decode(
            self._ids[self._prefix : self._read], skip_special_tokens=self._skip
        )
        full = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        if len(full) > len(done) and not full.endswith("\ufffd"):
            new = full[len(done) :]
            self._prefix, self._read = self._read, len(self._ids)
            return new
        return ""
