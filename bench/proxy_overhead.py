"""Latency the proxy adds, against calling the (fake) upstream directly.

A 32K-token agentic conversation (system prompt, tool schemas, turns of code reads and tool
results; token count measured with the shipped tiny tokenizer) is sent non-streamed (request
latency) and streamed (time to first content) to the fake SGLang, once directly and once
through the proxy, alternating, so drift hits both alike. Two kinds of turn:

- cold: a conversation never seen (new session, new content): the proxy tokenizes all of it;
- warm: the same conversation with only its last (user) message new, as agents resend it: the
  tokenizer's span cache makes the proxy's tokenizing proportional to the new message. With
  --grow, each warm turn is the previous one plus an assistant answer and a new user message
  (a conversation that grows as an agent's does, and has more messages every turn).

The fake upstream, the proxy and this client run as three processes. Printed: p50/p95 of each
path, the added latency and the ratio proxied/direct, for stock mode (the analysis starts once
the answer is sent, off the critical path) and irminsul mode (tokenizing and chunking must
finish before the request goes, with its annotation; in that mode the fake engine also parses
and checks the annotation and echoes it in its answer, work a direct call does not cause,
which is counted as overhead).

The machine's other load moves every figure: run it more than once and compare runs taken
back to back (the direct column shows how loaded the machine was).

    python bench/proxy_overhead.py [--tokens 32768] [--iters 30] [--modes stock,irminsul] [--grow]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import socket
import statistics
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "models" / "tiny-mla"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profiled(fn, path: str | None):
    """Run fn() under cProfile when ``path`` is set, dumping the stats there when it returns
    (the servers return on SIGTERM: aiohttp's run_app exits gracefully)."""
    if path is None:
        return fn()
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        return fn()
    finally:
        prof.disable()
        prof.dump_stats(path)


def run_fake(port: int, irminsul: bool, profile: str | None = None) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from aiohttp import web
    from support.fake_sglang import FakeSGLang

    fake = FakeSGLang(irminsul=irminsul)  # byte-level accounting: cheap, same for both paths
    profiled(lambda: web.run_app(fake.app(), host="127.0.0.1", port=port, print=None,
                                 access_log=None, handler_cancellation=True), profile)


def run_proxy(port: int, upstream: int, profile: str | None = None) -> None:
    import logging

    from irminsul.proxy.app import run_proxy as serve
    from irminsul.proxy.config import ProxyConfig

    logging.basicConfig(level=logging.WARNING)
    profiled(lambda: serve(ProxyConfig(upstream=f"127.0.0.1:{upstream}", port=port,
                                       tokenizer=str(TINY), db=None)), profile)


def print_profile(path: Path, title: str, rows: int = 25) -> None:
    """The functions with the most cumulative time in one server's profile."""
    import pstats

    print(f"\n# {title}: cProfile of the whole run (cold and warm turns, both metrics; "
          f"cProfile inflates Python-heavy code), top {rows} by cumulative time")
    stats = pstats.Stats(str(path))
    stats.sort_stats("cumulative").print_stats(rows)


def conversation(tok, seed: int, tokens: int) -> list[dict]:
    """A coding-agent conversation of about ``tokens`` tokens (measured)."""
    from irminsul.proxy import trace_content as tc

    rng = random.Random(seed)
    tools = tc.tool_schemas(rng, 8, 120)
    system = (f"You are a coding agent (session {seed}).\n\n" + tc.prose(rng, 600)
              + "\n\n" + tc.tools_markdown(tools))
    msgs = [{"role": "system", "content": system}]
    while len(tok.encode_chat(msgs).ids) < tokens:
        path, first, code = tc.code_excerpt(rng, 700)
        msgs += [{"role": "user", "content": f"Read {path.name} and explain it."},
                 {"role": "assistant", "content": f"Reading {path.name}."},
                 {"role": "user", "content": tc.numbered(code, first)},
                 {"role": "assistant", "content": tc.prose(rng, 80)}]
    msgs.append({"role": "user", "content": "What should we change first?"})
    return msgs


def warm_turns(base: list[dict], count: int, grow: bool) -> list[list[dict]]:
    """Warm turns of ``base``: its last message replaced each time, or (``grow``) the turn
    before plus an assistant answer and a new user message."""
    if not grow:
        return [base[:-1] + [{"role": "user", "content": f"Now do step {i + 1} of the plan."}]
                for i in range(count)]
    out, msgs = [], base
    for i in range(count):
        msgs = msgs + [{"role": "assistant", "content": f"Step {i} is done: the tests pass."},
                       {"role": "user", "content": f"Now do step {i + 1} of the plan."}]
        out.append(msgs)
    return out


async def timed(http: aiohttp.ClientSession, url: str, body: dict, stream: bool) -> float:
    """Seconds to the whole answer (non-streamed) or to the first content chunk (streamed)."""
    t0 = time.perf_counter()
    async with http.post(url + "/v1/chat/completions", json={**body, "stream": stream}) as r:
        r.raise_for_status()
        if not stream:
            await r.read()
            return time.perf_counter() - t0
        first = None
        async for line in r.content:
            if first is None and line.startswith(b"data: ") and b'"content": "H' in line:
                first = time.perf_counter() - t0
        return first


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            try:
                async with http.get(url + "/v1/models") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


async def analysed(http: aiohttp.ClientSession, proxy: str) -> int:
    """How many prompts the proxy has finished analysing (from its /metrics)."""
    async with http.get(proxy + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("irminsul_proxy_analysis_seconds_count"):
                return int(float(line.split(" ")[1]))
    return 0


async def wait_analysed(http: aiohttp.ClientSession, proxy: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while (seen := await analysed(http, proxy)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the proxy analysed {seen} prompts, expected {count}")
        await asyncio.sleep(0.002)


async def measure(direct: str, proxy: str, cold: list[list], warm: list[list], stream: bool):
    """Alternate direct and proxied calls. After each proxied call, wait (polling /metrics)
    until the proxy's background analysis of it is done, so it never overlaps the next
    sample of either path: the figures are the latency a lone agent sees."""
    out = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        done = await analysed(http, proxy)
        for kind, bodies in (("cold", cold), ("warm", warm)):
            d, p = [], []
            if kind == "warm":  # the conversation once through both, unmeasured: now it is warm
                for url in (direct, proxy):
                    await timed(http, url, {"model": "m", "messages": warm[0], "max_tokens": 4},
                                stream)
                done += 1
                await wait_analysed(http, proxy, done)
            for i, msgs in enumerate(bodies):
                body = {"model": "m", "messages": msgs, "max_tokens": 4}
                order = ((direct, d), (proxy, p)) if i % 2 else ((proxy, p), (direct, d))
                for url, acc in order:
                    acc.append(await timed(http, url, body, stream))
                    if url == proxy:
                        done += 1
                        await wait_analysed(http, proxy, done)
            out[kind] = (d, p)
    return out


def report(mode: str, metric: str, results: dict) -> None:
    for kind, (d, p) in results.items():
        d50, d95, p50, p95 = (pct(x, q) * 1e3 for x in (d, p) for q in (50, 95))
        print(f"{mode:9s} {metric:8s} {kind:5s} direct p50 {d50:7.2f} p95 {d95:7.2f} ms | proxy"
              f" p50 {p50:7.2f} p95 {p95:7.2f} ms | added p50 {p50 - d50:+7.2f} p95"
              f" {p95 - d95:+7.2f} ms | ratio p50 {p50 / d50:5.2f}x p95 {p95 / d95:5.2f}x")


async def analysis_seconds(proxy: str) -> tuple[float, int]:
    async with aiohttp.ClientSession() as http, http.get(proxy + "/metrics") as r:
        text = await r.text()
    vals = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines()
            if ln.startswith("irminsul_proxy_analysis_seconds_")}
    n = int(vals.get("irminsul_proxy_analysis_seconds_count", 0))
    return vals.get("irminsul_proxy_analysis_seconds_sum", 0.0) / max(n, 1), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--iters", type=int, default=30, help="requests per path and turn kind")
    ap.add_argument("--modes", default="stock,irminsul")
    ap.add_argument("--grow", action="store_true",
                    help="warm turns append an answer and a question instead of replacing the "
                         "last message")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="run the proxy and the fake upstream under cProfile, write "
                         "DIR/MODE-proxy.prof and DIR/MODE-fake.prof and print the top "
                         "functions (the timings then include the profiler's overhead)")
    args = ap.parse_args()
    from irminsul.chunking.tokenizer import ModelTokenizer

    tok = ModelTokenizer.from_dir(TINY)
    t0 = time.perf_counter()
    base = conversation(tok, 0, args.tokens)
    n_tokens = len(tok.encode_chat(base).ids)
    # a separate cold set per metric and mode: a conversation the proxy saw once is warm in
    # its tokenizer's span cache
    modes = args.modes.split(",")
    colds = [[conversation(tok, 1000 * (k + 1) + i, args.tokens) for i in range(args.iters)]
             for k in range(2 * len(modes))]
    warm = warm_turns(base, args.iters, args.grow)
    size = len(json.dumps(base)) / 1024
    print(f"conversation: {n_tokens} tokens, {len(base)} messages, {size:.0f} KiB JSON "
          f"(built in {time.perf_counter() - t0:.1f} s); {args.iters} requests per cell")
    ctx = mp.get_context("spawn")
    for m, mode in enumerate(modes):
        fport, pport = free_port(), free_port()
        prof = {}
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            prof = {k: str(args.profile / f"{mode}-{k}.prof") for k in ("proxy", "fake")}
        procs = [ctx.Process(target=run_fake, args=(fport, mode == "irminsul", prof.get("fake")),
                             daemon=True),
                 ctx.Process(target=run_proxy, args=(pport, fport, prof.get("proxy")),
                             daemon=True)]
        procs[0].start()
        direct, proxy = f"http://127.0.0.1:{fport}", f"http://127.0.0.1:{pport}"
        asyncio.run(wait_ready(direct))
        procs[1].start()
        try:
            asyncio.run(wait_ready(proxy))
            for k, (stream, metric) in enumerate(((False, "latency"), (True, "ttft"))):
                results = asyncio.run(measure(direct, proxy, colds[2 * m + k], warm, stream))
                report(mode, metric, results)
                sys.stdout.flush()
            mean, n = asyncio.run(analysis_seconds(proxy))
            print(f"{mode:9s} proxy prompt analysis (tokenize+chunk+divergence): mean "
                  f"{mean * 1e3:.2f} ms over {n} requests (cold and warm mixed)")
        finally:
            for p in procs:
                p.terminate()
                p.join()
        for k, path in prof.items():
            print_profile(Path(path), f"{mode} mode, {k}")


if __name__ == "__main__":
    main()
