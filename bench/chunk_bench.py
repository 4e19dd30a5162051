"""Chunker throughput: tokens/s of cut_spans, chunk_keys and Chunker.split on random prompts.

    python bench/chunk_bench.py [--runs 31] [--sizes 8192,32768,131072]

Prints, per prompt size, the median over --runs timed calls (each call timed alone, after one
warm-up), and each figure's ratio to the 50 M tokens/s target. Random tokens over a
130K vocabulary, as DeepSeek-V3's; the chunk count (without anchors) is printed so the
per-chunk cost is visible. ``split+anc`` adds an anchor every 1024 tokens, as message starts.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from irminsul.chunking.cdc import cut_spans
from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.keys import Chunker, chunk_keys

TARGET = 50e6  # tokens/s
VOCAB = 129_280


def _median_seconds(fn, runs: int) -> float:
    fn()  # warm-up: first-call imports and allocations are not the steady state
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _stages(chunker: Chunker, ids: np.ndarray, spans) -> dict:
    n, fp = len(ids), "f" * 32
    return {
        "cut_spans": lambda: cut_spans(ids, chunker.config),
        "keys": lambda: chunk_keys(ids, spans, namespace="bench", model_fingerprint=fp),
        "split": lambda: chunker.split(ids, namespace="bench", model_fingerprint=fp),
        # one anchor (a message start) every 1024 tokens: more, shorter segment-end chunks
        "split+anc": lambda: chunker.split(
            ids, anchors=range(1024, n, 1024), namespace="bench", model_fingerprint=fp
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=31)
    ap.add_argument("--sizes", default="8192,32768,131072")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = ChunkerConfig()
    chunker = Chunker(config)
    rng = np.random.default_rng(args.seed)
    print(f"config {config.to_json()}  median of {args.runs} runs  target {TARGET / 1e6:.0f} M/s")
    # on a small shared machine another process on the sibling core can halve every figure
    print("load average (1/5/15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(
        f"{'tokens':>7} {'chunks':>6} {'mean len':>8}  {'stage':<10} {'M tok/s':>8} {'x target':>8}"
    )
    for n in (int(s) for s in args.sizes.split(",")):
        ids = rng.integers(0, VOCAB, n).astype(np.int32)
        spans = cut_spans(ids, config)
        for stage, fn in _stages(chunker, ids, spans).items():
            rate = n / _median_seconds(fn, args.runs)
            print(
                f"{n:>7} {len(spans):>6} {n / len(spans):>8.1f}  {stage:<10} "
                f"{rate / 1e6:>8.1f} {rate / TARGET:>8.2f}"
            )


if __name__ == "__main__":
    main()
