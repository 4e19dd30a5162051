"""Chat-template rendering the way transformers (and so SGLang) does it, and message normalisation.

The environment copies what transformers sets up for `apply_chat_template`: an immutable
sandbox (templates come from model repos and are untrusted), trim_blocks and lstrip_blocks,
the loopcontrols extension, a `{% generation %}` tag that only renders its body,
`raise_exception`, `strftime_now`, and a `tojson` that does not HTML-escape.
Messages are normalised first as SGLang's OpenAI server does before it calls the template.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .chat_resume import ResumableTemplate
from .chat_split import cut_template


class ChatTemplateError(ValueError):
    """Messages or a template that cannot be rendered; the message says why."""


class _GenerationTag(jinja2.ext.Extension):
    # transformers marks assistant spans with {% generation %}; a template using it would not
    # even compile without the tag. Only the body is rendered.
    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if not ensure_ascii and indent is None and separators is None and not sort_keys:
        # a tool call's parsed arguments (shared, never mutated) are dumped once, not per turn
        e = _DUMPS.get(id(x))
        if e is not None and e[0] is x:  # the entry holds x: its id cannot have been reused
            if e[1] is None:
                e = _DUMPS[id(x)] = (x, json.dumps(x, ensure_ascii=False))
            return e[1]
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with its attribute verdicts memoised.

    Jinja's checks (underscore names, internal attributes of functions/frames/...,
    mutating methods of known mutable types) depend only on the object's type and the
    attribute name, and they cost more than the rest of a namespace lookup.
    """

    _verdicts: ClassVar[dict[tuple[type, str], bool]] = {}

    def is_safe_attribute(self, obj, attr, value):
        key = (type(obj), attr)
        ok = self._verdicts.get(key)
        if ok is None:
            ok = super().is_safe_attribute(obj, attr, value)
            if len(self._verdicts) < 4096:  # names come from templates: few, but bound it
                self._verdicts[key] = ok
        return ok


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


def _iterates_content(source: str) -> bool:
    """True if the template loops over message['content'] (wants OpenAI content parts)."""

    def is_content(node) -> bool:
        while isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)) or (
            isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice)
        ):
            node = node.node
        if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const):
            key = node.arg.value
        elif isinstance(node, jinja2.nodes.Getattr):
            key = node.attr
        else:
            return False
        inner = node.node
        return key == "content" and isinstance(inner, jinja2.nodes.Name) and inner.name == "message"

    try:
        ast = _ENV.parse(source)
    except jinja2.TemplateSyntaxError:
        return False
    return any(is_content(loop.iter) for loop in ast.find_all(jinja2.nodes.For))


class ChatTemplate:
    """A model's chat template(s): one string, or named templates ("default", "tool_use")."""

    def __init__(self, source: str | dict[str, str]):
        named = source if isinstance(source, dict) else {"default": source}
        if not named or not all(isinstance(v, str) and v for v in named.values()):
            raise ChatTemplateError("chat template must be a non-empty string")
        self.sources = dict(named)
        self._compiled: dict[str, jinja2.Template] = {}
        for name, src in named.items():
            try:
                self._compiled[name] = _ENV.from_string(src)
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(f"chat template {name!r} does not compile: {e}") from e
        self.content_parts = {n: _iterates_content(s) for n, s in named.items()}
        # resumed renders: a conversation's next turn renders only its new messages
        cuts = {n: cut_template(_ENV, s) for n, s in named.items()}
        self.cut_refusals = {n: c for n, c in cuts.items() if isinstance(c, str)}
        self._resumable = {
            n: ResumableTemplate(self._compiled[n], None if isinstance(c, str) else c)
            for n, c in cuts.items()
        }

    @classmethod
    def from_config(cls, value: Any) -> ChatTemplate | None:
        """From tokenizer_config.json's "chat_template": a string or [{"name", "template"}]."""
        if value is None:
            return None
        if isinstance(value, list):
            try:
                return cls({d["name"]: d["template"] for d in value})
            except (KeyError, TypeError) as e:
                raise ChatTemplateError(f"malformed named chat templates: {e}") from e
        return cls(value)

    def select(self, tools=None, name: str | None = None) -> str:
        """Which template applies, as transformers picks it."""
        if name is not None:
            if name not in self._compiled:
                raise ChatTemplateError(
                    f"no chat template named {name!r}; have {sorted(self._compiled)}"
                )
            return name
        if tools and "tool_use" in self._compiled:
            return "tool_use"
        if "default" in self._compiled:
            return "default"
        raise ChatTemplateError(f"no default chat template; pick one of {sorted(self._compiled)}")

    def clear_checkpoints(self) -> None:
        """Forget what earlier renders left for later ones to resume from."""
        for r in self._resumable.values():
            r.clear()

    def render(self, name: str, messages: list[dict], variables: dict[str, Any]) -> str:
        """Render already-normalised ``messages``; ``variables`` holds tools, flags, tokens."""
        try:
            return self._resumable[name].render(messages, variables)
        except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_REASONING_KEY_SET = frozenset(_REASONING_KEYS)


