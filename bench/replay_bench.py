"""Replay benchmark: each committed trace through the proxy to the embedded engine, `prefix`
against `pic`, side by side in one run.

    python bench/replay_bench.py [--limit 4] [--max-tokens 4] [--traces header,rag,...]

Two proxies run in this process, each in embedded mode with its own engine on the shipped
tiny model (examples/models/tiny-mla, CPU): one whose engine's default policy is ``prefix``
(exact-prefix reuse only, the baseline), one with ``pic`` (content reuse, the first k=16
tokens of every reused chunk recomputed). For every trace in examples/traces/ both engines'
stores are flushed, then the trace is replayed through the prefix proxy (run
``prefix-<trace>``) and through the pic proxy (run ``pic-<trace>``), one session at a time
(concurrency 1, so TTFT is prefill, not queueing), each turn after the previous answer.

Figures, per trace, from `irminsul report --compare`'s maths (proxy/report.py build_report)
over the rows replay wrote, and from the offline oracle (proxy/oracle.py, exact prefix over
all earlier requests of the trace, what the engine's shared trie sees):

- prompt tokens (the engine's count) and the exact-prefix share of the prefix run;
- recovered: what pic serves above the prefix run's exact prefix (pic's exact prefix + reused
  - prefix's exact prefix; recomputed carve-outs not counted) as share of the prompt, of the
  prefix run's misses, and of the oracle (every token in a run of >= 16 tokens seen earlier);
  beside it the offline CDC estimate net of carve-outs, which the engine should match;
- TTFT p50 of both runs and their ratio (prefix / pic; above 1: pic is faster).

On random weights these are speed and reuse figures, not quality ones.

GPU (issue 5: DeepSeek-V2-Lite-shaped random weights, 8K-32K-token prompts)::

    python bench/replay_bench.py --preset v2-lite --device cuda --one-engine --generate \
        header,reorder,toolloop,subagent,rag --sessions 2 --turns 3 --scale 1.5 --limit 0 \
        --cache-bytes 16G

(prompts of 6K-25K tokens with the shipped tokenizer, ~650K prompt tokens per policy)

``--preset`` builds a random checkpoint of that engine preset at start (the shipped model's
tokenizer), ``--one-engine`` runs one engine and sets the policy per request
(``irminsul_policy``; flushed between runs, so each run starts cold as with two engines),
``--generate`` replays freshly generated traces of the families at their preset sizes
(proxy/traces.py) instead of the committed samples. ``--smoke`` is the same path on CPU at
toy sizes (tiny-mla preset, 1 session x 2 turns, sizes / 8).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import aiohttp
import torch
import transformers
from aiohttp import web

from irminsul.chunking.keys import Chunker
from irminsul.chunking.tokenizer import ModelTokenizer
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.presets import build_checkpoint
from irminsul.engine_adapter.embedded.proxy_upstream import embedded_upstream_ctx
from irminsul.proxy.app import create_app
from irminsul.proxy.config import ProxyConfig
from irminsul.proxy.oracle import OracleConfig, Summary, analyze, summarize, trace_items
from irminsul.proxy.replay import ReplayConfig, replay_to_db
from irminsul.proxy.report import build_report
from irminsul.proxy.report_model import FamilyComparison, RunSide, percentiles
from irminsul.proxy.trace_io import load_trace
from irminsul.proxy.traces import TraceConfig, TraceRequest, generate

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "models" / "tiny-mla"
TRACES = REPO / "examples" / "traces"
POLICIES = ("prefix", "pic")
WARMUP = {"model": "m", "messages": [{"role": "user", "content": "Warm up. " * 1000}],
          "max_tokens": 2, "temperature": 0}


class Row(NamedTuple):
    trace: str
    cmp: FamilyComparison  # run A = prefix, run B = pic, every family of the trace together
    oracle: Summary


def pct(num: float, den: float) -> str:
    return f"{100 * num / den:5.1f}%" if den else "    -"


def ms(x: float | None) -> str:
    return f"{x:7.0f}" if x is not None else "      -"


# --generate: size fields of TraceConfig scaled by --scale (tokens-ish)
SIZES = ("tool_tokens", "doc_tokens", "skill_tokens", "memory_tokens", "tool_desc_tokens",
         "context_budget", "header_tokens")


def engine_config(a, policy: str) -> EngineConfig:
    return EngineConfig(model_dir=str(a.model_dir), device=a.device, dtype=a.dtype,
                        policy=policy, pic_k=a.pic_k, cache_bytes=a.cache_bytes)


async def start_proxy(policy: str, a) -> tuple[web.AppRunner, str]:
    """A proxy in embedded mode whose engine defaults to ``policy``; returns (runner, URL)."""
    config = ProxyConfig(model_dir=str(a.model_dir), db=None, port=0)
    engine = engine_config(a, policy)
    app = create_app(config, upstream_ctx=embedded_upstream_ctx(config, engine_config=engine))
    runner = web.AppRunner(app)
    await runner.setup()  # starts the engine (cleanup ctx) and probes it
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def post(http: aiohttp.ClientSession, url: str, **kw) -> None:
    async with http.post(url, **kw) as resp:
        if resp.status != 200:
            raise SystemExit(f"{url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        await resp.read()


def with_policy(requests: list[TraceRequest], policy: str, pic_k: int) -> list[TraceRequest]:
    """--one-engine: the policy named in every request body (the engine's per-request field)."""
    extra = {"irminsul_policy": policy}
    if policy == "pic":
        extra["irminsul_policy_args"] = {"k": pic_k}
    return [r._replace(body={**r.body, **extra}) for r in requests]


async def replay_all(traces: list[tuple[str, list[TraceRequest]]], db: Path, a) -> None:
    urls, runners = {}, []
    try:
        for policy in POLICIES[-1:] if a.one_engine else POLICIES:
            runner, urls[policy] = await start_proxy(policy, a)
            runners.append(runner)
        if a.one_engine:
            urls = dict.fromkeys(POLICIES, urls[POLICIES[-1]])
        async with aiohttp.ClientSession() as http:
            for url in set(urls.values()):  # first-call costs (allocator, threads) out of runs
                await post(http, url + "/v1/chat/completions", json=WARMUP)
            for name, requests in traces:
                for policy, url in urls.items():  # alternating, so drift hits both alike
                    await post(http, url + "/flush_cache")  # the proxy relays it to the engine
                    sent = with_policy(requests, policy, a.pic_k) if a.one_engine else requests
                    t0 = time.perf_counter()
                    s = await replay_to_db(sent, ReplayConfig(
                        url, f"{policy}-{name}", concurrency=1, max_tokens=a.max_tokens,
                        timeout_s=a.timeout), db)
                    print(f"  {policy:>6}-{name:<9} {s.requests} requests, {s.failed} "
                          f"failed, {time.perf_counter() - t0:5.1f} s ({s.upstream_mode})",
                          flush=True)
                    if s.failed:
                        raise SystemExit(f"{s.failed} requests of {name} failed; see {db}")
    finally:
        for runner in runners:
            await runner.cleanup()


def oracle_summary(requests: list[TraceRequest], tok: ModelTokenizer, a) -> Summary:
    items = trace_items(requests, tok)
    return summarize(analyze(items, Chunker(engine_config(a, "pic").chunker),
                             OracleConfig(prefix_scope="global", carve_tokens=a.pic_k)))


def load_traces(a) -> list[tuple[str, list[TraceRequest]]]:
    """(name, requests) of the committed samples, or of freshly generated traces."""
    if not a.generate:
        out = []
        for name in a.traces.split(","):
            path = TRACES / f"{name}.jsonl"
            if not path.is_file():
                raise SystemExit(f"no trace {path}")
            out.append((name, load_trace(path, limit=a.limit)))
        return out
    out = []
    for fam in a.generate.split(","):
        base = TraceConfig.preset(fam)
        sizes = {f: max(1, round(getattr(base, f) * a.scale)) for f in SIZES
                 if getattr(base, f) > 0}
        cfg = TraceConfig.preset(fam, sessions=a.sessions, turns=a.turns, seed=a.seed,
                                 **sizes, **a.overrides)
        requests = generate(cfg)
        out.append((fam, requests[: a.limit] if a.limit else requests))
    return out


HEAD = ("trace     | reqs | prompt |  exact | recovered: of prompt  of misses  of oracle |"
        " offline: exact  CDC net  oracle | TTFT p50 ms: prefix     pic  ratio")


def table(rows: list[Row]) -> str:
    """One line per trace; the column groups are explained in the legend main() prints."""
    lines = [HEAD]
    for r in rows:
        a, b, o = r.cmp.a, r.cmp.b, r.oracle
        rec = r.cmp.recovered_tokens
        misses = a.prompt_tokens - a.exact_prefix_tokens
        ratio = r.cmp.ttft_ratios()[0]
        lines.append(
            f"{r.trace:<9} | {a.requests:>4} | {a.prompt_tokens:>6} | "
            f"{pct(a.exact_prefix_tokens, a.prompt_tokens)} | {pct(rec, a.prompt_tokens):>20}"
            f"  {pct(rec, misses):>9}  {pct(rec, o.oracle):>9} | "
            f"{pct(o.exact_prefix_tokens, o.prompt_tokens):>15}  {pct(o.content_net, o.misses):>7}"
            f"  {pct(o.oracle, o.misses):>6} | {ms(a.ttft.p50):>19} {ms(b.ttft.p50)} "
            + (f"{ratio:5.2f}x" if ratio else "     -"))
    return "\n".join(lines)


def pooled(db: Path, cmps: list[FamilyComparison], names: list[str]) -> FamilyComparison:
    """All traces together: token sums of both sides, TTFT percentiles over every request."""
    sides = []
    with sqlite3.connect(db) as conn:
        for policy, side in zip(POLICIES, ("a", "b")):
            runs = [f"{policy}-{name}" for name in names]
            ttft = [t for (t,) in conn.execute(
                f"SELECT ttft_ms FROM requests WHERE ttft_ms IS NOT NULL AND run IN"
                f" ({','.join('?' * len(runs))})", runs)]
            parts = [getattr(c, side) for c in cmps]
            sides.append(RunSide(*(sum(s[i] for s in parts) for i in range(5)),
                                 percentiles(ttft)))
    return FamilyComparison("all", *sides)


def sum_oracle(sums: list[Summary]) -> Summary:
    return Summary(*(sum(getattr(s, f) for s in sums) for f in Summary._fields))


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t[-1:] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes such as 512M or 16G") \
            from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default=",".join(p.stem for p in sorted(TRACES.glob("*.jsonl"))),
                    help="comma-separated trace names in examples/traces/")
    ap.add_argument("--limit", type=int, default=4,
                    help="replay only the first N requests of each trace (0: all); the default"
                         " keeps the run under 5 minutes on 2 CPU cores")
    ap.add_argument("--max-tokens", type=int, default=4, help="generation limit per request")
    ap.add_argument("--pic-k", type=int, default=16, help="pic: tokens recomputed per chunk")
    ap.add_argument("--db", type=Path, default=None,
                    help="savings database to write (default: a temporary file)")
    ap.add_argument("--model-dir", type=Path, default=TINY, help="the engine's checkpoint")
    ap.add_argument("--preset", help="build a random-weight checkpoint of this engine preset "
                                     "(e.g. v2-lite) at start, with the shipped tokenizer")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    ap.add_argument("--cache-bytes", type=parse_bytes, default=1 << 30,
                    help="the engine's KV store budget (e.g. 16G for V2-Lite at 32K tokens)")
    ap.add_argument("--one-engine", action="store_true",
                    help="one engine, policy set per request: one copy of the weights")
    ap.add_argument("--generate", metavar="FAMILIES",
                    help="replay freshly generated traces of these families instead")
    ap.add_argument("--sessions", type=int, default=2, help="--generate: sessions per family")
    ap.add_argument("--turns", type=int, default=3, help="--generate: turns per session")
    ap.add_argument("--seed", type=int, default=0, help="--generate: trace seed")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="--generate: multiply the presets' content sizes")
    ap.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    ap.add_argument("--smoke", action="store_true",
                    help="the --preset/--one-engine/--generate path on CPU at toy sizes")
    a = ap.parse_args()
    a.overrides = {}
    if a.smoke:  # prose comes in whole docstring paragraphs: fewer tools and skills, too
        a.preset, a.device, a.one_engine = a.preset or "tiny-mla", "cpu", True
        a.generate = a.generate or "header,reorder,toolloop,subagent,rag"
        a.sessions, a.turns, a.scale, a.limit = 1, 2, 0.125, 0
        a.overrides = {"tools": 2, "skills": 1, "subagents": 1, "subagent_turns": 1}
    a.limit = a.limit or None
    transformers.utils.logging.disable_progress_bar()  # the engines' weight-loading bars
    traces = load_traces(a)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as tmp:
        if a.preset:
            dtype = a.dtype if a.dtype != "auto" else (
                "bfloat16" if a.device == "cuda" else "float32")
            a.model_dir = build_checkpoint(a.preset, Path(tmp) / a.preset, seed=0,
                                           tokenizer_dir=TINY, dtype=dtype, device=a.device,
                                           init_in_dtype=True)
            print(f"built {a.preset} ({dtype}, {a.device}) in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        gpu = (torch.cuda.get_device_name() if a.device == "cuda" and torch.cuda.is_available()
               else f"CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
                    f"{platform.machine()})")
        print(f"{Path(a.model_dir).name} on {gpu}, torch {torch.__version__}; max_tokens "
              f"{a.max_tokens}, pic k={a.pic_k}, limit {a.limit or 'none'}, concurrency 1"
              + (", one engine" if a.one_engine else ""), flush=True)
        tok = ModelTokenizer.from_dir(a.model_dir)
        for name, requests in traces:
            lens = [len(it.ids) for it in trace_items(requests, tok)]
            print(f"  {name}: {len(requests)} requests, prompts {min(lens)}-{max(lens)} tokens",
                  flush=True)
        t1 = time.perf_counter()
        db = a.db or Path(tmp) / "bench.db"
        asyncio.run(replay_all(traces, db, a))
        seconds = time.perf_counter() - t1
        rows = []
        for name, requests in traces:
            rep = build_report(db, compare=(f"prefix-{name}", f"pic-{name}"))
            rows.append(Row(name, rep.comparison.total, oracle_summary(requests, tok, a)))
        total = Row("all", pooled(db, [r.cmp for r in rows], [n for n, _ in traces]),
                    sum_oracle([r.oracle for r in rows]))
    for r in rows:
        if not r.cmp.prompts_match or r.cmp.a.prompt_tokens != r.oracle.prompt_tokens:
            print(f"note: {r.trace}: prompt tokens differ (prefix run {r.cmp.a.prompt_tokens}, "
                  f"pic run {r.cmp.b.prompt_tokens}, offline {r.oracle.prompt_tokens})")
        if r.cmp.a.counted != r.cmp.a.requests or r.cmp.b.counted != r.cmp.b.requests:
            print(f"note: {r.trace}: some requests reported no token split")
    print(f"""
replayed in {seconds:.0f} s. Shares are token-weighted sums over each trace's requests.
prompt: the engine's prompt tokens (prefix run); exact: prefix run's exact-prefix share of them.
recovered: pic run's exact prefix + reused - prefix run's exact prefix (recomputed carve-outs
  not counted), as share of the prompt, of the prefix run's misses (prompt - exact prefix) and
  of the oracle (offline: tokens beyond the exact prefix in a run of >= 16 tokens seen earlier
  in the trace). offline: the same trace analysed without the engine (proxy/oracle.py): its
  exact-prefix share of the prompt, its estimate of pic's recovery (first {a.pic_k} tokens of
  each reused chunk carved out) and the oracle, both as shares of its own misses.
TTFT ratio: prefix p50 / pic p50 (above 1: pic is faster).
""")
    print(table([*rows, total]))


if __name__ == "__main__":
    main()
