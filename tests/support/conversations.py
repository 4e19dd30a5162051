"""Seeded random texts and OpenAI-style conversations for tokenizer and chat-template tests.

Texts mix what agents send: source code (from the Python stdlib on the machine), prose in
several scripts, emoji, whitespace runs, digits, markdown headings, XML-like tags, '---'
lines, and now and then a literal added-token string inside a message (which tokenizes
as that token, as in the engine).
"""

from __future__ import annotations

import copy
import json
import random
import sysconfig
from functools import lru_cache
from pathlib import Path

WORDS = (
    "the",
    "agent",
    "résumé",
    "naïve",
    "日本語",
    "テキスト",
    "中文",
    "текст",
    "🙂",
    "👍🏽",
    "x",
    "Foo",
    "bar_baz",
    "42",
    "3.14159",
    "1234567890",
    "''",
    '"q"',
    "(",
    ")",
    "{",
    "}",
    "->",
    "::",
    "==",
    "\\n",
    "\u00a0",
    "\u200b",
    "e\u0301",
)
SPACES = (" ", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "   \n\n  ")
LINES = (
    "# Heading",
    "## Sub heading",
    '<document index="2">',
    "</document>",
    "<env>",
    "---",
    "- item",
    "1. step",
    "```python",
    "```",
    "#notaheading",
    "> quote",
)


@lru_cache(maxsize=1)
def code_pool() -> tuple[str, ...]:
    """A few stdlib modules cut into ~2 KB snippets (the same files on every run)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in ("json/decoder.py", "textwrap.py", "heapq.py", "bisect.py", "shlex.py"):
        p = stdlib / name
        if p.is_file():
            t = p.read_text(encoding="utf-8")
            out += [t[i : i + 2000] for i in range(0, len(t), 2000)]
    return tuple(out) or ("def f(x):\n    return x\n",)


def random_text(rng: random.Random, specials: tuple[str, ...] = (), max_parts: int = 30) -> str:
    parts = []
    for _ in range(rng.randint(0, max_parts)):
        r = rng.random()
        if r < 0.08:
            s = rng.choice(code_pool())
            a = rng.randrange(len(s))
            parts.append(s[a : a + rng.randint(1, 600)])
        elif r < 0.2:
            parts.append("\n" + rng.choice(LINES) + rng.choice(("", " title", "\n")))
        elif r < 0.26 and specials:
            parts.append(rng.choice(specials))
        elif r < 0.5:
            parts.append(rng.choice(SPACES))
        else:
            parts.append(rng.choice(WORDS))
    return "".join(parts)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file.\n# Notes\nUTF-8 only.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run",
            "description": "Run a shell command <safe>",
            "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
        },
    },
]


def random_conversation(
    rng: random.Random, specials: tuple[str, ...] = (), max_messages: int = 12
) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools): an optional system message, then user/assistant/tool turns."""
    msgs: list[dict] = []
    if rng.random() < 0.7:
        msgs.append({"role": "system", "content": random_text(rng, specials)})
    pending: list[str] = []
    for k in range(rng.randint(1, max_messages)):
        if pending:
            cid = pending.pop(0)
            msgs.append(
                {"role": "tool", "tool_call_id": cid, "content": random_text(rng, specials)}
            )
            continue
        if not msgs or msgs[-1]["role"] in ("system", "assistant", "tool") and rng.random() < 0.6:
            content = random_text(rng, specials)
            if rng.random() < 0.2:
                content = [{"type": "text", "text": content}, {"type": "text", "text": "more"}]
            msgs.append({"role": "user", "content": content})
        elif rng.random() < 0.5:
            calls = []
            for j in range(rng.randint(1, 2)):
                cid = f"call_{k}_{j}"
                args = {"path": random_text(rng, (), 3)} if rng.random() < 0.5 else {"cmd": "ls"}
                calls.append(
                    {
                        "id": cid,
                        "type": "function",
                        "function": {
                            "name": rng.choice(("read_file", "run")),
                            "arguments": json.dumps(args),
                        },
                    }
                )
                pending.append(cid)
            content = None if rng.random() < 0.5 else random_text(rng, specials, 5)
            msgs.append({"role": "assistant", "content": content, "tool_calls": calls})
        else:
            msgs.append({"role": "assistant", "content": random_text(rng, specials)})
    for cid in pending:
        msgs.append({"role": "tool", "tool_call_id": cid, "content": random_text(rng, specials)})
    if msgs[-1]["role"] == "system":
        msgs.append({"role": "user", "content": random_text(rng, specials)})
    tools = TOOLS if rng.random() < 0.4 else None
    return msgs, tools


REASONING_SPECIALS = ("</think>", "<think>", "<|end|>")  # what reasoning templates split on


def next_turn(rng: random.Random, msgs: list[dict], tools):
    """An agent's next request: mostly the same messages plus new ones, sometimes edited,
    a system message that arrives late, or tools switched."""
    msgs = copy.deepcopy(msgs)
    r = rng.random()
    if r < 0.5 or len(msgs) < 3:  # new turn(s) appended
        more, _ = random_conversation(rng, REASONING_SPECIALS, 4)
        msgs += [m for m in more if m["role"] != "system"]
    elif r < 0.65:  # the last message replaced (a retried or edited last turn)
        msgs[-1] = {"role": "user", "content": random_text(rng, REASONING_SPECIALS)}
    elif r < 0.72:  # a message in the middle edited
        msgs[rng.randrange(len(msgs))]["content"] = random_text(rng, REASONING_SPECIALS, 3)
    elif r < 0.78:  # two messages swapped
        i, j = sorted(rng.sample(range(len(msgs)), 2))
        msgs[i], msgs[j] = msgs[j], msgs[i]
    elif r < 0.84:  # history compacted
        del msgs[rng.randrange(1, len(msgs) - 1)]
    elif r < 0.92:  # a system message arrives late (changes what R1's `pre` gathers)
        msgs.append({"role": "system", "content": random_text(rng, REASONING_SPECIALS, 5)})
        msgs.append({"role": "user", "content": "go on"})
    else:  # tools switched on or off
        tools = None if tools else TOOLS
    return msgs, tools
