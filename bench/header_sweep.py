"""Header sweep (the paper's Figure 4): prompt tokens served from cache vs the length of a
header rebuilt every turn at the top of the system prompt, exact prefix vs pic.

    python bench/header_sweep.py [--sessions 4] [--turns 6] [--plot out.png]

For each header length (50, 250, 1000, 2000 tokens-ish) a header-family trace is generated
(proxy/traces.py) and analysed offline with the shipped tiny tokenizer and the default
chunker: ``prefix`` is what an exact-prefix cache shared by all sessions serves; ``pic`` is
what the embedded engine's pic policy serves (proxy/oracle_causes.py models its plan: chunk
hits, the first k=16 tokens of each run recomputed, its prefix trie), i.e. exact prefix +
recovered; ``oracle`` is exact prefix + every token in a run of >= 16 tokens seen before.
The model matches bench/replay_bench.py's engine runs token for token on the committed
samples (see bench/results/2026-11-23-cpu-recovery.txt section 5b and the replay table).
Shares are of all prompt tokens of the trace, turn 0 of every session included.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.keys import Chunker
from irminsul.chunking.tokenizer import ModelTokenizer
from irminsul.proxy.oracle import OracleConfig, summarize, trace_items
from irminsul.proxy.oracle_causes import add_causes, analyze_causes
from irminsul.proxy.traces import TraceConfig, generate

TINY = Path(__file__).resolve().parent.parent / "examples" / "models" / "tiny-mla"
HEADERS = (50, 250, 1000, 2000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pic-k", type=int, default=16)
    ap.add_argument("--plot", type=Path, help="draw the sweep (needs matplotlib)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    tok = ModelTokenizer.from_dir(TINY)
    chunker = Chunker(ChunkerConfig())
    oracle = OracleConfig(prefix_scope="global", carve_tokens=a.pic_k)
    print(f"header family, {a.sessions} sessions x {a.turns} turns, seed {a.seed}; tokenizer "
          f"{tok.name}; chunker {chunker.config}; pic k={a.pic_k}. Shares of all prompt tokens.")
    print(" header tokens-ish | header tokens | prompt tokens/req | prefix |    pic | oracle"
          " | pic of oracle beyond prefix")
    points = []
    for n in HEADERS:
        cfg = TraceConfig.preset("header", sessions=a.sessions, turns=a.turns, seed=a.seed,
                                 header_tokens=n)
        reqs = generate(cfg)
        env = re.search(r"<env>.*?</env>", reqs[0].body["messages"][0]["content"], re.DOTALL)
        rows = analyze_causes(trace_items(reqs, tok), chunker, oracle)
        s, c = summarize(r for r, _ in rows), add_causes(c for _, c in rows)
        prefix = s.exact_prefix_tokens / s.prompt_tokens
        pic = (s.exact_prefix_tokens + c.recovered) / s.prompt_tokens
        orc = (s.exact_prefix_tokens + s.oracle) / s.prompt_tokens
        points.append((n, prefix, pic, orc))
        print(f"{n:>18} | {len(tok.encode(env[0])):>13} | {s.prompt_tokens / s.requests:>17.0f}"
              f" | {100 * prefix:5.1f}% | {100 * pic:5.1f}% | {100 * orc:5.1f}% | "
              f"{100 * c.recovered / max(1, s.oracle):5.1f}%")
    print(f"({time.perf_counter() - t0:.1f} s)")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [p[0] for p in points]
        for k, label in ((1, "exact prefix"), (2, "pic (Irminsul)"), (3, "oracle")):
            ax.plot(xs, [100 * p[k] for p in points], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("varying header length (tokens-ish)")
        ax.set_ylabel("prompt tokens served from cache (%)")
        ax.set_ylim(0, 100)
        ax.legend()
        ax.set_title("Header sweep (tiny tokenizer, offline plan model)")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
