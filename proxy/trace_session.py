"""Building blocks of an agent session: the request ``Step``, the ``<env>`` header an agent
rebuilds every turn, and the tool loop of a coding agent with compaction of old tool outputs.

Compaction replaces a tool result's content with a one-line note once the uncompacted tool
output passes ``context_budget`` tokens-ish, down to half of it, sparing the newest
``keep_recent`` results. ``oldest`` compacts from the start of the conversation (what most
agents do: the rewrite lands early and breaks the prefix of everything after it); ``newest``
compacts the newest eligible results first, so the conversation's prefix stays byte-identical
(openclaw PR #58036); ``none`` never compacts.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from irminsul.proxy import trace_content as content

COMPACTIONS = ("oldest", "newest", "none")
HEADER_POSITIONS = ("system-start", "system-end", "user")
_EPOCH = datetime(2025, 3, 3, 9, 0, tzinfo=timezone.utc)


class Step(NamedTuple):
    """One request of a session, before it is written in an API's shape."""

    session: str
    turn: int
    family: str
    system: str
    messages: tuple[dict, ...]  # OpenAI chat messages after the system prompt
    tools: tuple[dict, ...]  # OpenAI function tools


class EnvHeader:
    """The ``<env>`` block an agent rebuilds every turn; ``advance`` moves it one turn on."""

    def __init__(self, rng: random.Random, tokens: int, package: str):
        self.rng, self.tokens, self.package = rng, tokens, package
        self.now = _EPOCH + timedelta(seconds=rng.randint(0, 20 * 86400))
        self.budget = 200_000 - rng.randint(0, 30_000)
        self.paths = [content.repo_path(p, package) for p in content.stdlib_files()]
        self.status = [[rng.choice((" M", "??", "A ", " D")), rng.choice(self.paths)]
                       for _ in range(max(1, tokens // 25))]
        self.commits = [self._commit(self.now - timedelta(minutes=rng.randint(5, 5000)))
                        for _ in range(max(1, tokens // 20))]

    def _commit(self, when: datetime) -> tuple[str, datetime, str]:
        words = content.prose(self.rng, 8).split()[:9]
        return f"{self.rng.getrandbits(28):07x}", when, " ".join(words).rstrip(".,")

    def advance(self) -> None:
        rng = self.rng
        self.now += timedelta(seconds=rng.randint(20, 240))
        self.budget -= rng.randint(800, 9000)
        entry = rng.choice(self.status)
        entry[0] = rng.choice((" M", "??", "A ", " D", "MM"))
        if rng.random() < 0.4:
            self.status[rng.randrange(len(self.status))][1] = rng.choice(self.paths)
        if rng.random() < 0.3:
            self.commits = [self._commit(self.now)] + self.commits[:-1]

    def text(self) -> str:
        """The block, cut to about ``tokens`` tokens-ish (its lines keep their order)."""
        lines = [
            "<env>", f"Date: {self.now:%Y-%m-%d %H:%M:%S} UTC",
            f"Context budget: {max(self.budget, 0):,} tokens left of 200,000",
            f"Working directory: /home/dev/{self.package}", "Platform: linux", "Git branch: main",
            "Git status:", *(f"{s} {p}" for s, p in self.status), "Recent commits:",
        ]
        for sha, when, msg in self.commits:
            minutes = int((self.now - when).total_seconds() // 60)
            lines.append(f"{sha} ({minutes} minutes ago) {msg}")
        out, count = [], 1
        for line in lines:
            if count >= self.tokens and len(out) >= 2:
                break
            out.append(line)
            count += content.approx_tokens(line)
        return "\n".join(out + ["</env>"])


def with_header(system: str, messages: list[dict], header: EnvHeader | None, position: str):
    """Place this turn's header: at the start or end of the system prompt, or (``user``) in
    front of the newest message, where it stays in the history as agents leave it."""
    if header is None:
        return system, list(messages)
    text = header.text()
    if position == "system-start":
        return text + "\n\n" + system, list(messages)
    if position == "system-end":
        return system + "\n\n" + text, list(messages)
    out = list(messages)
    last = out[-1]
    out[-1] = {**last, "content": text + "\n\n" + last["content"]}
    return system, out


def tool_call_message(rng: random.Random, calls: list[tuple[str, dict]],
                      text: str | None = None) -> dict:
    """An assistant message calling ``calls`` [(tool name, arguments)] in OpenAI form."""
    what = ", ".join(name for name, _ in calls)
    return {
        "role": "assistant",
        "content": text or f"I'll use {what} next.",
        "tool_calls": [
            {"id": f"call_{rng.getrandbits(48):012x}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(args, sort_keys=True)}}
            for name, args in calls
        ],
    }


class _Result(NamedTuple):
    index: int  # position in the message list
    tokens: int
    note: str  # what the result becomes when compacted


class ToolLoop:
    """Builds the steps of one agent session that works through tool calls."""

    def __init__(self, rng: random.Random, package: str, config):
        self.rng, self.package, self.config = rng, package, config
        self.results: list[_Result] = []
        self.compacted: set[int] = set()

    def _action(self) -> tuple[str, dict, str]:
        """(tool, arguments, output) of one tool call with an output of realistic size."""
        rng, pkg, size = self.rng, self.package, self.config.tool_tokens
        kind = rng.choices(("read", "test", "diff", "ls", "grep"), (4, 2, 1, 1, 2))[0]
        if kind == "read":
            path, first, code = content.code_excerpt(rng, int(size * rng.uniform(0.2, 1.6)))
            n = code.count("\n") + 1
            args = {"path": content.repo_path(path, pkg), "offset": first, "limit": n}
            return "read_file", args, content.numbered(code, first)
        if kind == "grep":
            pattern, out = content.grep_output(rng, pkg, max(5, size // 25))
            return "grep", {"pattern": pattern, "path": "src"}, out
        if kind == "test":
            return "bash", {"command": "pytest -q"}, content.pytest_output(rng, pkg, size // 2)
        if kind == "diff":
            return "bash", {"command": "git diff"}, content.git_diff(rng, pkg, size // 3)
        return "bash", {"command": f"ls -la src/{pkg}"}, content.ls_output(rng, pkg)

    def _append_call(self, messages: list[dict]) -> None:
        name, args, output = self._action()
        call = tool_call_message(self.rng, [(name, args)])
        messages.append(call)
        self._append_result(messages, call["tool_calls"][0]["id"], output,
                            f"{name} {json.dumps(args, sort_keys=True)}")

    def _append_result(self, messages: list[dict], call_id: str, output: str, what: str) -> None:
        lines = output.count("\n") + 1
        note = (f"[compacted: {what} returned {lines} lines, {len(output)} characters; "
                f"call the tool again to see them]")
        self.results.append(_Result(len(messages), content.approx_tokens(output), note))
        messages.append({"role": "tool", "tool_call_id": call_id, "content": output})

    def _compact(self, messages: list[dict]) -> None:
        cfg = self.config
        live = [r for r in self.results if r.index not in self.compacted]
        total = sum(r.tokens for r in live)
        if cfg.compaction == "none" or total <= cfg.context_budget:
            return
        # a result no longer than twice its note is left alone: compacting it saves nothing
        candidates = [r for r in live[: max(0, len(live) - cfg.keep_recent)]
                      if r.tokens > 2 * content.approx_tokens(r.note)]
        if cfg.compaction == "newest":
            candidates.reverse()
        for r in candidates:
            if total <= cfg.context_budget // 2:
                break
            messages[r.index] = {**messages[r.index], "content": r.note}
            self.compacted.add(r.index)
            total -= r.tokens

    def _task(self) -> str:
        path, first, _ = content.code_excerpt(self.rng, 30)
        where = content.repo_path(path, self.package)
        return self.rng.choice((
            (f"The tests started failing after the last change to `{where}`. Find out why and "
             "fix it without changing the public API."),
            (f"Refactor the code around line {first} of `{where}` so that it is easier to test, "
             "then run the test suite."),
            f"Add type hints to `{where}` and make sure `pytest -q` still passes.",
        ))

    def run(self, ctx, system: str, header, *, first_user: str | None = None,
            turns: int | None = None, spawn=None) -> list:
        """The session's steps. ``spawn=(call_message, sub_sessions)``: after turn 0 the agent
        delegates with ``call_message``; the sub-sessions' steps come next, round-robin, and
        their reports are the tool results of the parent's turn 1."""
        rng, cfg = self.rng, self.config
        messages: list[dict] = [{"role": "user", "content": first_user or self._task()}]
        steps: list = []
        for turn in range(turns if turns is not None else cfg.turns):
            if turn == 1 and spawn is not None:
                calls, subs = spawn
                messages.append(calls)
                for k in range(max(map(len, subs), default=0)):
                    steps += [s[k] for s in subs if k < len(s)]
                for call in calls["tool_calls"]:
                    self._append_result(messages, call["id"], content.prose(rng, 150),
                                        "task " + call["function"]["name"])
            elif turn and rng.random() < 0.15:
                messages.append({"role": "assistant", "content": content.prose(rng, 80)})
                messages.append({"role": "user", "content": rng.choice((
                    "Thanks. Now run the whole test suite.", "Good, continue.",
                    "That is not it; look at the callers instead."))})
            elif turn:
                self._append_call(messages)
            self._compact(messages)
            if header is not None and turn:
                header.advance()
            sys_text, sent = with_header(system, messages, header, cfg.header_position)
            messages[:] = sent  # in the user position the header stays in the history
            steps.append(Step(ctx.session, turn, ctx.family, sys_text, tuple(sent),
                              ctx.agent.tools))
        return steps
