"""The clip policy's auxiliary model: its forward against the main model's prefill.

Usage: python bench/clip_aux.py [--model DIR] [--aux DIR] [--device cpu|cuda] [--reps 3]
       python bench/clip_aux.py --device cuda --preset irminsul-mla --aux-preset irminsul-aux
       python bench/clip_aux.py --device cuda --aux-device cuda   # the auxiliary model on the GPU

On the quality harness's prompts (quality_workloads.py: needle, agentic, rag; each case's
earlier context warmed into a scratch store with full), per case:

* full:   the main model's prefill of the whole prompt (Prober.run, as the harness times it);
* aux:    the auxiliary forward alone (float32 on --aux-device, default the CPU with torch's
          default threads), min over reps;
* clip:   a clip prefill (r = --r) as the engine runs it: the auxiliary forward starts first
          (on its worker thread when it is on the CPU and the main model on a GPU, else
          before), then chunking, planning, placement and the tokens before the first placed
          one; ``waited`` is how long the prefill then blocked on the auxiliary scores.

``--preset`` / ``--aux-preset`` build random-weight checkpoints of engine presets (timing
depends on shapes, not weights), with the shipped tokenizer; without --aux the aux/ folder of
--model is used, else a random "tiny-aux". All figures come from this one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import irminsul
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine
from irminsul.engine_adapter.embedded.planner import PolicyArgs, make_plan
from irminsul.engine_adapter.embedded.prefill import run_prefill
from irminsul.engine_adapter.embedded.presets import build_checkpoint
from irminsul.engine_adapter.embedded.probe import Prober
from irminsul.engine_adapter.embedded.quality_workloads import WorkloadConfig, build_cases
from irminsul.engine_adapter.embedded.store import ChunkStore

SHIPPED = irminsul.SHIPPED_MODEL_DIR


def clip_prefill(eng: Engine, prober: Prober, store: ChunkStore, prompt, r: float):
    """One clip prefill as Engine._prefill runs it: (seconds, waited, aux seconds, placed)."""
    runner, ids = eng.runner, np.asarray(prompt.ids, dtype=np.int32)
    t0 = time.perf_counter()
    job = eng.clip.start(ids, eng._clip_background)
    plan = make_plan(store, ids, prober._chunks(ids, prompt.anchors), policy="clip",
                     args=PolicyArgs(r=r))
    try:
        run_prefill(runner, plan, len(ids) + 1, job)
    finally:
        store.release(plan.entries)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - t0, job.waited, job.seconds, len(plan.blend_candidates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHIPPED)
    ap.add_argument("--aux", type=Path)
    ap.add_argument("--preset")
    ap.add_argument("--aux-preset")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=120)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--r", type=float, default=0.1)
    ap.add_argument("--aux-device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="clip-aux-"))
    if a.preset:
        a.model = build_checkpoint(a.preset, tmp / "main", seed=0, tokenizer_dir=SHIPPED,
                                   device=a.device)
    if a.aux_preset or (a.aux is None and not (a.model / "aux").is_dir()):
        a.aux = build_checkpoint(a.aux_preset or "tiny-aux", tmp / "aux", seed=1,
                                 tokenizer_dir=SHIPPED)
    eng = Engine(EngineConfig(model_dir=str(a.model), device=a.device, dtype=a.dtype,
                              self_check=False, clip_device=a.aux_device,
                              clip_model_dir=None if a.aux is None else str(a.aux)))
    cases = build_cases(eng.tokenizer, WorkloadConfig(cases=a.cases, docs=a.docs,
                                                      doc_tokens=a.doc_tokens, turns=a.turns))
    prober = Prober.of(eng)
    aux_layers = len(eng.clip.body.layers)
    print(f"main {a.preset or a.model.name} ({eng.runner.num_layers} layers, "
          f"{eng.runner.dtype}) on {eng.runner.device}; aux {a.aux_preset or eng.clip.path} "
          f"({aux_layers} layers, float32) on {a.aux_device} ({torch.get_num_threads()} CPU "
          f"threads); clip r={a.r}, min of {a.reps} reps, "
          f"torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if a.device == "cuda" else ""))
    first = cases[0].prompt  # untimed: the first calls into torch are slow
    prober.run(ChunkStore(0), first.ids, first.anchors, "full", eng.defaults, 1)
    eng.clip.scores(first.ids)
    print(f"{'case':<18} {'tokens':>6} {'placed':>6} {'full ms':>8} {'aux ms':>8} "
          f"{'aux/full':>8} {'clip ms':>8} {'waited ms':>9}")
    tot = np.zeros(4)
    for case in cases:
        store = ChunkStore(1 << 40)
        for w in case.warm:
            prober.warm(store, w.ids, w.anchors)
        full = min(prober.run(store, case.prompt.ids, case.prompt.anchors, "full",
                              eng.defaults, 1).prefill_seconds for _ in range(a.reps))
        aux = min(eng.clip.start(case.prompt.ids, background=False).seconds
                  for _ in range(a.reps))
        runs = [clip_prefill(eng, prober, store, case.prompt, a.r) for _ in range(a.reps)]
        clip, waited, _, placed = min(runs)
        tot += (full, aux, clip, waited)
        print(f"{case.name:<18} {len(case.prompt.ids):>6} {placed:>6} {full * 1e3:>8.1f} "
              f"{aux * 1e3:>8.1f} {aux / full:>8.2f} {clip * 1e3:>8.1f} {waited * 1e3:>9.1f}")
    full, aux, clip, waited = tot
    print(f"{'total':<18} {'':>6} {'':>6} {full * 1e3:>8.1f} {aux * 1e3:>8.1f} "
          f"{aux / full:>8.2f} {clip * 1e3:>8.1f} {waited * 1e3:>9.1f}")


if __name__ == "__main__":
    main()
