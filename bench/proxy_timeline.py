"""Where a warm irminsul-mode turn's time goes inside the proxy, step by step.

    python bench/proxy_timeline.py [--turns 40] [--tokens 32768] [--grow]

The proxy app runs in this process (create_app, a real aiohttp server on 127.0.0.1) in front
of the fake SGLang in irminsul mode (its own process, as in bench/proxy_overhead.py); the
steps of proxy/handlers.py's request path are wrapped with timers: reading and parsing the
body, the session key, the shape check, the prompt source, waiting for the pipeline thread's
prepare (tokenize + chunk + keys + annotation: the part irminsul mode must finish before it
forwards), encoding the forwarded body, the upstream call until its headers (the fake's own
work included: it parses, checks and echoes the annotation), and reading and rewriting the
answer. Non-streamed warm turns (the conversation once unmeasured, then only its last
message new; with --grow, each turn the last one plus an answer and a question), one at a
time, each after the previous one's background analysis.
bench/proxy_overhead.py gives the end-to-end added latency; this says where it comes from.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_overhead as po

from irminsul.proxy import handlers
from irminsul.proxy.app import create_app
from irminsul.proxy.config import ProxyConfig

STEPS: dict[str, float] = {}  # this request's step -> seconds
ROWS: list[dict[str, float]] = []


def timed_async(name: str, fn):
    async def wrapped(*a, **kw):
        t0 = time.perf_counter()
        try:
            return await fn(*a, **kw)
        finally:
            STEPS[name] = STEPS.get(name, 0.0) + time.perf_counter() - t0
    return wrapped


def timed_sync(name: str, fn):
    def wrapped(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            STEPS[name] = STEPS.get(name, 0.0) + time.perf_counter() - t0
    return wrapped


def instrument() -> None:
    h = handlers
    h.read_json = timed_async("read + parse body", h.read_json)
    h.session_key = timed_sync("session key", h.session_key)
    h.shapes.check = timed_sync("shape check", h.shapes.check)
    h.shapes.prompt_source = timed_sync("prompt source", h.shapes.prompt_source)
    awaited = timed_async("prepare (awaited)", h.analyze_quietly)

    async def prepare(fut):
        prep = await awaited(fut)
        if prep is not None:  # the pipeline thread's own time; the rest is the thread hop
            STEPS["prepare (thread's own)"] = prep.seconds
        return prep

    h.analyze_quietly = prepare
    h._encode = timed_sync("encode forwarded body", h._encode)
    h._whole = timed_async("read + rewrite answer", h._whole)
    call = h.upstream_call

    @contextlib.asynccontextmanager
    async def upstream_call(*a, **kw):
        t0 = time.perf_counter()
        async with call(*a, **kw) as resp:
            STEPS["upstream, to headers"] = time.perf_counter() - t0
            yield resp

    h.upstream_call = upstream_call
    serve = h._serve

    async def whole_request(*a, **kw):
        STEPS.clear()
        t0 = time.perf_counter()
        try:
            return await serve(*a, **kw)
        finally:
            STEPS["handler total"] = time.perf_counter() - t0
            ROWS.append(dict(STEPS))

    h._serve = whole_request


async def run(turns: int, tokens: int, grow: bool) -> None:
    from irminsul.chunking.tokenizer import ModelTokenizer

    tok = ModelTokenizer.from_dir(po.TINY)
    base = po.conversation(tok, 0, tokens)
    warm = po.warm_turns(base, turns, grow)
    fport = po.free_port()
    fake = mp.get_context("spawn").Process(target=po.run_fake, args=(fport, True), daemon=True)
    fake.start()
    runner = None
    try:
        await po.wait_ready(f"http://127.0.0.1:{fport}")
        app = create_app(ProxyConfig(upstream=f"127.0.0.1:{fport}", tokenizer=str(po.TINY),
                                     db=None))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        async with aiohttp.ClientSession() as http:
            await po.timed(http, url, {"model": "m", "messages": base, "max_tokens": 4}, False)
            await asyncio.sleep(1.0)  # the cold turn's background analysis
            ROWS.clear()
            for msgs in warm:
                await po.timed(http, url, {"model": "m", "messages": msgs, "max_tokens": 4},
                               False)
                await asyncio.sleep(0.15)  # its analysis, off the measured path
    finally:
        if runner is not None:
            await runner.cleanup()
        fake.terminate()
        fake.join()
    print(f"# {len(ROWS)} warm irminsul-mode turns, {len(tok.encode_chat(base).ids)}-token "
          f"conversation; per step over the turns (ms)")
    for step in ROWS[0]:
        v = [r.get(step, 0.0) * 1e3 for r in ROWS]
        print(f"{step:24s} p50 {statistics.median(v):7.3f}  mean {statistics.mean(v):7.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--grow", action="store_true",
                    help="each warm turn is the last plus an answer and a question (as "
                         "bench/proxy_overhead.py --grow)")
    a = ap.parse_args()
    instrument()
    asyncio.run(run(a.turns, a.tokens, a.grow))


if __name__ == "__main__":
    main()
