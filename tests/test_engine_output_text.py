"""Stop strings and tool-call markers over streamed text (engine_adapter/embedded/output_text.py).

The tiny random model rarely writes a tool call, so the parser is tested here directly, on text
split at every possible point, as a stream delivers it.
"""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from irminsul.engine_adapter.embedded.output_text import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    StopStrings,
    ToolCallStream,
    parse_tool_calls,
)


def feed_all(stops, pieces):
    matcher = StopStrings(stops)
    shown, matched = [], None
    for piece in pieces:
        out, matched = matcher.feed(piece)
        shown.append(out)
        if matched is not None:
            break
    if matched is None:
        shown.append(matcher.flush())
    return "".join(shown), matched


def test_stop_string_split_across_pieces_is_trimmed():
    assert feed_all(["END"], ["hello E", "N", "D and more"]) == ("hello ", "END")


def test_text_that_only_looks_like_a_stop_start_is_released():
    matcher = StopStrings(["END"])
    assert matcher.feed("abc EN") == ("abc ", None)  # "EN" could start "END": held
    assert matcher.feed("x") == ("ENx", None)  # it did not
    assert matcher.flush() == ""


def test_earliest_of_several_stops_wins():
    assert feed_all(["zz", "b"], ["a", "bzz"]) == ("a", "b")


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="empty"):
        StopStrings([""])


@given(st.text(alphabet="abE ND", max_size=40), st.lists(st.integers(0, 40), max_size=6))
def test_stop_strings_match_a_plain_search_for_any_split(text, cuts):
    cuts = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    i = text.find("END")
    expected = (text, None) if i < 0 else (text[:i], "END")
    assert feed_all(["END"], pieces) == expected


CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def test_parse_tool_call_between_markers():
    text = f"Let me look.{TOOL_CALL_OPEN}{json.dumps(CALL)}{TOOL_CALL_CLOSE}"
    parsed = parse_tool_calls(text)
    assert parsed.content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert parsed.tool_calls[0].id.startswith("call_")


def test_two_calls_and_string_arguments():
    second = {"name": "add", "arguments": json.dumps({"a": 1})}
    text = (f"{TOOL_CALL_OPEN}{json.dumps(CALL)}{TOOL_CALL_CLOSE}\n"
            f"{TOOL_CALL_OPEN} {json.dumps(second)} {TOOL_CALL_CLOSE}")
    parsed = parse_tool_calls(text)
    assert [c.name for c in parsed.tool_calls] == ["get_weather", "add"]
    assert json.loads(parsed.tool_calls[1].arguments) == {"a": 1}
    assert parsed.content.strip() == ""
    assert len({c.id for c in parsed.tool_calls}) == 2


@pytest.mark.parametrize("body", ["not json", "[1, 2]", '{"arguments": {}}',
                                  '{"name": "f", "arguments": [1]}'])
def test_unparseable_call_stays_as_text(body):
    text = f"a{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}b"
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == ()
    assert parsed.content == text


def test_unclosed_marker_stays_as_text():
    text = f"cut short {TOOL_CALL_OPEN}{{\"name\": \"f\""
    assert parse_tool_calls(text) == (text, ())


def stream_all(text, cuts):
    stream = ToolCallStream()
    cuts = sorted({min(c, len(text)) for c in cuts})
    shown = "".join(stream.feed(text[a:b]) for a, b in zip([0, *cuts], [*cuts, len(text)]))
    rest = stream.finish()
    return shown, rest


@given(st.lists(st.integers(0, 120), max_size=8))
def test_stream_shows_content_before_the_call_and_parses_it_at_the_end(cuts):
    text = f"Checking <weather>.{TOOL_CALL_OPEN}{json.dumps(CALL)}{TOOL_CALL_CLOSE}"
    shown, rest = stream_all(text, cuts)
    assert shown == "Checking <weather>."  # never any part of the marker
    assert rest.content == ""
    assert [c.name for c in rest.tool_calls] == ["get_weather"]


@given(st.lists(st.integers(0, 60), max_size=8))
def test_stream_without_calls_shows_everything(cuts):
    text = "no calls here, only <|tool a lookalike <| and more"
    shown, rest = stream_all(text, cuts)
    assert shown + rest.content == text
    assert rest.tool_calls == ()


def test_stream_with_a_broken_call_returns_its_text_at_the_end():
    text = f"x{TOOL_CALL_OPEN}oops{TOOL_CALL_CLOSE}y"
    shown, rest = stream_all(text, [3, 9])
    assert shown == "x"
    assert shown + rest.content == text
    assert rest.tool_calls == ()
