"""Real agent CLIs, second turn: how many of its prompt tokens the cache served, `prefix` vs `pic`.

For each client (Claude Code, opencode; npm-installed into .cache/agents by
tests/support/agents.py) and each engine policy, a fresh proxy with its embedded engine (the
shipped tiny model, replies ended after a few tokens, see ``short_reply_model``) serves one
session of two turns: a first prompt, then the same session resumed with a second prompt.
The figures are the proxy's savings-log counters of the second turn's first request (the one
carrying the new user prompt): its prompt tokens, the exact-prefix hit, the content reused at
a new position (δ-rotated), and served = exact + reused. Token counts are in the tiny model's
tokenizer; the replies are sampled, so turn 1's answer (and so turn 2's prompt) varies a little
between runs.

    python bench/agents_second_turn.py [--clients claude,opencode] [--policies prefix,pic]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sqlite3
import sys
import tempfile
import uuid
from datetime import date
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.agents import (
    PINS,
    claude_argv,
    claude_env,
    install_agents,
    opencode_argv,
    opencode_env,
    run_agent,
    short_reply_model,
)

TIMEOUT_S = 300.0
PROMPTS = ("say hi", "now say bye")


class TurnFigures(NamedTuple):
    client: str
    policy: str
    prompt: int
    exact: int
    reused: int
    recomputed: int
    requests_turn1: int
    requests_turn2: int

    @property
    def served(self) -> int:
        return self.exact + self.reused


async def serve_proxy(workdir: Path, policy: str):
    """Start the proxy + embedded engine on 127.0.0.1 (free port); (runner, url, db)."""
    from aiohttp import web

    from irminsul.engine_adapter.embedded.config import EngineConfig
    from irminsul.engine_adapter.embedded.proxy_upstream import embedded_upstream_ctx
    from irminsul.proxy.app import create_app
    from irminsul.proxy.config import ProxyConfig

    model = short_reply_model(workdir / "model")
    db = workdir / "savings.db"
    cfg = ProxyConfig(model_dir=str(model), db=str(db), port=0)
    engine = EngineConfig(model_dir=str(model), device="cpu", policy=policy)
    app = create_app(cfg, upstream_ctx=embedded_upstream_ctx(cfg, engine_config=engine))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}", db


def row_ids(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM requests ORDER BY id")]


async def measure(client: str, policy: str, install) -> TurnFigures:
    with tempfile.TemporaryDirectory(prefix=f"agents-{client}-{policy}-") as tmp:
        work = Path(tmp)
        runner, url, db = await serve_proxy(work, policy)
        try:
            if client == "claude":
                sid = str(uuid.uuid4())
                env = claude_env(work / "home", url, max_output_tokens=128)
                argvs = [claude_argv(install, PROMPTS[0], sid),
                         claude_argv(install, PROMPTS[1], sid, resume=True)]
            else:
                env = opencode_env(work / "home", url, model="tiny-mla", output_limit=128)
                argvs = [opencode_argv(install, "tiny-mla", PROMPTS[0]),
                         opencode_argv(install, "tiny-mla", PROMPTS[1], cont=True)]
            marks = []
            for argv in argvs:
                run = await run_agent(argv, env, work / "cwd", TIMEOUT_S)
                if run.returncode != 0:
                    raise RuntimeError(f"{client} failed: {run.describe()}")
                from irminsul.proxy.state import STATE_KEY

                st = runner.app[STATE_KEY]
                await st.drain()
                await st.writer.flush()
                marks.append(len(row_ids(db)))
        finally:
            await runner.cleanup()
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY id")]
        turn2 = rows[marks[0]:marks[1]]
        if not turn2:
            raise RuntimeError(f"{client}: no request logged for turn 2")
        if len({r["session"] for r in rows}) != 1:
            raise RuntimeError(f"{client}: turns logged under several sessions")
        first = turn2[0]
        return TurnFigures(client, policy, first["prompt_tokens"], first["exact_prefix_tokens"],
                           first["reused_tokens"], first["recomputed_tokens"], marks[0],
                           marks[1] - marks[0])


async def main_async(clients: list[str], policies: list[str]) -> None:
    install = install_agents()
    print(f"# python bench/agents_second_turn.py — {platform.node() or 'this machine'} "
          f"({platform.machine()}, CPU), {date.today().isoformat()}")
    print("# clients: " + ", ".join(f"{p}@{v}" for p, v in PINS.items())
          + f"; prompts {PROMPTS!r}; engine: embedded, tiny-mla, short replies")
    print(f"{'client':<9} {'policy':<7} {'turn-2 prompt':>13} {'exact':>6} {'reused':>7} "
          f"{'recomp':>7} {'served':>7} {'served %':>9}  requests t1/t2")
    for client in clients:
        for policy in policies:
            f = await measure(client, policy, install)
            print(f"{f.client:<9} {f.policy:<7} {f.prompt:>13} {f.exact:>6} {f.reused:>7} "
                  f"{f.recomputed:>7} {f.served:>7} {100 * f.served / f.prompt:>8.1f}%  "
                  f"{f.requests_turn1}/{f.requests_turn2}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="claude,opencode")
    ap.add_argument("--policies", default="prefix,pic")
    a = ap.parse_args()
    asyncio.run(main_async(a.clients.split(","), a.policies.split(",")))


if __name__ == "__main__":
    main()
