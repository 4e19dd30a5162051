"""Time to first token of the embedded engine on CPU: full vs prefix vs pic vs blend.

Usage: python bench/ttft.py [--model DIR] [--tokens 1500] [--reps 3] [--no-anchors]
       python bench/ttft.py --device cuda --preset v2-lite --layers 4 --tokens 8000

By default the shipped tiny model on CPU; ``--preset`` builds a random-weight checkpoint of
an engine preset first (on the GPU when --device is cuda), e.g. DeepSeek-V2-Lite's shape.

The agent case: a prompt is sent, then resent with a changed header (a timestamp) in front
of the same ~1.5K-token body. Each measurement starts from an empty store warmed with the
first prompt, then times the second prompt (prefill plus the first sampled token). All
figures come from this one run on this machine; ratios are against ``full`` here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import irminsul
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine, SamplingParams
from irminsul.engine_adapter.embedded.presets import build_checkpoint

ROOT = Path(irminsul.__file__).parent
SHIPPED = ROOT / "examples" / "models" / "tiny-mla"
CASES = [("full", {}), ("prefix", {}), ("pic", {"k": 16}), ("pic", {"k": 4}),
         ("blend", {"r": 0.1})]


def body_tokens(engine: Engine, n: int) -> np.ndarray:
    """~n tokens of real text: this repository's own Python sources, in a fixed order."""
    files = sorted(p for d in ("engine_adapter", "chunking", "proxy", "kernels")
                   for p in (ROOT / d).rglob("*.py"))
    text = "".join(p.read_text() for p in files)
    ids = engine.tokenizer.encode(text)
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} tokens of body text available, asked for {n}")
    return ids[:n].astype(np.int32)


def prompt(engine: Engine, header: str, body: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    head = engine.tokenizer.encode(header)
    return np.concatenate([head, body]).astype(np.int32), (0, len(head))


def ttft(engine, ids, anchors, policy, args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = next(iter(engine.generate(ids, SamplingParams(max_new_tokens=1), anchors=anchors,
                                    policy=policy, policy_args=args)))
    return time.perf_counter() - t0, out.counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHIPPED)
    ap.add_argument("--tokens", type=int, default=1500, help="body length in tokens")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per case")
    ap.add_argument("--no-anchors", action="store_true",
                    help="give the chunker no header boundary (content-defined cuts only)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    ap.add_argument("--preset", help="build a random checkpoint of this engine preset")
    ap.add_argument("--layers", type=int, help="with --preset: number of decoder layers")
    a = ap.parse_args()
    if a.preset:
        extra = {} if a.layers is None else {"num_hidden_layers": a.layers}
        a.model = build_checkpoint(a.preset, tempfile.mkdtemp(prefix="ttft-"), seed=0,
                                   tokenizer_dir=SHIPPED, dtype="bfloat16", device=a.device,
                                   init_in_dtype=a.device == "cuda",
                                   **extra)
    engine = Engine(EngineConfig(model_dir=str(a.model), device=a.device, dtype=a.dtype,
                                 max_seq_len=max(32768, 2 * a.tokens)))
    body = body_tokens(engine, a.tokens)
    warm, warm_anchors = prompt(engine, "Current time: 2025-06-01 09:00:00\n", body)
    ids, anchors = prompt(engine, "Current time: 2025-06-01 09:04:31 (session 7)\n", body)
    if a.no_anchors:
        warm_anchors = anchors = ()
    where = (torch.cuda.get_device_name() if a.device == "cuda"
             else f"{torch.get_num_threads()} threads on {os.cpu_count()} CPUs")
    print(f"model {a.preset or a.model.name} ({engine.runner.num_layers} layers, "
          f"{engine.runner.dtype}), {len(ids)}-token prompt, torch {torch.__version__}, "
          f"{where}, {a.reps} reps, anchors {'off' if a.no_anchors else 'on'}")
    reference = engine.prefill(ids, anchors=anchors, policy="full").logits
    times: dict[int, list[float]] = {i: [] for i in range(len(CASES))}
    counts, devs = {}, {}
    for rep in range(a.reps + 1):  # round-robin, so load changes hit every case alike
        for i, (policy, args) in enumerate(CASES):
            engine.flush_cache()
            engine.prefill(warm, anchors=warm_anchors, policy="full")
            t, counts[i] = ttft(engine, ids, anchors, policy, args)
            if rep > 0:  # rep 0 only warms allocator and caches up
                times[i].append(t)
    for i, (policy, args) in enumerate(CASES):
        engine.flush_cache()
        engine.prefill(warm, anchors=warm_anchors, policy="full")
        logits = engine.prefill(ids, anchors=anchors, policy=policy, policy_args=args).logits
        devs[i] = ((logits - reference).abs().max().item(),
                   int(logits.argmax()) == int(reference.argmax()))
    rows = [(policy, args, statistics.median(times[i]), counts[i], *devs[i])
            for i, (policy, args) in enumerate(CASES)]
    base = rows[0][2]
    print(f"{'policy':<12}{'exact':>7}{'reused':>8}{'recomp':>8}{'new':>6}"
          f"{'TTFT ms':>10}{'vs full':>9}{'max|dlogit|':>13}{'argmax=':>9}")
    for policy, args, t, c, dev, same in rows:
        name = policy + ("" if not args else f" {','.join(f'{k}={v}' for k, v in args.items())}")
        print(f"{name:<12}{c.exact_prefix_tokens:>7}{c.reused_tokens:>8}"
              f"{c.recomputed_tokens:>8}{c.new_tokens:>6}{t * 1e3:>10.1f}{base / t:>8.2f}x"
              f"{dev:>13.4f}{same!s:>9}")


if __name__ == "__main__":
    main()
