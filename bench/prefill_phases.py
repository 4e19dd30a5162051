"""Where a reuse prefill spends its time: chunking, planning, placement, model, storing.

Usage: python bench/prefill_phases.py [--device cuda --preset v2-lite --layers 12]
                                      [--tokens 8000] [--policy pic]

Same scenario as ttft.py (a prompt resent with a changed header); each phase is timed
with the device synchronised at its edges, so the sum is close to the prefill time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ttft

from irminsul.engine_adapter.embedded import engine as engine_mod
from irminsul.engine_adapter.embedded import prefill as prefill_mod
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.presets import build_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ttft.SHIPPED)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--preset")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--policy", default="pic")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    if a.preset:
        extra = {} if a.layers is None else {"num_hidden_layers": a.layers}
        a.model = build_checkpoint(a.preset, tempfile.mkdtemp(prefix="phases-"), seed=0,
                                   tokenizer_dir=ttft.SHIPPED, dtype="bfloat16",
                                   device=a.device, init_in_dtype=a.device == "cuda",
                                   **extra)
    eng = engine_mod.Engine(EngineConfig(model_dir=str(a.model), device=a.device,
                                         max_seq_len=max(32768, 2 * a.tokens)))
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    spent: dict[str, list[float]] = defaultdict(list)

    def timed(owner, name, label):
        inner = getattr(owner, name)

        def call(*args, **kw):
            sync()
            t0 = time.perf_counter()
            out = inner(*args, **kw)
            sync()
            spent[label].append(time.perf_counter() - t0)
            return out

        setattr(owner, name, call)

    timed(eng, "_chunks", "chunk")
    timed(engine_mod, "make_plan", "plan")
    timed(prefill_mod, "materialize", "place")
    timed(eng.runner, "run_layers", "layers")
    timed(eng.runner, "logits", "logits")
    timed(engine_mod, "commit", "store")
    body = ttft.body_tokens(eng, a.tokens)
    warm, warm_anchors = ttft.prompt(eng, "Current time: 2025-06-01 09:00:00\n", body)
    ids, anchors = ttft.prompt(eng, "Current time: 2025-06-01 09:04:31 (session 7)\n", body)
    for policy in ("full", a.policy):
        totals = []
        for rep in range(a.reps + 1):
            eng.flush_cache()
            eng.prefill(warm, anchors=warm_anchors, policy="full")
            spent.clear()
            res = eng.prefill(ids, anchors=anchors, policy=policy)
            if rep:
                totals.append((res.seconds, {k: sum(v) for k, v in spent.items()}))
        med = statistics.median(t for t, _ in totals)
        parts = {k: statistics.median(p[k] for _, p in totals) for k in totals[0][1]}
        print(f"{policy:<7} {len(ids)} tokens, {eng.runner.num_layers} layers on {a.device}: "
              f"prefill {med * 1e3:.1f} ms = "
              + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
