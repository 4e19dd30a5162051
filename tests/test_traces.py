"""The trace generator: determinism, each family's defining property, the API shapes, the CLI."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from irminsul.proxy.anthropic import messages_to_chat
from irminsul.proxy.trace_io import load_trace
from irminsul.proxy.traces import BASE_FAMILIES, FAMILIES, TraceConfig, generate, traces_command

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "traces"
SMALL = {"sessions": 2, "turns": 4, "skills": 2, "skill_tokens": 80, "memory_tokens": 40,
         "tool_tokens": 200, "doc_tokens": 150}
ENV = re.compile(r"<env>\n.*?</env>(\n\n)?", re.DOTALL)


def trace(family: str, **kw):
    return generate(TraceConfig.preset(family, **{**SMALL, **kw}))


def by_session(requests):
    out: dict[str, list] = {}
    for r in requests:
        out.setdefault(r.session, []).append(r)
    return out


def split_system(body):
    return body["messages"][0]["content"], body["messages"][1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_bytes_other_seed_other_bytes(family):
    first = "".join(r.to_line() for r in trace(family, seed=3))
    assert first == "".join(r.to_line() for r in trace(family, seed=3))
    assert first != "".join(r.to_line() for r in trace(family, seed=4))


def test_lines_have_the_trace_shape():
    for r in trace("mixed", api="mixed", sessions=6):
        line = json.loads(r.to_line())
        assert set(line) == {"session", "turn", "family", "api", "endpoint", "body"}
        assert line["family"] in BASE_FAMILIES
        assert (line["api"], line["endpoint"]) in {("openai", "/v1/chat/completions"),
                                                   ("anthropic", "/v1/messages")}


def test_header_family_changes_only_the_header():
    for position in ("system-start", "system-end", "user"):
        for turns in by_session(trace("header", header_position=position, turns=5)).values():
            rest = []
            for r in turns:
                system, msgs = split_system(r.body)
                rest.append((ENV.sub("", system), [ENV.sub("", m["content"]) for m in msgs]))
            env_texts = [re.findall(r"<env>.*?</env>", json.dumps(r.body)) for r in turns]
            # one new header per turn, and it changed every turn
            newest = [e[-1] for e in env_texts]
            assert all(a != b for a, b in itertools.pairwise(newest)), position
            for (sys_a, msgs_a), (sys_b, msgs_b) in itertools.pairwise(rest):
                assert sys_a == sys_b  # the system prompt around the header never changes
                assert msgs_b[: len(msgs_a)] == msgs_a  # the conversation only grows


def test_header_length_follows_header_tokens():
    def env_chars(n):
        r = trace("header", header_tokens=n, sessions=1, turns=1)[0]
        return len(re.search(r"<env>.*?</env>", r.body["messages"][0]["content"], re.DOTALL)[0])

    assert env_chars(50) < env_chars(250) < env_chars(1000) < env_chars(2000)


def sections(system: str) -> dict[str, str]:
    parts = re.split(r"(?m)^(?=# )", system)
    return {p.split("\n", 1)[0]: p.strip() for p in parts if p.strip()}


def test_reorder_family_reorders_the_same_sections():
    reordered = 0
    for turns in by_session(trace("reorder", turns=6)).values():
        orders, contents = [], []
        for r in turns:
            system, _ = split_system(r.body)
            secs = sections(system)
            orders.append(list(secs))
            skills = sorted(s.strip() for s in re.split(r"(?m)^(?=## Skill: )", secs["# Skills"])[1:])
            contents.append(({k: v for k, v in secs.items() if k != "# Skills"}, skills))
        assert sorted(orders[0]) == ["# Identity", "# Memory", "# Skills", "# Tools"]
        assert all(c == contents[0] for c in contents)  # the same sections, word for word
        reordered += sum(a != b for a, b in itertools.pairwise(orders))
        for a, b in itertools.pairwise(turns):
            assert b.body["messages"][1 : len(a.body["messages"])] == a.body["messages"][1:]
    assert reordered >= 4  # 10 turn changes, each a new order with probability 23/24


def tool_results(body) -> dict[str, str]:
    return {m["tool_call_id"]: m["content"] for m in body["messages"] if m["role"] == "tool"}


@pytest.mark.parametrize("mode", ["oldest", "newest", "none"])
def test_toolloop_compaction_rewrites_old_tool_results(mode):
    requests = trace("toolloop", turns=12, compaction=mode, context_budget=500, keep_recent=1,
                     tool_tokens=300)
    events = 0
    for turns in by_session(requests).values():
        for a, b in itertools.pairwise(turns):
            before, after = tool_results(a.body), tool_results(b.body)
            changed = [k for k in before if before[k] != after[k]]
            for k in changed:
                assert after[k].startswith("[compacted: ") and len(after[k]) < len(before[k])
            # only results not yet compacted are rewritten (never the one this turn added)
            live = [k for k in before if not before[k].startswith("[compacted: ")]
            assert set(changed) <= set(live)
            # among large results, the rewrite takes the oldest (or newest) ones first
            big = [k for k in live if len(before[k]) >= 1000]
            hit = [k for k in big if k in changed]
            if hit:
                events += 1
                assert hit == (big[: len(hit)] if mode == "oldest" else big[-len(hit):])
            # nothing but tool results changes; the conversation grows
            keep = [m for m in a.body["messages"] if m["role"] != "tool"]
            assert [m for m in b.body["messages"] if m["role"] != "tool"][: len(keep)] == keep
    assert (events == 0) == (mode == "none")


def test_subagents_get_the_same_documents_and_skills_in_another_wrapper():
    sessions = by_session(trace("subagent", docs=2, subagents=2, subagent_turns=2))
    parents = [s for s in sessions if "/" not in s]
    assert parents and all(f"{p}/sub1" in sessions and f"{p}/sub2" in sessions for p in parents)
    for p in parents:
        parent_system, _ = split_system(sessions[p][0].body)
        for k in (1, 2):
            sub = sessions[f"{p}/sub{k}"][0].body
            sub_system, sub_msgs = split_system(sub)
            user = sub_msgs[0]["content"]
            docs = re.findall(r'<document path="[^"]+">\n(.*?)\n</document>', user, re.DOTALL)
            skills = re.findall(r"(?ms)^## Skill: .*?(?=\n\n## Skill: |\n</skills>)", user)
            assert len(docs) == 2 and len(skills) == 2
            assert all(d in parent_system for d in docs + skills)
            assert sub_system[:200] != parent_system[:200]  # another wrapper


def documents(body) -> list[tuple[str, str]]:
    return re.findall(r'<document index="\d+" source="([^"]+)">\n(.*?)\n</document>',
                      body["messages"][0]["content"], re.DOTALL)


def test_rag_family_reorders_the_same_documents():
    reordered = 0
    for turns in by_session(trace("rag", turns=6, docs=4, rag_corpus=6)).values():
        docs = [documents(r.body) for r in turns]
        assert all(len(d) == 4 and sorted(d) == sorted(docs[0]) for d in docs)
        reordered += sum(a != b for a, b in itertools.pairwise(docs))
    assert reordered >= 6  # 10 turn changes, each a new order with probability 23/24


def test_anthropic_form_translates_back_to_the_openai_form():
    for fam in ("toolloop", "subagent", "rag"):
        openai_form = trace(fam)
        anthropic_form = trace(fam, api="anthropic")
        assert [r.endpoint for r in anthropic_form] == ["/v1/messages"] * len(openai_form)
        for o, a in zip(openai_form, anthropic_form):
            assert isinstance(a.body["system"], str) and a.body["max_tokens"] >= 1
            chat = messages_to_chat(a.body).body
            assert chat["messages"] == o.body["messages"]
            assert chat.get("tools") == o.body.get("tools")


def test_cli_writes_the_same_file_twice(tmp_path):
    runner = CliRunner()
    args = ["generate", "--family", "rag", "--sessions", "2", "--turns", "2", "--seed", "7",
            "--set", "doc_tokens=120"]
    for name in ("a.jsonl", "b.jsonl"):
        result = runner.invoke(traces_command, [*args, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert len(load_trace(tmp_path / "a.jsonl")) == 4


@pytest.mark.parametrize("args, message", [
    (["--family", "header", "--header-tokens", "0"], "header_tokens > 0"),
    (["--family", "rag", "--set", "bogus=1"], "expected KEY=VALUE"),
    (["--family", "rag", "--set", "docs=many"], "not a valid int"),
    (["--family", "rag", "--set", "docs=20"], "must be <= rag_corpus"),
    (["--family", "rag", "--set", "turns=2"], "use --turns instead"),
])
def test_cli_refuses_bad_settings(tmp_path, args, message):
    result = CliRunner().invoke(traces_command, ["generate", *args, "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize("family", FAMILIES)
def test_committed_samples_are_small_valid_traces(family):
    path = EXAMPLES / f"{family}.jsonl"
    assert path.stat().st_size < 200 * 1024
    requests = load_trace(path)
    sessions = by_session(requests)
    assert len(sessions) >= 2 and max(len(t) for t in sessions.values()) >= 3
    expected = set(BASE_FAMILIES) if family == "mixed" else {family}
    assert {r.family for r in requests} <= expected
