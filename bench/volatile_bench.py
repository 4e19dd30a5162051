"""The volatile-line scan of a new system prompt (session key, --reorder): the pattern line by
line against reorder.is_volatile, which answers the same with cheap pre-checks.

    python bench/volatile_bench.py [--reps 50]

The system prompt is bench/proxy_overhead.py's (prose, then the tool schemas as markdown).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_overhead as po

from irminsul.chunking.tokenizer import ModelTokenizer
from irminsul.proxy.reorder import VOLATILE_LINE, is_volatile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    tok = ModelTokenizer.from_dir(po.TINY)
    lines = po.conversation(tok, 5, 32768)[0]["content"].splitlines()
    chars = sum(len(ln) + 1 for ln in lines)
    out = {}
    for name, fn in (("pattern", lambda ln: VOLATILE_LINE.search(ln) is not None),
                     ("is_volatile", is_volatile)):
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            flags = [fn(ln) for ln in lines]
            times.append(time.perf_counter() - t0)
        out[name] = (statistics.median(times), flags)
    assert out["pattern"][1] == out["is_volatile"][1]
    p, f = out["pattern"][0], out["is_volatile"][0]
    print(f"system prompt {chars} chars, {len(lines)} lines, {sum(out['pattern'][1])} volatile; "
          f"median of {a.reps}: pattern {p * 1e3:.2f} ms, is_volatile {f * 1e3:.2f} ms "
          f"({p / f:.1f}x)")


if __name__ == "__main__":
    main()
