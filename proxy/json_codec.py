"""JSON on the request's critical path: orjson where it gives what the json module gives.

A 32K-token agent request is ~110 KB of JSON: json.loads takes ~0.17 ms of it, orjson ~0.05
ms; the chunk annotation (~10 KB) serialises ~10x faster too. What the proxy forwards and
answers must not depend on the codec, so each function here is defined by its json-module
equivalent and uses orjson only where the two provably agree:

- ``loads``: orjson refuses part of what json.loads accepts (NaN and Infinity, 1e400, lone
  surrogate escapes, nesting past 1024 levels, UTF-16 and BOM-prefixed bytes); json parses
  those again, so its result or its error (the 400's message) stands. On what orjson accepts
  both give equal objects except one case: an integer literal outside [-2**63, 2**64) becomes
  a float in orjson. Such a float has magnitude >= 2**63, so a parse holding no float that
  large is exact; one that does (a walk over the containers: ~40 us for a 32K-token chat
  body, a few hundred for a tool-heavy Anthropic one) is parsed again by json.
- ``dumps``: bytes that parse to the same value as json.dumps(obj, ensure_ascii=False) (the
  spacing and a float's spelling may differ: both write the shortest repr that round-trips).
  orjson writes NaN and Infinity as null, so an object holding a non-finite float (a walk,
  as above) goes through json, as does anything orjson refuses (integers past 64 bits,
  non-string keys, lone surrogates).
- ``dumps_compact``: exactly json.dumps(obj, ensure_ascii=False, separators=(",", ":")) as
  UTF-8, for objects the proxy builds itself without floats; the same fallbacks.
"""

from __future__ import annotations

import json
import math
from typing import Any

try:
    import orjson
except ImportError:  # a core dependency; a source tree run without it still works, on json
    orjson = None

_LOSSY = float(2**63)  # orjson turns integers it cannot hold into floats at least this large


def loads(data: bytes | str) -> Any:
    """json.loads(data), faster in the common case (see the module docstring)."""
    if orjson is not None:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
        else:
            if _floats_below(obj, _LOSSY):
                return obj
    return json.loads(data)


_CONTAINERS = frozenset({dict, list, tuple})
_SCALARS = frozenset({str, int, bool, type(None)})
_PLAIN = _CONTAINERS | _SCALARS | {float}
_LONG = 16  # containers longer than this are typed in one C-level pass (token ID lists)


def _floats_below(obj: Any, bound: float) -> bool:
    """True if ``obj`` is made of plain dicts, lists, tuples, strings, ints, bools, None and
    floats strictly within (-bound, bound) (NaN never is); False for anything else (a
    subclass included: it goes through json). Iterative: a deep object must not hit the
    recursion limit."""
    stack = [[obj]]  # obj itself may be the float
    pop, push = stack.pop, stack.append
    while stack:
        o = pop()
        vals = o.values() if type(o) is dict else o
        if len(vals) > _LONG:
            kinds = set(map(type, vals))
            if kinds <= _SCALARS:  # e.g. 100K token IDs: no per-item Python work
                continue
            if not kinds <= _PLAIN:
                return False
        for v in vals:
            t = type(v)
            if t in _CONTAINERS:
                push(v)
            elif t is float:
                if not -bound < v < bound:
                    return False
            elif t not in _SCALARS:
                return False
    return True


def dumps(obj: Any) -> bytes:
    """json.dumps(obj, ensure_ascii=False).encode() up to spacing and float spelling (see the
    module docstring)."""
    if orjson is not None and _floats_below(obj, math.inf):
        try:
            return orjson.dumps(obj)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(obj, ensure_ascii=False).encode()


def dumps_compact(obj: Any) -> bytes:
    """json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() for float-free
    ``obj`` (see the module docstring)."""
    if orjson is not None:
        try:
            return orjson.dumps(obj)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
