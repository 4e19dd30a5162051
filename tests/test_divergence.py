"""Miss causes: every divergence kind on hand-built prompts, the session LRU, session and tenant
keys."""

import numpy as np
import pytest
import xxhash
from multidict import CIMultiDict

from irminsul.proxy.divergence import (
    PromptView,
    SessionTracker,
    TrackerConfig,
    compare,
    first_difference,
    session_key,  # re-exported from identity: the interface names it here
    tenant_hash,
)
from irminsul.proxy.identity import DEFAULT_TENANT_SALT, tenant_from_headers

# A toy chat template: BOS, then per message a role token and its content tokens; generation
# prompt = the assistant role token (90). System content tokens: 1xx, tools: 5xx.
ROLE = {"system": 91, "user": 92, "assistant": 90, "tool": 93}
GEN = [90]


def render(messages, tools=(), add_gen=True, gen_merge=None):
    """Token IDs, message starts and gen-prompt length of ``messages`` (content = token lists)."""
    ids, starts = [0], []
    for t in tools:
        ids += t
    for m in messages:
        starts.append(len(ids))
        ids += [ROLE[m["role"]], *m["content"]]
    tail = list(gen_merge or GEN) if add_gen else []
    return ids + tail, starts, len(tail)


def view(messages, tools=(), **kw):
    ids, starts, gen = render(messages, tools, **kw)
    msgs = [{"role": m["role"], "content": " ".join(map(str, m["content"]))} for m in messages]
    return PromptView.build(np.array(ids), starts, msgs,
                            tools=[{"name": str(t)} for t in tools] or None,
                            gen_prompt_tokens=gen)


SYS = {"role": "system", "content": [101, 102, 103]}
U1 = {"role": "user", "content": [201, 202]}
A1 = {"role": "assistant", "content": [301, 302]}
U2 = {"role": "user", "content": [203, 204, 205]}
A2 = {"role": "assistant", "content": [303]}
U3 = {"role": "user", "content": [206]}


def test_first_difference():
    assert first_difference(np.array([1, 2, 3]), np.array([1, 2, 4])) == 2
    assert first_difference(np.array([1, 2]), np.array([1, 2, 3])) == 2
    assert first_difference(np.array([], np.int32), np.array([5])) == 0


def test_first_request_and_identical():
    v = view([SYS, U1])
    assert compare(None, v).kind == "first_request"
    d = compare(v, view([SYS, U1]))
    assert d.kind == "identical" and d.offset is None
    shorter = compare(view([SYS, U1, A1, U2]), view([SYS, U1], add_gen=False))
    assert shorter.kind == "identical" and "prefix" in shorter.detail


def test_pure_extension_is_new_content_only():
    prev = view([SYS, U1], add_gen=False)
    d = compare(prev, view([SYS, U1, A1, U2]))
    assert d.kind == "new_content_only"
    assert d.offset == len(prev.ids) and d.message_index == 2


def test_divergence_inside_the_generation_prompt_is_new_content_only():
    # The previous request ended with the generation prompt [90, 99]; this one continues with
    # the assistant's message, whose first tokens merged differently ([90, 98, ...]).
    prev = view([SYS, U1], gen_merge=[90, 99])
    cur = view([SYS, U1, {"role": "assistant", "content": [98, 301]}, U2])
    d = compare(prev, cur)
    assert d.kind == "new_content_only"
    assert d.offset == len(prev.ids) - 1  # diverged at the generation prompt's second token
    assert "generation prompt" in d.detail


def test_generation_tail_heuristic_when_its_length_is_unknown():
    prev = view([SYS, U1], gen_merge=[90, 99])._replace(gen_prompt_tokens=None)
    cur = view([SYS, U1, {"role": "assistant", "content": [98, 301]}, U2])
    assert compare(prev, cur).kind == "new_content_only"
    # ...but not when the earlier messages differ: that is a real miss.
    cur2 = view([SYS, {"role": "user", "content": [201, 777]},
                 {"role": "assistant", "content": [98]}, U2])
    assert compare(prev, cur2).kind == "history_rewritten"


