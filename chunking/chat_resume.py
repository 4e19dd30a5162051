"""Renders of a cut chat template (chunking/chat_split.py) resumed from checkpoints, so that a
conversation's next turn renders only what its new messages add; the text is the one a whole
render gives.

Every render through the cut leaves two checkpoints, before its last message and after it
(agents append to the conversation, or resend it with the last message replaced): the loop
text up to there and the state of every namespace `pre` assigned. A later render of messages
that start with the same n messages, under the same variables, resumes after them when `pre`,
run again on the whole new list, assigned exactly what it assigned then (a template whose `pre`
reads the whole list, DeepSeek-R1's system prompt gathering or a last-user-index scan, shows
it here). Iteration i of the loop then starts from an equal state, reads equal inputs (the
variables, messages[i] and the messages[k] it may read, `pre`'s assignments), and so writes
what it wrote then. Each iteration's inputs are the only ones chat_split.py leaves it.

Equal means: the same JSON form, key order included (orjson: a str, int, float, bool and None
stay apart; subclasses and other types are refused and render whole), and, for the variables
and any message that holds more than strings, == on the objects too (a tuple is not a list).
`pre`'s assignments compare type by type. Messages mutated in place after a render they took
part in must not be rendered again through the same template object.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, NamedTuple

import jinja2
import orjson
import xxhash
from jinja2.utils import Namespace

from .chat_split import OFFSET, SEGMENT, TemplateCut
from .template_state import NotFrozen, freeze, namespace_attrs, same, snapshot

log = logging.getLogger(__name__)

_OPT = orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
_OPT |= orjson.OPT_PASSTHROUGH_DATETIME
_STR = frozenset({str})
MIN_MESSAGES = 4  # below this a whole render costs less than the cut's bookkeeping
WINDOW = 16  # a render resumes from a checkpoint at most this many messages before its end
MAX_CHANGED = 64  # then the cut is turned off
MAX_PARTS = 64  # an entry's loop text is kept in at most this many pieces


class _Mark(NamedTuple):
    parts: int  # how many loop parts come before this message
    spaces: tuple[tuple[str, dict], ...]  # each namespace's attributes there


class _Entry(NamedTuple):
    variables: dict
    messages: list
    mixed: tuple[int, ...]  # messages that hold more than strings (see _prefix_keys)
    state: tuple  # what pre assigned, frozen
    parts: tuple[str, ...]  # the loop's text, shared with the entries it resumed from
    marks: dict[int, _Mark]  # message index -> checkpoint
    size: int  # chars this entry added (loop text and message contents)


class ResumableTemplate:
    """One named chat template with its checkpoints. Thread-safe.

    ``verify_fresh``/``verify_resumed``: how many renders through the cut (from the start, and
    resumed) are also rendered whole and compared; a difference turns the cut off for good.
    """

    def __init__(self, template: jinja2.Template, cut: TemplateCut | None, *,
                 max_chars: int = 32 << 20, max_keys: int = 4096, verify_fresh: int = 4,
                 verify_resumed: int = 8):
        self.template = template
        self.cut = cut
        self.max_chars, self.max_keys = max_chars, max_keys
        self._verify = {"fresh": verify_fresh, "resumed": verify_resumed}
        self._memo: OrderedDict[bytes, tuple[_Entry, int]] = OrderedDict()
        self._chars = 0
        self._changed = 0  # renders in a row that found a checkpoint but could not resume
        self._lock = threading.Lock()
        self._globals = dict(template.globals)
        self.stats = dict.fromkeys(
            ("whole", "fresh", "resumed", "pre_changed", "unfrozen", "mismatch"), 0
        )

    def render(self, messages: list, variables: dict[str, Any]) -> str:
        """What ``template.render(messages=messages, **variables)`` returns (or raises)."""
        cut = self.cut
        if cut is None or len(messages) < MIN_MESSAGES or "messages" in variables:
            return self._whole(messages, variables)
        try:
            lo = max(cut.min_prefix, len(messages) - WINDOW)
            keys, mixed = _prefix_keys(messages, variables, lo)
        except (TypeError, orjson.JSONEncodeError):
            return self._whole(messages, variables)
        hit = self._find(keys, mixed, messages, variables)
        try:
            text, entry, kind = self._render_cut(cut, messages, variables, hit, mixed)
        except Exception:  # noqa: BLE001 - the whole render raises as it would, or renders
            return self._whole(messages, variables)
        if self._verify[kind] != 0:
            self._verify[kind] -= 1
            whole = None
            try:
                whole = self._whole(messages, variables)
            finally:  # also when only the whole render fails: it is the reference
                if whole != text:
                    self.cut = None
                    self.stats["mismatch"] += 1
                    log.warning("chat template: a render through its cut differed from a "
                                "whole one; rendering whole from now on")
            if whole != text:
                return whole
        self.stats[kind] += 1
        self._changed = 0 if kind == "resumed" else self._changed + (hit is not None)
        if self._changed > MAX_CHANGED:
            self.cut = None  # its pre reads the whole list: the checkpoints only cost
            log.info("chat template: pre differs turn after turn; rendering whole")
        if entry is not None:
            self._remember(keys, entry)
        return text

    def clear(self) -> None:
        """Forget every checkpoint."""
        with self._lock:
            self._memo.clear()
            self._chars = 0

    def _whole(self, messages, variables) -> str:
        self.stats["whole"] += 1
        return self.template.render(messages=messages, **variables)

    def _find(self, keys, mixed, messages, variables):
        with self._lock:
            for p in sorted(keys, reverse=True):
                got = self._memo.get(keys[p])
                if got is not None:
                    self._memo.move_to_end(keys[p])
                    break
            else:
                return None
        entry, p = got
        if entry.variables != variables:
            return None  # same JSON form, different objects (a tuple for a list)
        for i in {*entry.mixed, *mixed}:
            if i < p and entry.messages[i] != messages[i]:
                return None
        return entry, p

    def _render_cut(self, cut: TemplateCut, messages, variables, hit, mixed):
        # shared contexts over one dict: what Template.render builds (globals, then variables)
        # without a copy per part
        scope = {**self._globals, **variables, "messages": messages}
        ctx = cut.pre.new_context(scope, shared=True)
        pre_text = "".join(cut.pre.root_render_func(ctx))
        assigned = ctx.vars
        try:
            state = freeze(assigned)
        except NotFrozen:
            state = None
        spaces = [(k, v) for k, v in assigned.items() if type(v) is Namespace]
        start, parts, marks = 0, [], {}
        if hit is not None and state is not None:
            entry, p = hit
            if same(state, entry.state):
                mark = entry.marks[p]
                for name, attrs in mark.spaces:
                    own = namespace_attrs(assigned[name])
                    if not own.keys() <= attrs.keys():
                        raise NotFrozen(name)
                    own.update(attrs)
                start, marks[p] = p, mark
                parts = list(entry.parts[: mark.parts])
            else:
                self.stats["pre_changed"] += 1
        n, size = len(messages), 0
        scope.update(assigned)
        for a, b in ((start, n - 1), (max(start, n - 1), n)):
            if a >= b:
                continue
            scope[SEGMENT], scope[OFFSET] = messages[a:b], a
            text = "".join(cut.loop.root_render_func(cut.loop.new_context(scope, shared=True)))
            parts.append(text)
            size += len(text)
            if state is not None:
                try:
                    marks[b] = _Mark(len(parts), snapshot(spaces))
                except NotFrozen:
                    state = None
        post = cut.post.new_context(scope, shared=True)
        text = "".join([pre_text, *parts, *cut.post.root_render_func(post)])
        kind = "resumed" if start else "fresh"
        if state is None:
            self.stats["unfrozen"] += 1
            return text, None, kind
        if len(parts) > MAX_PARTS:  # one string for what no checkpoint splits
            k = min(m.parts for m in marks.values())
            parts[:k] = ["".join(parts[:k])]
            size += len(parts[0])
            marks = {i: m._replace(parts=m.parts - k + 1) for i, m in marks.items()}
        if start:  # the head's objects are the resumed entry's: one copy per conversation
            variables, messages = entry.variables, entry.messages[:start] + messages[start:]
        else:
            variables, messages = dict(variables), list(messages)
        size += sum(map(_weight, messages[start:]))
        entry = _Entry(variables, messages, mixed, state, tuple(parts), marks, size)
        return text, entry, kind

    def _remember(self, keys, entry: _Entry) -> None:
        with self._lock:
            for i in entry.marks:
                if i not in keys:
                    continue
                old = self._memo.pop(keys[i], None)
                if old is not None:
                    self._chars -= old[0].size
                self._memo[keys[i]] = (entry, i)
                self._chars += entry.size
            while self._memo and (self._chars > self.max_chars or len(self._memo) > self.max_keys):
                _, (gone, _) = self._memo.popitem(last=False)
                self._chars -= gone.size


def _weight(message) -> int:
    """About what a message holds in memory, in chars (its content, mostly)."""
    c = message.get("content") if type(message) is dict else None
    return len(c) if type(c) is str else 256


def _prefix_keys(messages, variables, lo: int) -> tuple[dict[int, bytes], tuple[int, ...]]:
    """{i: digest of the variables and messages[:i] in their JSON form} for i >= lo, and
    the messages that are not a dict of str values: two messages of str values with the
    same JSON form are the same, others are compared with == as well (a tuple for a list,
    NaN for None, an Enum or a UUID for its value have the same JSON form)."""
    h = xxhash.xxh3_128(orjson.dumps(variables, option=_OPT))
    keys = {0: h.digest()} if lo <= 0 else {}
    dumps, strs, mixed = orjson.dumps, _STR.issuperset, []
    for i, m in enumerate(messages, 1):
        h.update(dumps(m, option=_OPT))  # a JSON value ends where it ends: no separator needed
        if type(m) is not dict or not strs(map(type, m.values())):
            mixed.append(i - 1)
        if i >= lo:
            keys[i] = h.digest()
    return keys, tuple(mixed)
