"""The fused absorbed-MLA attention kernel against the torch form, on the GPU, in one run.

Usage (GPU): python bench/mla_attention_bench.py --out bench/results/DATE-h100-mla_attention.txt

DeepSeek-V2-Lite's attention widths (16 heads, rank 512, rope 64), bf16, one layer's call:
for visible slots T and query counts q, queries either at the front of the prompt (pic's
recomputed header: positions 0..q-1) or spread over it (chunk starts: sorted random
positions). Each row checks the kernel against the float32 reference
(kernels/mla_attention.py) and times it against the engine's torch form
(engine_adapter/embedded/absorbed.attend, which the engine ran before the kernel) with CUDA
events, median of --reps after a warm-up: the kernel with one program per query's slots and
with the splits the engine would use (kernels/mla_attention.splits_for). The engine picks the
form per block by a cost model (model_runner.attention_costs) fitted to this table; each row
prints the model's predictions beside the measurements and the form it would pick.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from irminsul.engine_adapter.embedded.absorbed import attend
from irminsul.engine_adapter.embedded.model_runner import attention_costs
from irminsul.kernels.mla_attention import mla_attention_ref
from irminsul.kernels.mla_attention_triton import mla_attention_triton

HEADS, RANK, ROPE = 16, 512, 64


def timed(reps: int, fn, *args, **kwargs) -> float:
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*args, **kwargs)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def inputs(q: int, t: int, layout: str, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * std).to(torch.bfloat16)

    if layout == "front":
        pos = torch.arange(q, device="cuda")
    else:
        pos = torch.sort(torch.randperm(t, generator=g, device="cuda")[:q]).values
        pos[-1] = t - 1  # a block ends at its last visible slot, as the runner's do
    return r(HEADS, q, RANK, std=0.05), r(HEADS, q, ROPE, std=0.05), r(t, RANK), r(t, ROPE), pos


def sweep(scale: float, lines: list[str], out: Path) -> None:
    """Kernel time per (block_m, block_n, warps, stages) for the two layouts of one shape."""
    import itertools

    cases = {lay: inputs(256, 8192, lay, seed=1) for lay in ("front", "spread")}
    lines.append("# sweep at T=8192, q=256: block_m block_n warps stages -> front / spread ms")
    for bm, bn, w, st in itertools.product((16, 32, 64), (32, 64), (4, 8), (1, 2, 3)):
        try:
            ms = [timed(5, mla_attention_triton, *cases[lay], scale, bm, bn, w, st)
                  for lay in ("front", "spread")]
            line = f"#   {bm:>3} {bn:>3} {w} {st} -> {ms[0]:.3f} / {ms[1]:.3f}"
        except Exception as e:  # noqa: BLE001  (a setting out of shared memory: say so)
            line = f"#   {bm:>3} {bn:>3} {w} {st} -> failed: {type(e).__name__}"
        lines.append(line)
        print(line, flush=True)
        out.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slots", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 4, 16, 64, 256, 512])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true",
                    help="first time the kernel's tile settings at T=8192, q=256 (both layouts)")
    a = ap.parse_args()
    lines = [(f"# bench/mla_attention_bench.py on {torch.cuda.get_device_name()}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}"),
             f"# command: {' '.join(sys.argv)}",
             (f"# {HEADS} heads, rank {RANK}, rope {ROPE}, bf16; one layer's attention; CUDA "
              f"events, median of {a.reps}; err = max|kernel - float32 reference| / max|ref|"),
             (f"{'T':>6} {'q':>4} {'layout':<7}{'torch ms (model)':>17}{'kernel 1 split':>15}"
              f"{'kernel ms (model) splits':>25}{'err':>9}  attention_costs picks")]
    print("\n".join(lines), flush=True)
    scale = 1.0 / (RANK ** 0.5)
    if a.sweep:
        sweep(scale, lines, a.out)
    for t in a.slots:
        for q in a.queries:
            for layout in ("front", "spread"):
                ql, qp, lat, rot, pos = inputs(q, t, layout, seed=q + t)
                slots = torch.arange(t, device="cuda")
                mask = torch.zeros(q, t, dtype=torch.bfloat16, device="cuda")
                mask.masked_fill_(slots[None, :] > pos[:, None],
                                  torch.finfo(torch.bfloat16).min)
                mask = mask[None, None]
                host = pos.cpu()
                m_torch, m_kernel, splits = attention_costs(host, t, HEADS, RANK)
                ref = mla_attention_ref(ql, qp, lat, rot, pos, scale).float()
                got = mla_attention_triton(ql, qp, lat, rot, pos, scale, splits=splits).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                t_torch = timed(a.reps, attend, ql, qp, lat, rot, mask, scale)
                t_one = timed(a.reps, mla_attention_triton, ql, qp, lat, rot, pos, scale)
                t_split = timed(a.reps, mla_attention_triton, ql, qp, lat, rot, pos, scale,
                                splits=splits)
                pick = "kernel" if m_kernel < m_torch else "torch"
                right = (t_split < t_torch) == (pick == "kernel")
                line = (f"{t:>6} {q:>4} {layout:<7}{t_torch:>8.3f} ({m_torch:6.3f})"
                        f"{t_one:>15.3f}{t_split:>10.3f} ({m_kernel:6.3f}) {splits:>5}"
                        f"{err:>9.1e}  {pick}{'' if right else ' (the slower)'}")
                lines.append(line)
                print(line, flush=True)
                a.out.write_text("\n".join(lines) + "\n")
                if not err < 2e-2:
                    raise SystemExit(f"the kernel disagrees with the reference: {line}")


if __name__ == "__main__":
    main()
