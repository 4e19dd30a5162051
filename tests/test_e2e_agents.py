"""Real agent CLIs end to end (issue 8): Claude Code and opencode, installed from npm.

(a) Through the proxy to the embedded engine on the shipped tiny model: a turn completes, the
    proxy logs it under the client's own session id, and the next turn of that session is
    served partly from cache according to `irminsul report`.
(b) A tool loop against a scripted SGLang-shaped upstream in stock mode: the first answer
    calls the client's shell tool with `echo irminsul-e2e`, the client really runs it and
    sends the output back through the proxy, and the log explains turn 2.

The clients are npm-installed once per checkout into .cache/agents (pinned versions, see
tests/support/agents.py); when the install fails these tests fail with npm's output.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.agents import (
    AgentInstall,
    claude_argv,
    claude_env,
    install_agents,
    opencode_argv,
    opencode_env,
    run_agent,
    short_reply_model,
)
from support.fake_sglang import FakeSGLang, Knobs
from support.proxy_harness import TINY_MODEL, read_rows, tiny_tokenizer

from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.proxy_upstream import embedded_upstream_ctx
from irminsul.proxy.app import create_app
from irminsul.proxy.config import ProxyConfig
from irminsul.proxy.report import report_command
from irminsul.proxy.state import STATE_KEY

pytestmark = pytest.mark.e2e_agents

RUN_TIMEOUT_S = 120.0
MARKER = "irminsul-e2e"
ECHO = json.dumps({"command": f"echo {MARKER}", "description": "Print a marker"})


@pytest.fixture(scope="session")
def agents() -> AgentInstall:
    # No skip: an install failure is a test failure carrying npm's error.
    return install_agents()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


async def flushed(server) -> None:
    """Every row of the requests answered so far is in the SQLite file."""
    st = server.app[STATE_KEY]
    await st.drain()
    await st.writer.flush()


def session_report(db: Path, since: str, session: str) -> dict:
    """`irminsul report --by session --since ... --format json`: the session's group."""
    out = CliRunner().invoke(report_command, ["--db", str(db), "--by", "session", "--since",
                                              since, "--format", "json"])
    assert out.exit_code == 0, out.output
    groups = {g["key"]: g for g in json.loads(out.output)["groups"]}
    assert session in groups, f"session {session} not in report groups {list(groups)}"
    return groups[session]


async def embedded_proxy(aiohttp_server, tmp_path: Path, policy: str = "pic"):
    """The proxy with its embedded engine on the tiny model (short replies, see
    short_reply_model), both on 127.0.0.1; returns (server, db path)."""
    model = short_reply_model(tmp_path / "model")
    db = tmp_path / "savings.db"
    cfg = ProxyConfig(model_dir=str(model), db=str(db))
    engine = EngineConfig(model_dir=str(model), device="cpu", policy=policy)
    app = create_app(cfg, upstream_ctx=embedded_upstream_ctx(cfg, engine_config=engine))
    return await aiohttp_server(app), db


async def stock_proxy(aiohttp_server, tmp_path: Path, tok, tool: dict):
    """A scripted upstream (one tool call, then text) behind the proxy in stock mode."""
    fake = FakeSGLang(tokenizer=tok, knobs=Knobs(tool_calls=True, tool=tool, tool_calls_left=1,
                                                 reply="Done, the marker was printed."))
    upstream = await aiohttp_server(fake.app())
    db = tmp_path / "savings.db"
    cfg = ProxyConfig(upstream=str(upstream.make_url("")), model_dir=str(TINY_MODEL),
                      db=str(db))
    proxy = await aiohttp_server(create_app(cfg, tokenizer=tok))
    return fake, proxy, db


def base_url(server) -> str:
    return str(server.make_url("")).rstrip("/")


def tool_outputs(fake: FakeSGLang) -> list[str]:
    """Contents of the tool-result messages the upstream received, in order."""
    found = []
    for r in fake.received:
        for m in r.body.get("messages", []) if isinstance(r.body, dict) else []:
            if m.get("role") == "tool":
                c = m.get("content")
                found.append(c if isinstance(c, str) else json.dumps(c))
    return found


# ---- Claude Code ------------------------------------------------------------------------


