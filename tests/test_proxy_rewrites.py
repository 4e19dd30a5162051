"""Opt-in rewrites (--reorder stable-first, --normalize-claude-attribution), --record, and the
proxy's config checks."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.proxy_harness import start_stack

from irminsul.proxy.attribution import normalize_attribution, strip_attribution
from irminsul.proxy.config import ProxyConfig, normalize_upstream
from irminsul.proxy.reorder import VOLATILE_LINE, is_volatile, reorder_body, stable_first

CLAUDE_LIKE = """You are an interactive CLI tool that helps users with software engineering tasks.

Here is useful information about the environment you are running in:
<env>
Working directory: /home/u/project
Is directory a git repo: Yes
Platform: linux
Today's date: 2025-06-0{day}
</env>

# Tone and style
Be concise. Answer in fewer than 4 lines.
{rules}

gitStatus: This is the git status at the start of the conversation.
Current branch: feature-{day}

Status:
M src/app.py"""
RULES = "\n".join(f"- Rule {i}: prefer small, reviewed changes over large rewrites."
                  for i in range(20))


def claude_like(day: int) -> str:
    return CLAUDE_LIKE.format(day=day, rules=RULES)


def test_stable_first_moves_volatile_lines_and_sections_last():
    out = stable_first(claude_like(1))
    assert out.moved == 3  # the cwd+date lines of <env>, the git paragraph, "Status:"
    stable, volatile = out.text.split("# Tone and style")
    assert "Working directory" not in stable and "Today's date" not in stable
    assert "Platform: linux" in stable and "<env>" in stable
    assert volatile.index("Working directory") < volatile.index("gitStatus") < volatile.index(
        "M src/app.py")
    # nothing lost or added: the same lines, in another order (blank separators aside)
    def lines(text):
        return sorted(ln for ln in text.split("\n") if ln)

    assert lines(out.text) == lines(claude_like(1))
    # two days' prompts now share everything up to the volatile tail
    other = stable_first(claude_like(2)).text
    common = next(i for i, (a, b) in enumerate(zip(out.text, other)) if a != b)
    assert common > out.text.index("Answer in fewer than 4 lines.")
    assert stable_first(out.text).text == out.text  # already stable-first: unchanged
    text = "Plain instructions.\n\nNo dates here."
    assert stable_first(text) == (text, 0)


# Pieces of lines: volatile ones of every pattern, near misses, words that share letters with
# the keywords, punctuation the patterns read, and non-ASCII characters that IGNORECASE folds
# to ASCII letters (long s, Kelvin sign, dotted capital I) or that \\d counts as digits.
PIECES = ["2025-06-01", "12/31/2025", "3/4/25", "March 3, 2025", "3 march 2025", "sept. 9 2024",
          "14:05", "2:05 pm", "9:30:12 UTC", "Today's date", "todays date", "current time",
          "TIMESTAMP", "the time is", "now is", "Working directory:", "- cwd :", "pwd:",
          "git status:", "Current Branch:", "token budget", "tokens left", "remaining tokens",
          "context window remaining", "context left", "<budget>", "<total_tokens>",
          "2025", "12", "7:", "/", ":", "-", "*", " ", "  ", "date", "time", "dates", "times",
          "tokenizer", "contextual", "budgetary", "directory", "branching", "nowis", "now  is",
          "may", "june", "mar", "sept", "Dec.", "st", "th", "am", "z", "ſ", "K", "İ", "٣",
          "١٢:٣٠", "naïve", "word", "tools", "x"]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=8), st.booleans())
def test_is_volatile_answers_as_the_pattern(parts, spaced):
    line = (" " if spaced else "").join(parts)
    assert is_volatile(line) == (VOLATILE_LINE.search(line) is not None), line


def test_is_volatile_on_known_lines():
    for line in ("Today's date: 2025-06-01", "Working directory: /home/u", "at 14:05",
                 "- git status: clean", "You have 12000 tokens left", "Updated March 3, 2025"):
        assert is_volatile(line), line
    for line in ("Be concise.", "Use 4 spaces", "the tokenizer splits text", "# Tools", ""):
        assert not is_volatile(line), line


def test_reorder_body_leaves_the_request_untouched():
    body = {"messages": [{"role": "system", "content": claude_like(1)},
                         {"role": "user", "content": "Today's date: 2025-06-01"}]}
    before = json.dumps(body)
    out, moved = reorder_body(body, "chat")
    assert moved == 3 and json.dumps(body) == before
    assert out["messages"][1] == body["messages"][1]  # only system text is rewritten
    assert out["messages"][0]["content"] == stable_first(claude_like(1)).text
    anth = {"system": [{"type": "text", "text": claude_like(1)}], "messages": []}
    out, moved = reorder_body(anth, "messages")
    assert moved == 3 and out["system"][0]["text"].endswith("M src/app.py")


def test_attribution_line_is_stripped():
    line = "x-anthropic-billing-header: cc_version=2.1.37.0d9; cc_entrypoint=cli; cch=fa690;"
    assert strip_attribution(f"{line}\nYou are Claude Code.") == "You are Claude Code."
    body = {"system": [{"type": "text", "text": line}, {"type": "text", "text": "Rules."}],
            "messages": []}
    out, changed = normalize_attribution(body, "messages")
    assert changed and out["system"] == [{"type": "text", "text": "Rules."}]
    assert body["system"][0]["text"] == line  # the original is untouched
    assert normalize_attribution({"system": "Rules."}, "messages") == ({"system": "Rules."},
                                                                      False)


async def test_reorder_raises_the_prefix_hit_of_a_stock_upstream(aiohttp_server):
    async def cached_on_second_day(**config) -> tuple[int, int, str]:
        stack = await start_stack(aiohttp_server, db=None, **config)
        client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="k", max_retries=0)
        for day in (1, 2):
            msgs = [{"role": "system", "content": claude_like(day)},
                    {"role": "user", "content": "List the files."}]
            r = await client.chat.completions.create(model="m", messages=msgs)
        sent = stack.fake.received[-1].body["messages"][0]["content"]
        await stack.close()
        return r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens, sent

    plain, _, sent = await cached_on_second_day()
    assert sent == claude_like(2)
    reordered, total2, sent = await cached_on_second_day(reorder="stable-first")
    assert sent == stable_first(claude_like(2)).text
    # plain: the hit ends at the date in <env>; reordered: only the volatile tail misses
    assert plain < claude_like(1).index("2025-06-01") + 60 < len(RULES) < reordered - plain
    assert total2 - reordered < 250  # the moved tail (cwd, date, git status) and the user turn


async def test_attribution_normalized_before_forwarding(aiohttp_server):
    line = "x-anthropic-billing-header: cc_version=2.1.37.0d9; cc_entrypoint=cli; cch={};"
    stack = await start_stack(aiohttp_server, db=None, normalize_claude_attribution=True)
    client = anthropic.AsyncAnthropic(base_url=stack.base, api_key="k", max_retries=0)
    for cch in ("fa690", "0b1c2"):
        msg = await client.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}],
            system=[{"type": "text", "text": line.format(cch)},
                    {"type": "text", "text": "You are Claude Code."}])
    assert stack.fake.received[-1].body["messages"][0] == {"role": "system",
                                                          "content": "You are Claude Code."}
    assert msg.usage.input_tokens == 1  # the whole prompt but its last token was a prefix hit
    await stack.close()


async def test_record_appends_each_request_body(aiohttp_server, tmp_path):
    record = tmp_path / "traffic.jsonl"
    stack = await start_stack(aiohttp_server, db=None, record=str(record),
                              reorder="stable-first")
    client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="k", max_retries=0)
    bodies = [{"model": "m", "messages": [{"role": "system", "content": claude_like(d)}, {"role": "user", "content": f"turn {d}"}]} for d in (1, 2)]
    for b in bodies:
        await client.chat.completions.create(**b, extra_headers={"x-session-id": "rec-1"})
    await client.completions.create(model="m", prompt="abc")
    await stack.close()
    lines = [json.loads(ln) for ln in record.read_text().splitlines()]
    assert [ln["endpoint"] for ln in lines] == ["/v1/chat/completions"] * 2 + ["/v1/completions"]
    assert [ln["body"] for ln in lines[:2]] == bodies  # as the client sent it, not reordered
    assert all(ln["type"] == "request" and ln["time"].endswith("+00:00") for ln in lines)
    assert [ln["session"] for ln in lines[:2]] == ["rec-1", "rec-1"]


def test_config_checks():
    assert normalize_upstream("localhost:30000") == "http://localhost:30000"
    assert normalize_upstream("https://gpu:8443/") == "https://gpu:8443"
    assert ProxyConfig(upstream="127.0.0.1:1").upstream == "http://127.0.0.1:1"
    assert ProxyConfig().host == "127.0.0.1"
    for bad in ("ftp://x", "http://", "localhost:port", "http://h:1/?q=1"):
        with pytest.raises(ValueError):
            normalize_upstream(bad)
    for kw in ({"reorder": "sometimes"}, {"port": 70000}, {"max_body_bytes": 10},
               {"upstream_timeout": 0}, {"upstream_timeout": float("nan")}, {"db": ""},
               {"prewarm": -1}, {"prewarm": True}, {"prewarm_min_tokens": 0},
               {"prewarm_k": -1}):
        with pytest.raises(ValueError):
            ProxyConfig(**kw)