def test_system_changed_in_the_header():
    prev = view([SYS, U1, A1, U2])
    new_sys = {"role": "system", "content": [101, 199, 103]}  # e.g. a timestamp
    d = compare(prev, view([new_sys, U1, A1, U2]))
    assert d.kind == "system_changed"
    assert d.offset == 3 and d.message_index == 0
    assert d.detail == "system prompt changed at token 3 (header)"


def test_system_changed_in_the_body_and_tail_of_a_long_system_prompt():
    long_sys = {"role": "system", "content": list(range(1000, 1200))}
    body = {"role": "system", "content": [*range(1000, 1100), 7, *range(1101, 1200)]}
    tail = {"role": "system", "content": [*range(1000, 1195), 7, *range(1196, 1200)]}
    prev = view([long_sys, U1])
    assert compare(prev, view([body, U1])).detail == (
        "system prompt changed at token 102 (body, 50% in)")
    assert compare(prev, view([tail, U1])).detail.endswith("(tail)")


def test_system_sections_reordered():
    a, b = "## Tools\nuse them", "## Style\nbe brief"
    prev = PromptView.build([0, 1, 2, 3], [0], [{"role": "system", "content": a + b}],
                            system_sections=[a, b])
    cur = PromptView.build([0, 2, 1, 3], [0], [{"role": "system", "content": b + a}],
                           system_sections=[b, a])
    d = compare(prev, cur)
    assert d.kind == "system_changed" and "sections reordered" in d.detail and d.offset == 1


def test_tools_changed():
    prev = view([SYS, U1], tools=[[501, 502]])
    d = compare(prev, view([SYS, U1], tools=[[501, 502], [503]]))
    assert d.kind == "tools_changed" and "+1 -0" in d.detail
    assert d.message_index is None  # tools render before the first message here


def test_history_rewritten_by_compaction():
    prev = view([SYS, U1, A1, U2, A2], add_gen=False)
    compacted = {"role": "user", "content": [250]}  # U1..A1 summarised
    d = compare(prev, view([SYS, compacted, U2, A2, U3]))
    assert d.kind == "history_rewritten"
    assert d.offset == 6 and d.message_index == 1
    assert "2 of 4 earlier messages no longer present" in d.detail


def test_messages_reordered():
    prev = view([SYS, U1, A1, U2], add_gen=False)
    d = compare(prev, view([SYS, U2, U1, A1]))
    assert d.kind == "messages_reordered"
    assert d.offset == 6 and d.message_index == 1


def test_rendering_changed_when_messages_are_equal():
    prev = view([SYS, U1, A1, U2])
    cur = view([SYS, U1, A1, U2])
    ids = cur.ids.copy()
    ids[9] = 4  # the template rendered the (unchanged) first assistant turn differently
    d = compare(prev, cur._replace(ids=ids))
    assert d.kind == "rendering_changed" and d.offset == 9 and d.message_index == 2


def test_raw_prompt_changed():
    prev = PromptView.build([5, 6, 7, 8])
    d = compare(prev, PromptView.build([5, 6, 9, 8]))
    assert (d.kind, d.offset, d.message_index) == ("prompt_changed", 2, None)


def test_cache_control_markers_do_not_change_a_message():
    marked = {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}
    a = PromptView.build([1, 2], [0], [{"role": "user", "content": [marked]}])
    plain = {"type": "text", "text": "hi"}
    b = PromptView.build([1, 2], [0], [{"role": "user", "content": [plain]}])
    assert a.message_hashes == b.message_hashes


