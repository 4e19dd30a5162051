"""Where the engine's GPU memory goes over a few requests, and what is alive at rest.

Usage (GPU): python bench/gpu_memory.py --size 32000 --out FILE

Builds the V2-Lite-shaped checkpoint, then logs torch.cuda.memory_allocated after each step
(engine loaded; a warm prompt prefilled with full; its edit with prefix; with pic; a decode
burst; the store flushed; gc), with allocation history recorded from the start, and finally
the largest live allocations at rest with the Python frames that made them. Written for the
out-of-memory seen in bench/gpu_ttft.py's 32K section (bench/NOTES.md).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_ttft
import ttft

from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine, SamplingParams
from irminsul.engine_adapter.embedded.presets import build_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=32000)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    lines = [(f"# bench/gpu_memory.py on {torch.cuda.get_device_name()}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}"), f"# command: {' '.join(sys.argv)}"]

    def log(step: str) -> None:
        torch.cuda.synchronize()
        lines.append(f"{step:<40} allocated {torch.cuda.memory_allocated() / 2**30:6.2f} GiB"
                     f"  peak {torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB")
        print(lines[-1], flush=True)
        a.out.write_text("\n".join(lines) + "\n")

    torch.cuda.memory._record_memory_history(max_entries=200_000)
    model = build_checkpoint("v2-lite", tempfile.mkdtemp(prefix="gpu-mem-"), seed=0,
                             tokenizer_dir=ttft.SHIPPED, dtype="bfloat16", device="cuda",
                             init_in_dtype=True)
    log("checkpoint built")
    gc.collect()
    log("gc")
    engine = Engine(EngineConfig(model_dir=str(model), device="cuda", self_check=False,
                                 cache_bytes=4 << 30, max_seq_len=a.size + 1000))
    log("engine loaded")
    corpus = ttft.body_tokens(engine, a.size + 2 * gpu_ttft.HEADER_TOKENS)
    warm, edits = gpu_ttft.prompts(engine, a.size, corpus)
    edit = edits["header"]
    engine.prefill(warm[0], anchors=warm[1], policy="full")
    log("warm prompt, full")
    for policy in ("prefix", "pic"):
        engine.prefill(edit[0], anchors=edit[1], policy=policy)
        log(f"edit, {policy}")
    list(engine.generate(edit[0], SamplingParams(max_new_tokens=16, ignore_eos=True),
                         anchors=edit[1], policy="pic"))
    log("edit, pic + 16 decode steps")
    engine.flush_cache()
    log("store flushed")
    gc.collect()
    log("gc")
    snap = torch.cuda.memory._snapshot()
    live = []
    for seg in snap["segments"]:
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                frames = block.get("frames") or []
                where = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames
                         if f["filename"].endswith(".py")][:6]
                live.append((block["size"], seg.get("segment_pool_id"), where))
    live.sort(key=lambda x: -x[0])
    lines.append(f"\n# the {a.top} largest live allocations at rest (size, pool, Python frames "
                 f"innermost first); {len(live)} live blocks, "
                 f"{sum(x[0] for x in live) / 2**30:.2f} GiB")
    groups: dict[tuple, list[int]] = {}
    for size, pool, where in live:
        groups.setdefault(tuple(where[:4]), []).append(size)
    ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    for where, sizes in ranked[: a.top]:
        lines.append(f"{sum(sizes) / 2**30:8.3f} GiB in {len(sizes):5d} blocks: "
                     + " <- ".join(where))
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-a.top - 1:]))


if __name__ == "__main__":
    main()