_PARSED: dict[str, Any] = {}  # arguments string -> parsed object; resent every turn
_DUMPS: dict[int, tuple[Any, str | None]] = {}  # id(parsed object) -> (it, its tojson)


def _parse_arguments(text: str) -> Any:
    v = _PARSED.get(text)
    if v is None:
        v = json.loads(text)
        if len(_PARSED) >= 4096:
            _PARSED.clear()
            _DUMPS.clear()
        _PARSED[text] = v  # shared between calls: nothing mutates it (immutable sandbox)
        _DUMPS[id(v)] = (v, None)
    return v


def _normalize_tool_calls(calls: Any, index: int, parse_arguments: bool) -> list[dict]:
    if not isinstance(calls, list):
        raise ChatTemplateError(f"messages[{index}].tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        if not isinstance(call, dict):
            raise ChatTemplateError(f"messages[{index}].tool_calls[{j}] must be an object")
        call = dict(call)  # copied where changed; the sandbox keeps templates from mutating
        fn = call.get("function")
        if isinstance(fn, dict):
            fn = call["function"] = dict(fn)
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str) and parse_arguments:
            # SGLang hands templates a dict (most templates `tojson` it); it rejects non-JSON.
            try:
                args = _parse_arguments(fn["arguments"])
            except json.JSONDecodeError as e:
                raise ChatTemplateError(
                    f"messages[{index}].tool_calls[{j}].function.arguments is not valid JSON: {e}"
                ) from e
            if not isinstance(args, dict):
                raise ChatTemplateError(
                    f"messages[{index}].tool_calls[{j}].function.arguments must be a JSON object"
                )
            fn["arguments"] = args
        out.append({k: v for k, v in call.items() if v is not None})
    return out


def _text_of_parts(parts: list, index: int) -> str:
    texts = []
    for j, p in enumerate(parts):
        if isinstance(p, str):
            texts.append(p)
        elif isinstance(p, dict):
            if p.get("type") == "text":
                if not isinstance(p.get("text"), str):
                    raise ChatTemplateError(f"messages[{index}].content[{j}].text must be a string")
                texts.append(p["text"])
        else:
            raise ChatTemplateError(f"messages[{index}].content[{j}] must be an object")
    return " ".join(texts)  # SGLang joins text parts with one space


def normalize_messages(
    messages: Any, *, content_parts: bool = False, parse_arguments: bool = True
) -> list[dict]:
    """OpenAI chat messages -> what the template sees. Does not modify ``messages``.

    None-valued keys are dropped (transformers does) except content, which becomes "" (SGLang
    does); list-of-parts content becomes its text parts joined by a space, unless the
    template iterates over content parts (``content_parts``); assistant tool call arguments
    given as a JSON string are parsed into a dict; reasoning fields are aliased under
    reasoning_content and thinking as transformers does.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"messages[{i}] must be an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{i}].role must be a non-empty string")
        msg = {k: v for k, v in m.items() if v is not None} if None in m.values() else dict(m)
        content = m.get("content")
        if content is None:
            msg["content"] = ""
        elif isinstance(content, list):
            if not content_parts:
                msg["content"] = _text_of_parts(content, i)
            else:
                msg["content"] = [
                    {"type": "text", "text": p} if isinstance(p, str) else dict(p) for p in content
                ]
        elif not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}].content must be a string, a list or null")
        if "tool_calls" in msg:
            msg["tool_calls"] = _normalize_tool_calls(msg["tool_calls"], i, parse_arguments)
        reasoning = None
        if not _REASONING_KEY_SET.isdisjoint(msg):  # rare: no generator per message otherwise
            reasoning = next((msg[k] for k in _REASONING_KEYS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out
