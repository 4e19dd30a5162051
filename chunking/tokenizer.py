"""The model's tokenizer as the engine uses it, with per-piece caching and structural anchors.

Text is split at added tokens exactly where `tokenizers` splits it, and each piece is
encoded on its own through an LRU cache, so a resent conversation only tokenizes what is
new. At load, a self-check compares piece-wise and whole-string encoding on probe strings;
if they differ the tokenizer encodes whole strings (``per_span`` is False).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import xxhash
from tokenizers import Tokenizer

from .added_tokens import AddedTokenSplitter
from .anchors import SECTION_RE, HeaderBook, RenderMemo, chat_layout
from .chat import ChatTemplate, ChatTemplateError, normalize_messages
from .encoded import Encoded, PieceEncoder
from .recent import RecentPrompts
from .stream import StreamDecoder
from .tokenizer_files import prompt_specials, read_tokenizer_files


@dataclass(frozen=True)
class TokenizerConfig:
    """cache_entries/cache_chars bound the piece cache (a 32K-token agent prompt is ~130K
    chars, so the default keeps a few hundred distinct conversations); recent_prompts is
    how many prompt heads keep their last encodings for prefix reuse; final_assistant
    "as_user" turns a trailing assistant message into a user one, as SGLang's OpenAI server
    does when continue_final_message is off ("keep" renders it as given, as transformers)."""

    cache_entries: int = 65536
    cache_chars: int = 64 << 20
    recent_prompts: int = 64
    self_check: bool = True
    parse_tool_arguments: bool = True
    final_assistant: str = "keep"

    def __post_init__(self):
        if min(self.cache_entries, self.cache_chars, self.recent_prompts) < 0:
            raise ValueError("cache_entries, cache_chars and recent_prompts must be >= 0")
        if self.final_assistant not in ("keep", "as_user"):
            raise ValueError(
                f"final_assistant must be 'keep' or 'as_user', got {self.final_assistant!r}"
            )


class Prompt(NamedTuple):
    ids: np.ndarray  # int32 token IDs of the rendered prompt
    anchors: tuple[int, ...]  # token offsets of structural boundaries, sorted, in (0, len(ids))
    message_starts: tuple[int, ...]  # token offset where message i starts (system first if any)
    text: str  # the rendered prompt text


_RESERVED = ("messages", "tools", "documents", "add_generation_prompt")


class ModelTokenizer:
    """Use :meth:`from_dir`. Methods are safe to call from several threads."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        name: str,
        added_tokens: list[dict],
        config: dict,
        special_vars: dict[str, str],
        chat_template: ChatTemplate | None,
        generation_eos: tuple[int, ...] = (),
        options: TokenizerConfig = TokenizerConfig(),
    ):
        self.name = name
        self.options = options
        self.chat_template = chat_template
        self._tok = tokenizer
        self._vars = dict(special_vars)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        tid = tokenizer.token_to_id
        bos = special_vars.get("bos_token")
        self.bos_token_id: int | None = tid(bos) if bos else None
        eos = [tid(special_vars["eos_token"])] if special_vars.get("eos_token") else []
        self.eos_token_ids = tuple(
            dict.fromkeys(i for i in [*eos, *generation_eos] if i is not None)
        )
        self.special_ids = frozenset(
            [t["id"] for t in added_tokens if t.get("special")]
            + [i for i in (self.bos_token_id, *self.eos_token_ids) if i is not None]
        )
        self._prompt_prefix, self._prompt_suffix = prompt_specials(tokenizer, config, special_vars)
        self._pieces = PieceEncoder(tokenizer, AddedTokenSplitter(added_tokens), options)
        self._books: dict[str, HeaderBook] = {}
        self._memo = RenderMemo()
        self.per_span = True
        self.self_check_failure: str | None = None  # the probe that failed, if one did
        if options.self_check:
            self.self_check_failure = self._pieces.self_check(added_tokens)
            self.per_span = self.self_check_failure is None
            self._pieces.per_span = self.per_span

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        *,
        options: TokenizerConfig = TokenizerConfig(),
        chat_template: str | None = None,
    ) -> ModelTokenizer:
        """Load ``path``/tokenizer.json and tokenizer_config.json (chat_template.jinja and
        generation_config.json too when present). ``chat_template`` overrides the model's."""
        f = read_tokenizer_files(path, chat_template)
        return cls(
            f.tokenizer,
            name=Path(path).name,
            added_tokens=f.added_tokens,
            config=f.config,
            special_vars=f.special_vars,
            chat_template=f.chat_template,
            generation_eos=f.generation_eos,
            options=options,
        )

    def clear_cache(self) -> None:
        """Forget cached pieces, learned template headers, prefix lengths and render
        checkpoints."""
        self._pieces.cache.clear()
        self._pieces.recent = RecentPrompts(self.options.recent_prompts)
        self._books.clear()
        self._memo = RenderMemo()
        if self.chat_template is not None:
            self.chat_template.clear_checkpoints()

    @property
    def cache_stats(self) -> tuple[int, int, int]:
        """(entries, hits, misses) of the piece cache."""
        c = self._pieces.cache
        return len(c), c.hits, c.misses

    # --- plain text -------------------------------------------------------------------
    def encode(self, text: str) -> np.ndarray:
        """Token IDs of ``text`` without any implicit BOS/EOS (added tokens in it do count)."""
        return self._pieces.encode(_check_text(text)).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(
            np.asarray(ids, dtype=np.int64).tolist(), skip_special_tokens=skip_special_tokens
        )

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self._tok, skip_special_tokens)

    def encode_prompt(self, text: str) -> Prompt:
        """A raw completion prompt as the engine tokenizes it (its BOS/EOS rules applied).

        Anchors: the start of each run of added tokens (role markers in a hand-rendered chat)
        and section starts; no message_starts, since the messages are not known.
        """
        enc = self._pieces.encode(_check_text(text))
        pre, post = self._prompt_prefix, self._prompt_suffix
        ids = np.concatenate([np.asarray(pre, np.int32), enc.ids, np.asarray(post, np.int32)])
        anchors = set(enc.added_run_starts())
        anchors.update(int(t) for t in enc.section_tokens()[1])
        n = len(ids)
        return Prompt(
            ids, tuple(sorted(a + len(pre) for a in anchors if 0 < a + len(pre) < n)), (), text
        )

    # --- chat -------------------------------------------------------------------------
    def _chat(
        self, messages, tools, add_generation_prompt, continue_final_message, template, kwargs
    ):
        if self.chat_template is None:
            raise ChatTemplateError(f"{self.name}: the tokenizer has no chat template")
        for k in _RESERVED:
            if k in kwargs:
                raise ChatTemplateError(f"{k!r} cannot be passed as a chat template variable")
        if tools is not None and not (
            isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
        ):
            raise ChatTemplateError("tools must be a list of objects")
        name = self.chat_template.select(tools, template)
        msgs = normalize_messages(
            messages,
            content_parts=self.chat_template.content_parts[name],
            parse_arguments=self.options.parse_tool_arguments,
        )
        prefix = ""
        last = msgs[-1]
        if last["role"] == "assistant" and isinstance(last.get("content"), str):
            if continue_final_message:  # SGLang: render without it, then append its text
                msgs, prefix, add_generation_prompt = msgs[:-1], last["content"], True
                if not msgs:
                    raise ChatTemplateError(
                        "continue_final_message needs a message before the final one"
                    )
            elif self.options.final_assistant == "as_user":
                msgs[-1] = {"role": "user", "content": last["content"]}
        variables = {**self._vars, **kwargs, "tools": tools, "documents": None}
        render = self._renderer(name, variables)
        try:
            text = render(msgs, add_generation_prompt)
        except ChatTemplateError:
            if not tools:
                raise
            # SGLang retries with bare function schemas (some templates want no wrapper).
            variables["tools"] = [t.get("function", t) for t in tools]
            render = self._renderer(name, variables)
            text = render(msgs, add_generation_prompt)
        return name, msgs, variables, render, text, prefix, add_generation_prompt

    def _renderer(self, name: str, variables: dict):
        template = self.chat_template

        def render(msgs, gen: bool) -> str:
            return template.render(name, msgs, {**variables, "add_generation_prompt": gen})

        return render

    def apply_chat_template(
        self,
        messages,
        *,
        tools=None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text the model's template renders for OpenAI-style ``messages``."""
        *_, text, prefix, _ = self._chat(
            messages, tools, add_generation_prompt, continue_final_message, template, kwargs
        )
        return text + prefix

    def encode_chat(
        self,
        messages,
        *,
        tools=None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template: str | None = None,
        **kwargs: Any,
    ) -> Prompt:
        """Render and tokenize a chat as SGLang does (no BOS added beyond the template's).

        Anchors: every message start, the generation prompt, and section starts inside
        message contents. ``kwargs`` are extra template variables (chat_template_kwargs).
        """
        name, msgs, variables, render, text, prefix, agp = self._chat(
            messages, tools, add_generation_prompt, continue_final_message, template, kwargs
        )
        enc = self._pieces.encode(text)
        book = self._books.setdefault(name, HeaderBook())

        key: list[bytes] = []

        def cache_key() -> bytes:
            if not key:
                key.append(xxhash.xxh3_128_digest(repr((name, variables)).encode()))
            return key[0]

        lay = chat_layout(render, msgs, text, agp, book, self._memo, cache_key)
        ids, full_text = enc.ids, text
        if prefix:  # tokenized apart, as SGLang appends it
            ids = np.concatenate([ids, self._pieces.encode(prefix).ids])
            full_text = text + prefix
        to_tok = enc.char_to_token
        starts = enc.chars_to_tokens(lay.message_starts)
        if prefix:
            starts.append(len(enc.ids))
        anchors = set(starts)
        if lay.generation_start is not None:
            anchors.add(to_tok(lay.generation_start))
        chars, toks = enc.section_tokens()
        if lay.exact:
            anchors.update(toks.tolist())
        elif len(chars) and any(c is not None for c in lay.contents):
            spans = np.array([c for c in lay.contents if c is not None], np.int64).reshape(-1, 2)
            k = np.searchsorted(spans[:, 0], chars, side="right") - 1
            ok = (k >= 0) & (chars < spans[np.maximum(k, 0), 1])
            anchors.update(toks[ok].tolist())
        n = len(ids)
        if not lay.exact:
            anchors.update(_template_blocks(lay.contents, enc, sorted(anchors | {n})))
        return Prompt(ids, tuple(sorted(a for a in anchors if 0 < a < n)), tuple(starts), full_text)


# Template glue at least this long after a content (tool schemas after the system prompt)
# is a block of its own: otherwise the content's last chunk runs into it, and both miss
# whenever the content's end or the block's neighbour changes. Shorter glue (end-of-turn
# tokens) stays with its content, so runs of reused messages are not broken at every turn.
TEMPLATE_BLOCK_TOKENS = 32


def _template_blocks(contents, enc: Encoded, anchors: list[int]) -> list[int]:
    """Token offsets where a content ends and TEMPLATE_BLOCK_TOKENS or more of template
    glue follow before the next anchor (``anchors`` sorted, ending with the prompt's length)."""
    out = []
    for t in enc.chars_to_tokens([span[1] for span in contents if span is not None]):
        k = bisect_right(anchors, t)
        if k < len(anchors) and anchors[k] - t >= TEMPLATE_BLOCK_TOKENS:
            out.append(t)
    return out


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text


__all__ = ["SECTION_RE", "Encoded", "ModelTokenizer", "Prompt", "TokenizerConfig"]
