"""What a cut chat template's `pre` assigned and its namespaces' state, frozen to be kept in a
checkpoint and compared with a later render's (chunking/chat_resume.py).

Templates change state only through namespaces: the immutable sandbox forbids the methods
that mutate lists and dicts, so a value that holds no namespace can be kept as it is. A
value that cannot be kept or compared (a namespace inside a list, an undefined, a foreign
object) raises NotFrozen and the render keeps no checkpoint.
"""

from __future__ import annotations

import math

import orjson
from jinja2.runtime import Macro
from jinja2.utils import Namespace
from markupsafe import Markup


class NotFrozen(Exception):
    """A value a checkpoint cannot hold or compare (render whole, keep nothing)."""


def namespace_attrs(ns: Namespace) -> dict:
    """The namespace's own attribute dict (Jinja keeps it under a mangled name)."""
    try:
        return object.__getattribute__(ns, "_Namespace__attrs")
    except AttributeError as e:  # another Jinja's Namespace: no checkpoints
        raise NotFrozen("namespace") from e


def _plain(value) -> None:
    """Raise unless ``value`` is immutable to templates and holds no namespace, macro or
    undefined (the sandbox forbids mutating lists and dicts; only namespaces change)."""
    try:
        orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as e:
        raise NotFrozen(type(value).__name__) from e


def snapshot(spaces) -> tuple[tuple[str, dict], ...]:
    out = []
    for name, ns in spaces:
        attrs = dict(namespace_attrs(ns))
        _plain(attrs)
        out.append((name, attrs))
    return tuple(out)


def freeze(assigned: dict) -> tuple:
    """What pre assigned, in a form :func:`same` compares. Raises NotFrozen."""
    seen: set[int] = set()
    out = []
    for name, v in assigned.items():
        if type(v) is Namespace:
            if id(v) in seen:
                raise NotFrozen("one namespace under two names")
            seen.add(id(v))
            attrs = dict(namespace_attrs(v))
            _plain(attrs)
            out.append((name, "namespace", attrs))
        elif type(v) is Macro:
            # its code is the pre template's; what it reads outside its arguments is this
            # state or the variables, both compared
            out.append((name, "macro", v._func.__code__))
        else:
            _plain(v)
            out.append((name, "value", v))
    return tuple(out)


def same(a, b) -> bool:
    """Equal with equal types all the way down (1, 1.0 and True differ; so does key order)."""
    if a is b:
        return True
    t = type(a)
    if t is not type(b):
        return False
    if t is dict:
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items())
        )
    if t is list or t is tuple:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if t is float:
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if t in (str, int, bool, type(None), Markup):
        return a == b
    return False  # code objects are compared by identity above