async def test_claude_code_through_embedded_engine(agents, aiohttp_server, tmp_path):
    proxy, db = await embedded_proxy(aiohttp_server, tmp_path)
    sid = str(uuid.uuid4())
    env = claude_env(tmp_path / "home", base_url(proxy), max_output_tokens=128)
    first = await run_agent(claude_argv(agents, "say hi", sid), env, tmp_path / "work",
                            RUN_TIMEOUT_S)
    assert first.returncode == 0, first.describe()
    result = json.loads(first.stdout)
    assert result["session_id"] == sid and not result["is_error"], first.describe()
    await flushed(proxy)
    logged = [r for r in read_rows(db) if r["status"] == 200]
    assert logged and {r["session"] for r in logged} == {sid}
    assert {r["endpoint"] for r in logged} == {"/v1/messages"}
    assert all(r["upstream_mode"] == "embedded" for r in logged)

    since = datetime.now(timezone.utc).isoformat()
    second = await run_agent(claude_argv(agents, "say bye", sid, resume=True), env,
                             tmp_path / "work", RUN_TIMEOUT_S)
    assert second.returncode == 0, second.describe()
    assert json.loads(second.stdout)["session_id"] == sid
    await proxy.close()  # flushes the savings writer
    group = session_report(db, since, sid)
    assert group["exact_prefix_tokens"] + group["reused_tokens"] > 0, group
    turn2 = [r for r in read_rows(db) if r["id"] > logged[-1]["id"]]
    assert turn2 and all(r["session"] == sid for r in turn2)
    # the resumed turn extends the first one's conversation: its first request starts with it
    assert turn2[0]["miss_cause"] in ("new_content_only", "history_rewritten"), turn2[0]


async def test_claude_code_tool_loop_stock(agents, aiohttp_server, tmp_path, tok):
    fake, proxy, db = await stock_proxy(aiohttp_server, tmp_path, tok,
                                        {"name": "Bash", "arguments": ECHO})
    sid = str(uuid.uuid4())
    env = claude_env(tmp_path / "home", base_url(proxy))
    run = await run_agent(claude_argv(agents, f"run echo {MARKER}", sid), env,
                          tmp_path / "work", RUN_TIMEOUT_S)
    assert run.returncode == 0, run.describe()
    result = json.loads(run.stdout)
    assert not result["is_error"] and "marker was printed" in result["result"], run.describe()
    outputs = tool_outputs(fake)
    # the tool result (not the call's arguments) carries the command's output
    assert outputs and MARKER in outputs[-1] and "echo" not in outputs[-1], outputs
    await proxy.close()
    logged = read_rows(db)
    assert [r["status"] for r in logged] == [200, 200], logged
    assert {r["session"] for r in logged} == {sid}
    assert {r["endpoint"] for r in logged} == {"/v1/messages"}
    assert logged[0]["upstream_mode"] == "stock"
    assert logged[0]["miss_cause"] == "first_request"
    assert logged[1]["miss_cause"] == "new_content_only", logged[1]
    assert logged[1]["exact_prefix_tokens"] > 0  # the fake's radix cache kept turn 1


# ---- opencode ---------------------------------------------------------------------------


async def test_opencode_through_embedded_engine(agents, aiohttp_server, tmp_path):
    proxy, db = await embedded_proxy(aiohttp_server, tmp_path)
    env = opencode_env(tmp_path / "home", base_url(proxy), model="tiny-mla", output_limit=128)
    first = await run_agent(opencode_argv(agents, "tiny-mla", "say hi"), env,
                            tmp_path / "work", RUN_TIMEOUT_S)
    assert first.returncode == 0, first.describe()
    await flushed(proxy)
    logged = [r for r in read_rows(db) if r["status"] == 200]
    sessions = {r["session"] for r in logged}
    assert logged and len(sessions) == 1 and next(iter(sessions)).startswith("ses_"), logged
    assert {r["endpoint"] for r in logged} == {"/v1/chat/completions"}
    sid = next(iter(sessions))

    since = datetime.now(timezone.utc).isoformat()
    second = await run_agent(opencode_argv(agents, "tiny-mla", "say bye", cont=True), env,
                             tmp_path / "work", RUN_TIMEOUT_S)
    assert second.returncode == 0, second.describe()
    await proxy.close()
    turn2 = [r for r in read_rows(db) if r["id"] > logged[-1]["id"]]
    assert turn2 and {r["session"] for r in turn2} == {sid}, turn2
    group = session_report(db, since, sid)
    assert group["exact_prefix_tokens"] + group["reused_tokens"] > 0, group


async def test_opencode_tool_loop_stock(agents, aiohttp_server, tmp_path, tok):
    fake, proxy, db = await stock_proxy(aiohttp_server, tmp_path, tok,
                                        {"name": "bash", "arguments": ECHO})
    env = opencode_env(tmp_path / "home", base_url(proxy), model="fake-model",
                       output_limit=128)
    run = await run_agent(opencode_argv(agents, "fake-model", f"run echo {MARKER}"), env,
                          tmp_path / "work", RUN_TIMEOUT_S)
    assert run.returncode == 0, run.describe()
    assert "marker was printed" in run.stdout, run.describe()
    outputs = tool_outputs(fake)
    assert outputs and MARKER in outputs[-1] and "echo" not in outputs[-1], outputs
    await proxy.close()
    logged = read_rows(db)
    assert [r["status"] for r in logged] == [200, 200], logged
    sessions = {r["session"] for r in logged}
    assert len(sessions) == 1 and next(iter(sessions)).startswith("ses_"), logged
    assert {r["endpoint"] for r in logged} == {"/v1/chat/completions"}
    assert logged[1]["miss_cause"] == "new_content_only", logged[1]
    assert logged[1]["exact_prefix_tokens"] > 0
