"""proxy/json_codec.py must give exactly what the json module gives (values and their types,
errors and their messages), with orjson and without it."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from irminsul.proxy import json_codec
from irminsul.proxy.json_codec import dumps_compact, loads


@pytest.fixture(params=["orjson", "json only"])
def codec(request, monkeypatch):
    if request.param == "orjson":
        if json_codec.orjson is None:
            pytest.skip("orjson is not installed")
    else:
        monkeypatch.setattr(json_codec, "orjson", None)
    return request.param


def same(a, b) -> bool:
    """Equal values of equal types all the way down (1 != 1.0 here; NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


EDGES = [
    b'{"seed": 18446744073709551616}',  # past u64: orjson alone would give a float
    b'[1, {"n": -9223372036854775809}]',  # below i64
    b"18446744073709551616",  # the whole document
    b'{"max": 18446744073709551615, "min": -9223372036854775808, "t": 0.7}',  # in range
    b'{"big": 1e19, "x": 12345678901234567890123.0}',  # large floats: still equal
    b"NaN", b'{"t": Infinity}', b'{"t": -Infinity}', b"[1e400]",
    b'"\\ud800"', b'{"a": "\\udfff x"}', b'"\\ud83d\\ude00"',
    b'\xef\xbb\xbf{"bom": 1}', '{"utf16": 1}'.encode("utf-16"),
    b'{"a": 1, "b": 2, "a": 3}', b'{"z": "\\u0000\\n\\u2028", "e": "\xc3\xa9"}',
    b" [] ", b"-0", b"-0.0", b"[1e-400]",
]


@pytest.mark.parametrize("raw", EDGES)
def test_loads_equals_json_on_edge_inputs(codec, raw):
    assert same(loads(raw), json.loads(raw))


@pytest.mark.parametrize("raw", [b'{"a": ', b"{}x", b'"\x01"', b'{"a": "\xff"}', b"", b"[1,]",
                                 b"{'a': 1}"])
def test_loads_fails_as_json_does(codec, raw):
    with pytest.raises(ValueError) as ours:
        loads(raw)
    with pytest.raises(ValueError) as theirs:
        json.loads(raw)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


def test_deep_nesting_fails_as_json_does(codec):
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecursionError):
        json.loads(raw)
    with pytest.raises(RecursionError):
        loads(raw)
    ok = b"[" * 200 + b"]" * 200  # within both parsers' depth limits
    assert same(loads(ok), json.loads(ok))


JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text()
    | st.integers(min_value=-(2**80), max_value=2**80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=25,
)


@given(JSON)
def test_loads_equals_json_on_random_documents(value):
    for raw in (json.dumps(value).encode(), json.dumps(value, ensure_ascii=False).encode(
            "utf-8", "surrogatepass")):
        try:
            expected = json.loads(raw)
        except ValueError as e:  # lone surrogates written raw: not UTF-8
            with pytest.raises(type(e)):
                loads(raw)
            continue
        assert same(loads(raw), expected)


FLOAT_FREE = st.recursive(
    st.none() | st.booleans() | st.text() | st.integers(min_value=-(2**80), max_value=2**80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=25,
)


def reference_dumps(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@given(FLOAT_FREE)
def test_dumps_compact_equals_json_bytes(value):
    try:
        expected = reference_dumps(value)
    except UnicodeEncodeError:  # a lone surrogate: json's output cannot be UTF-8 either
        with pytest.raises(UnicodeEncodeError):
            dumps_compact(value)
        return
    assert dumps_compact(value) == expected


def test_dumps_compact_without_orjson(monkeypatch):
    monkeypatch.setattr(json_codec, "orjson", None)
    value = {"chunks": [["ab", 0, 7]], "session": "é\u2028\"", "n": 2**70, "p": None}
    assert dumps_compact(value) == reference_dumps(value)


TUPLES_TOO = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text()
    | st.integers(min_value=-(2**80), max_value=2**80),
    lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=25,
)


@given(TUPLES_TOO)
def test_dumps_reads_back_as_json_dumps(value):
    try:
        expected = json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate
        with pytest.raises(UnicodeEncodeError):
            json_codec.dumps(value)
        return
    assert same(json.loads(json_codec.dumps(value)), json.loads(expected))


def test_dumps_keeps_what_orjson_would_change(codec):
    from collections import OrderedDict

    for value in ({"t": math.nan}, [1, {"x": [math.inf]}], -math.inf, {"n": 2**70},
                  OrderedDict(a=math.nan), {"e": 1e-7, "z": -0.0}):
        assert same(json.loads(json_codec.dumps(value)),
                    json.loads(json.dumps(value, ensure_ascii=False)))


LONG_LISTS = st.lists(
    st.none() | st.booleans() | st.floats() | st.text(max_size=3)
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.dictionaries(st.text(max_size=2), st.floats() | st.integers(), max_size=2),
    min_size=17, max_size=60,
)  # past json_codec's short-container loop: typed in one pass


@given(LONG_LISTS)
def test_long_containers_round_trip_as_json(value):
    raw = json.dumps({"input_ids": value}).encode()
    assert same(loads(raw), json.loads(raw))
    assert same(json.loads(json_codec.dumps(value)), json.loads(json.dumps(value)))


@pytest.mark.parametrize("tail", [2**64, -(2**63) - 1, math.nan, math.inf])
def test_one_bad_number_at_the_end_of_a_long_list(codec, tail):
    value = [*range(1000), tail]
    raw = json.dumps(value).encode()
    assert same(loads(raw), json.loads(raw))
    assert same(json.loads(json_codec.dumps(value)), json.loads(json.dumps(value)))