def test_build_checks_its_input():
    with pytest.raises(ValueError, match="message starts"):
        PromptView.build([1, 2, 3], [0, 1], [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="ascending"):
        PromptView.build([1, 2, 3], [2, 1], [{"role": "user"}, {"role": "user"}])


def test_tracker_compares_with_the_previous_request_of_the_same_session():
    tracker = SessionTracker()
    assert tracker.observe("a", view([SYS, U1])).kind == "first_request"
    assert tracker.observe("b", view([SYS, U2])).kind == "first_request"
    assert tracker.observe("a", view([SYS, U1, A1, U2])).kind == "new_content_only"
    assert tracker.observe("a", view([SYS, U1, A1, U2])).kind == "identical"
    assert len(tracker) == 2


def test_tracker_compares_with_the_closest_of_interleaved_conversations():
    main, side = [SYS, U1], [{"role": "system", "content": [150]}, U3]
    both = SessionTracker()
    only_last = SessionTracker(TrackerConfig(per_session=1))
    for tracker in (both, only_last):
        tracker.observe("s", view(main, add_gen=False))
        tracker.observe("s", view(side))  # a sub-agent under the same session id
    d = both.observe("s", view([*main, A1, U2]))
    assert d.kind == "new_content_only"  # the main thread is still held
    assert only_last.observe("s", view([*main, A1, U2])).kind == "system_changed"


def test_tracker_forgets_least_recent_sessions_beyond_its_bounds():
    tracker = SessionTracker(TrackerConfig(max_sessions=2))
    for s in ("a", "b", "a", "c"):  # "b" is now the least recently seen
        tracker.observe(s, view([SYS, U1]))
    assert len(tracker) == 2
    assert tracker.observe("b", view([SYS, U1])).kind == "first_request"
    assert tracker.observe("a", view([SYS, U1])).kind == "first_request"  # evicted by "b"

    v = view([SYS, U1])
    assert len(v.ids) == 9
    small = SessionTracker(TrackerConfig(max_tokens=20, per_session=2))
    for s in ("x", "y", "z"):
        small.observe(s, v)
    assert len(small) == 2 and small.tokens == 18
    assert small.observe("x", v).kind == "first_request"  # evicted; now y is gone too
    assert len(small) == 2 and small.tokens == 18
    small.observe("x", v)  # a second prompt for x: its two are kept, z is evicted
    assert len(small) == 1 and small.tokens == 18
    small.observe("x", v)  # only per_session=2 prompts are kept
    assert small.tokens == 18
    small.forget("x")
    assert small.tokens == 0 and len(small) == 0


def test_session_key_precedence():
    body = {"prompt_cache_key": "pck", "metadata": {"user_id": "uid"},
            "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
    assert session_key({"X-Claude-Code-Session-Id": "cc"}, body) == "cc"
    assert session_key(CIMultiDict({"SESSION-ID": "sid"}), body) == "sid"
    assert session_key({"x-session-id": " xs "}, body) == "xs"
    assert session_key({}, body) == "pck"
    assert session_key({}, {**body, "prompt_cache_key": None}) == "uid"
    derived = session_key({}, {"messages": body["messages"]})
    assert derived == "derived-" + xxhash.xxh3_64_hexdigest(b"S\x00U")
    # The same conversation one turn later keeps its key; another one does not.
    later = {"messages": [*body["messages"], {"role": "assistant", "content": "A"},
                          {"role": "user", "content": "U2"}]}
    assert session_key({}, later) == derived
    other = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "V"}]}
    assert session_key({}, other) != derived
    # Anthropic: top-level system, text-block content.
    anthropic = {"system": [{"type": "text", "text": "S"}],
                 "messages": [{"role": "user", "content": [{"type": "text", "text": "U"}]}]}
    assert session_key({}, anthropic) == derived
    assert session_key({}, {"prompt": "U"}) == "derived-" + xxhash.xxh3_64_hexdigest(b"\x00U")


def test_tenant_hash_is_salted_and_never_the_key():
    key = "sk-test-123"
    h = tenant_hash(key)
    assert h == xxhash.xxh3_128_hexdigest(DEFAULT_TENANT_SALT.encode() + b"\x00" + key.encode())
    assert len(h) == 32 and key not in h
    assert tenant_hash(key, salt="other") != h
    assert tenant_from_headers({"Authorization": f"Bearer {key}"}) == h
    assert tenant_from_headers({"x-api-key": key}) == h
    assert tenant_from_headers({}) is None
    with pytest.raises(ValueError):
        tenant_hash("")


def test_derived_session_survives_a_new_header_and_reordered_sections():
    # Agents rewrite a timestamp line and reorder sections every turn; without a session
    # header the derived key must still name the same conversation.
    def body(system):
        return {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": "fix the bug"}]}

    a = session_key({}, body("Current time: 2025-06-01 09:00:00\n# Tools\nread\n# Memory\nx"))
    b = session_key({}, body("Current time: 2025-06-01 09:04:31\n# Memory\nx\n# Tools\nread"))
    c = session_key({}, body("Current time: 2025-06-01 09:00:00\n# Tools\nwrite\n# Memory\nx"))
    assert a == b
    assert a != c
