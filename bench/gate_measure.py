"""Measure what a model's quality gate (MODEL/irminsul.json, gate.py) should allow.

Usage: python bench/gate_measure.py [--model DIR] [--policies pic:k=16 clip:r=0.1]
                                    [--cases 2] [--tokens 4 8 16] [--new-tokens 32]
                                    [--rotations correct none ...] [--sweep pic:k=0 ...]
                                    [--device cpu|cuda|auto] [--dtype float32|bfloat16|auto]

For each policy, with the correct δ-rotation and with deliberately broken ones (the rotation
the prefill places reused k_pe with, ``kernels.rope.delta_rotate``, replaced; the self-check's
own rope comparison is left alone so only the probe can see the damage):

* the start-up self-check's probe (guard._probe: one prompt whose chunk moved behind a longer
  header) at each --tokens count: first-token KL(full || policy) and greedy agreement;
* the quality harness's prompts (quality_workloads: needle, agentic, rag; --cases each):
  first-token KL and greedy agreement over --new-tokens tokens, as an audit measures them.

Broken rotations: ``none`` (k_pe kept at its stored positions: position-dependent reuse),
``off-by-one`` (rotated to position + 1), ``reversed`` (rotated by -(dst - src)), ``double``
(by 2 (dst - src)), ``plus-16`` (to position + 16). ``--sweep`` runs only the probe (at the
first --tokens count) for more policies under every rotation: the gate applies to whatever
policy the engine is configured with. A gate must pass the correct rotation with a margin and
fail the broken ones.
All figures come from this one run, float32 on the CPU by default (--device/--dtype: the same
on a GPU, e.g. to measure a bfloat16 gate). The broken rotations patch the torch reference
(``rope.delta_rotate``), which the fused Triton placement kernel does not call: whenever a
broken rotation is among those run, the engine places reused KV with the torch path
(placement="torch"), the correct rotation included, so every row goes through the same path.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import contextmanager

import torch

import irminsul
from irminsul.engine_adapter.embedded import guard
from irminsul.engine_adapter.embedded.config import DEVICES, DTYPES, EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine
from irminsul.engine_adapter.embedded.quality import evaluate, parse_policies
from irminsul.engine_adapter.embedded.quality_workloads import WorkloadConfig, build_cases
from irminsul.kernels import rope

_RIGHT = rope.delta_rotate
BROKEN = {
    "correct": None,
    "none": lambda k, src, dst, spec: k.clone(),
    "off-by-one": lambda k, src, dst, spec: _RIGHT(k, src, dst + 1, spec),
    "reversed": lambda k, src, dst, spec: _RIGHT(k, dst, src, spec),
    "double": lambda k, src, dst, spec: _RIGHT(k, src, dst + (dst - src), spec),
    "plus-16": lambda k, src, dst, spec: _RIGHT(k, src, dst + 16, spec),
}


@contextmanager
def rotation(name: str):
    fn = BROKEN[name]
    if fn is not None:
        rope.delta_rotate = fn
    try:
        yield
    finally:
        rope.delta_rotate = _RIGHT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(irminsul.SHIPPED_MODEL_DIR))
    p.add_argument("--policies", nargs="*", default=["pic:k=16", "clip:r=0.1"],
                   help="policies run on the probe and the harness prompts")
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rotations", nargs="+", default=list(BROKEN), choices=list(BROKEN))
    p.add_argument("--sweep", nargs="*", default=[], metavar="POLICY",
                   help="probe-only policies, e.g. pic:k=0 blend:r=0.1 clip:r=0.2")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the engine runs (auto: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and KV (auto: bfloat16 on cuda, float32 on cpu)")
    a = p.parse_args()
    torch.manual_seed(0)
    # A patched rope.delta_rotate only reaches the torch placement path (see the docstring).
    placement = "torch" if any(r != "correct" for r in a.rotations) else "auto"
    engine = Engine(EngineConfig(model_dir=a.model, device=a.device, dtype=a.dtype,
                                 placement=placement, self_check=False))
    runner = engine.runner
    dtype = str(runner.dtype).removeprefix("torch.")
    where = (torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda"
             else runner.device.type.upper())
    specs, skipped = parse_policies(a.policies)
    for s in skipped:
        print(s)
    cases = build_cases(engine.tokenizer, WorkloadConfig(cases=a.cases))
    print(f"# gate_measure {time.strftime('%Y-%m-%d')} on {platform.node()} "
          f"({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads), model {engine.model_name}, {dtype} {where}, placement {runner.placement}")
    rows = []
    sweep, skipped = parse_policies(a.sweep)
    for spec in sweep:
        args = engine.defaults_for(spec.policy)._replace(**spec.args)
        for broken in a.rotations:
            with rotation(broken):
                kl, agree, counts = guard._probe(engine, spec.policy, args, a.tokens[0])
            rows.append({"policy": spec.label, "rotation": broken, "probe": {
                str(a.tokens[0]): {"kl": kl, "agreement": agree,
                                   "reused": counts.reused_tokens}}})
            print(f"sweep {spec.label:<11} {broken:<10} probe t={a.tokens[0]}: KL {kl:.4f} "
                  f"agr {agree:.3f} (reused {counts.reused_tokens}, recomputed "
                  f"{counts.recomputed_tokens})", flush=True)
    for spec in specs:
        args = engine.defaults_for(spec.policy)._replace(**spec.args)
        for broken in a.rotations:
            with rotation(broken):
                probe = {}
                for n in a.tokens:
                    kl, agree, counts = guard._probe(engine, spec.policy, args, n)
                    probe[n] = (kl, agree, counts.reused_tokens)
                report = evaluate(engine, cases, [spec], a.new_tokens)
            kls = [r.kl for r in report.results]
            agrees = [r.agreement for r in report.results]
            row = {"policy": spec.label, "rotation": broken,
                   "probe": {str(n): {"kl": v[0], "agreement": v[1], "reused": v[2]}
                             for n, v in probe.items()},
                   "harness_kl": kls, "harness_agreement": agrees,
                   "harness_cases": [r.case for r in report.results]}
            rows.append(row)
            probe_txt = "  ".join(f"t={n}: KL {v[0]:.4f} agr {v[1]:.2f}"
                                  for n, v in probe.items())
            print(f"{spec.label:<11} {broken:<10} probe (reused {probe[a.tokens[0]][2]}) "
                  f"{probe_txt}")
            print(f"{'':<22} harness ({len(kls)} cases, {a.new_tokens} tokens): KL mean "
                  f"{sum(kls) / len(kls):.4f} max {max(kls):.4f}; agreement mean "
                  f"{sum(agrees) / len(agrees):.3f} min {min(agrees):.3f}")
            print(f"{'':<22} per case KL " + " ".join(f"{k:.4f}" for k in kls)
                  + " | agr " + " ".join(f"{x:.2f}" for x in agrees), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
