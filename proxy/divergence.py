"""Why did the exact-prefix cache miss? Compare a request with its session's previous one.

An exact-prefix cache serves a prompt up to its first token that differs from a cached one.
For each session the tracker keeps the recent prompts and reports where and why this one
departs from the closest of them (with ``per_session=1``: the previous request): the token
offset, the message it falls in, and a kind:

- ``first_request``: nothing to compare with.
- ``identical``: same tokens, or this prompt is a prefix of the previous one (a retry).
- ``new_content_only``: the previous prompt is a prefix of this one, up to its generation
  prompt (``Assistant:`` in the previous request is followed here by the assistant's actual
  message, whose first tokens may merge differently), i.e. the conversation just went on.
- ``system_changed``: the system prompt changed (a timestamp header, reordered sections).
- ``tools_changed``: the tool definitions changed.
- ``history_rewritten``: an earlier message changed or disappeared (compaction).
- ``messages_reordered``: the same messages, in another order.
- ``rendering_changed``: every message is the same, yet the rendered tokens differ earlier
  than the generation prompt (a chat template that renders past turns differently, e.g. one
  that drops earlier reasoning).
- ``prompt_changed``: a raw prompt (no message structure) that changed.

System, then tools, then messages are checked in that order, the order templates render them.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import xxhash

from irminsul.proxy.identity import session_key, tenant_hash  # noqa: F401  (re-exported)

SYSTEM_ROLES = frozenset({"system", "developer"})
HEADER_TOKENS = 64  # a change this close to the system prompt's start is reported as its header


def content_hash(obj: Any) -> str:
    """xxh3_64 of canonical JSON, with Anthropic ``cache_control`` markers left out (agents move
    them every turn without changing what the model sees)."""
    text = json.dumps(_strip_cache_control(obj), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=str)
    return xxhash.xxh3_64_hexdigest(text.encode())


def _strip_cache_control(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_cache_control(v) for k, v in obj.items() if k != "cache_control"}
    if isinstance(obj, (list, tuple)):
        return [_strip_cache_control(v) for v in obj]
    return obj


class PromptView(NamedTuple):
    """What the tracker remembers of a prompt. Build it with :meth:`build`."""

    ids: np.ndarray  # int32 token IDs (kept by reference: do not mutate)
    message_starts: tuple[int, ...]  # token offset of message i (empty for a raw prompt)
    message_hashes: tuple[str, ...]  # content hash of message i, system messages included
    roles: tuple[str, ...]
    system_hash: str | None  # all system/developer messages together; None if there are none
    tools_hash: str | None  # None if the request has no tools
    tool_hashes: tuple[str, ...] = ()
    section_hashes: tuple[str, ...] = ()  # system prompt sections, when the proxy knows them
    gen_prompt_tokens: int | None = None  # generation prompt length at the end; None: unknown

    @classmethod
    def build(cls, ids, message_starts: Sequence[int] = (), messages: Sequence[dict] = (), *,
              tools: Sequence[Any] | None = None, system: Any = None,
              system_sections: Sequence[str] = (),
              gen_prompt_tokens: int | None = None) -> PromptView:
        """From a rendered prompt and the messages it was rendered from.

        ``system`` is a system prompt given apart from the messages (Anthropic's top level).
        ``message_starts`` must have one offset per message, or be empty.
        """
        ids = np.asarray(ids, dtype=np.int32)
        starts = tuple(int(s) for s in message_starts)
        if starts and len(starts) != len(messages):
            raise ValueError(f"{len(starts)} message starts for {len(messages)} messages")
        if any(b < a for a, b in itertools.pairwise(starts)) or any(s > len(ids) for s in starts):
            raise ValueError("message_starts must be ascending offsets within the prompt")
        roles = tuple(str(m.get("role", "")) for m in messages)
        system_parts = [m for m in messages if m.get("role") in SYSTEM_ROLES]
        if system is not None:
            system_parts.insert(0, {"role": "system", "content": system})
        tool_hashes = tuple(content_hash(t) for t in tools or ())
        return cls(
            ids=ids,
            message_starts=starts,
            message_hashes=tuple(content_hash(m) for m in messages),
            roles=roles,
            system_hash=content_hash(system_parts) if system_parts else None,
            tools_hash=content_hash(list(tool_hashes)) if tools else None,
            tool_hashes=tool_hashes,
            section_hashes=tuple(content_hash(s) for s in system_sections),
            gen_prompt_tokens=gen_prompt_tokens,
        )

    def message_at(self, offset: int) -> int | None:
        """Index of the message holding token ``offset`` (None before the first message)."""
        if not self.message_starts or offset < self.message_starts[0]:
            return None
        return int(np.searchsorted(self.message_starts, offset, side="right")) - 1

    def conversation(self) -> tuple[str, ...]:
        """Hashes of the non-system messages, in order."""
        return tuple(h for h, r in zip(self.message_hashes, self.roles) if r not in SYSTEM_ROLES)


class Divergence(NamedTuple):
    offset: int | None  # first token that differs from the previous prompt; None: no previous
    message_index: int | None  # message (of this prompt) holding that token
    kind: str
    detail: str


def first_difference(a: np.ndarray, b: np.ndarray) -> int:
    """Offset of the first differing token; min(len) if one is a prefix of the other."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def compare(prev: PromptView | None, cur: PromptView) -> Divergence:
    """Classify how ``cur`` departs from ``prev`` (module docstring). Pure."""
    if prev is None:
        return Divergence(None, None, "first_request", "no earlier request in this session")
    off = first_difference(prev.ids, cur.ids)
    n_prev, n_cur = len(prev.ids), len(cur.ids)
    where = cur.message_at(off)
    if off == n_prev == n_cur:
        return Divergence(None, None, "identical", f"same {n_cur} tokens as the previous request")
    if off == n_cur:
        return Divergence(None, None, "identical",
                          f"a prefix ({n_cur} tokens) of the previous request ({n_prev} tokens)")
    if off == n_prev:
        return Divergence(off, where, "new_content_only",
                          f"extends the previous {n_prev} tokens by {n_cur - n_prev}")
    if _in_generation_tail(prev, cur, off):
        return Divergence(off, where, "new_content_only",
                          f"extends the previous request; diverged at token {off} of {n_prev},"
                          " inside its generation prompt")
    if prev.system_hash != cur.system_hash:
        return Divergence(off, where, "system_changed", _system_detail(prev, cur, off))
    if prev.tools_hash != cur.tools_hash:
        return Divergence(off, where, "tools_changed", _tools_detail(prev, cur, off))
    if not prev.message_hashes or not cur.message_hashes:
        return Divergence(off, where, "prompt_changed", f"prompt changed at token {off}")
    old, new = prev.conversation(), cur.conversation()
    if new[: len(old)] == old:
        return Divergence(off, where, "rendering_changed",
                          f"messages unchanged but the rendered prompt differs at token {off}"
                          f"{_msg(cur, where)}")
    if not Counter(old) - Counter(new):
        moved = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
        return Divergence(off, where, "messages_reordered",
                          f"same messages in another order: conversation message {moved} moved;"
                          f" first differing token {off}{_msg(cur, where)}")
    first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    gone = sum((Counter(old) - Counter(new)).values())
    return Divergence(off, where, "history_rewritten",
                      f"conversation message {first} changed at token {off}{_msg(cur, where)};"
                      f" {gone} of {len(old)} earlier messages no longer present")


def _in_generation_tail(prev: PromptView, cur: PromptView, off: int) -> bool:
    if prev.gen_prompt_tokens is not None:
        return prev.gen_prompt_tokens > 0 and off >= len(prev.ids) - prev.gen_prompt_tokens
    # Tail length unknown: the previous messages must all be there, unchanged and followed by
    # more, and the divergence must come after the start of the previous last message.
    n = len(prev.message_hashes)
    return (
        n > 0
        and len(cur.message_hashes) > n
        and len(prev.message_starts) == n
        and cur.message_hashes[:n] == prev.message_hashes
        and (prev.system_hash, prev.tools_hash) == (cur.system_hash, cur.tools_hash)
        and off > prev.message_starts[-1]
    )


def _msg(view: PromptView, index: int | None) -> str:
    return "" if index is None else f" (message {index}, {view.roles[index] or 'no role'})"


def _system_detail(prev: PromptView, cur: PromptView, off: int) -> str:
    a, b = prev.section_hashes, cur.section_hashes
    if a and b and a != b and Counter(a) == Counter(b):
        return f"system prompt sections reordered; first differing token {off}"
    idx = [i for i, r in enumerate(cur.roles) if r in SYSTEM_ROLES]
    if not idx or not cur.message_starts:
        return f"system prompt changed at token {off}"
    start = cur.message_starts[idx[0]]
    nxt = idx[-1] + 1
    end = cur.message_starts[nxt] if nxt < len(cur.message_starts) else len(cur.ids)
    if not start <= off < end:
        return f"system prompt changed; first differing token {off}{_msg(cur, cur.message_at(off))}"
    into = off - start
    if into < HEADER_TOKENS:
        part = "header"
    elif into >= 0.9 * (end - start):
        part = "tail"
    else:
        part = f"body, {100 * into // (end - start)}% in"
    return f"system prompt changed at token {off} ({part})"


def _tools_detail(prev: PromptView, cur: PromptView, off: int) -> str:
    a, b = Counter(prev.tool_hashes), Counter(cur.tool_hashes)
    added, removed = sum((b - a).values()), sum((a - b).values())
    if not added and not removed:
        return f"tool definitions reordered; first differing token {off}"
    return f"tool definitions changed (+{added} -{removed}); first differing token {off}"


@dataclass(frozen=True)
class TrackerConfig:
    max_sessions: int = 10_000
    # Prompts are kept as int32 arrays: 50M tokens is 200 MB. The least recently seen sessions
    # are forgotten first when either bound is passed.
    max_tokens: int = 50_000_000
    # Recent prompts kept per session. One session often interleaves conversations (Claude Code
    # runs sub-agents and side requests under its session id); a prefix cache holds them all,
    # so a request is compared with the one of these it shares the longest prefix with.
    # 1 compares with the previous request only.
    per_session: int = 4

    def __post_init__(self):
        if self.max_sessions < 1 or self.max_tokens < 1 or self.per_session < 1:
            raise ValueError("max_sessions, max_tokens and per_session must be >= 1")


class SessionTracker:
    """Recent prompts of recent sessions (bounded LRU, in memory, thread-safe)."""

    def __init__(self, config: TrackerConfig = TrackerConfig()):
        self.config = config
        self._views: OrderedDict[str, tuple[PromptView, ...]] = OrderedDict()  # newest last
        self._tokens = 0
        self._lock = threading.Lock()

    def observe(self, session: str, view: PromptView) -> Divergence:
        """Compare ``view`` with the session's closest recent prompt (the longest common prefix;
        the most recent on a tie), then remember ``view`` among the session's recent prompts.

        Key sessions by model too when one session mixes models: token IDs of different
        tokenizers do not compare.
        """
        with self._lock:
            recent = self._views.get(session, ())
        best = None
        if recent:
            scores = [first_difference(v.ids, view.ids) for v in recent]
            best = recent[max(range(len(recent)), key=lambda i: (scores[i], i))]
        with self._lock:
            old = self._views.pop(session, ())
            kept = (*old, view)[-self.config.per_session:]
            self._tokens += sum(len(v.ids) for v in kept) - sum(len(v.ids) for v in old)
            self._views[session] = kept
            while len(self._views) > 1 and (
                len(self._views) > self.config.max_sessions or self._tokens > self.config.max_tokens
            ):
                _, evicted = self._views.popitem(last=False)
                self._tokens -= sum(len(v.ids) for v in evicted)
        return compare(best, view)

    def forget(self, session: str) -> None:
        """Drop what is kept for ``session``."""
        with self._lock:
            old = self._views.pop(session, ())
            self._tokens -= sum(len(v.ids) for v in old)

    def __len__(self) -> int:
        return len(self._views)

    @property
    def tokens(self) -> int:
        """Tokens held for all sessions."""
        return self._tokens
