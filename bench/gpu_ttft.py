"""TTFT of the embedded engine's GPU path on a DeepSeek-V2-Lite-shaped model, in one run.

Usage (GPU):   python bench/gpu_ttft.py --out bench/results/DATE-h100-gpu-ttft.txt
Usage (smoke): python bench/gpu_ttft.py --smoke --out /tmp/smoke.txt   (CPU, tiny-mla)
Profile:       add --profile FILE (one more pic request, see below)

One process builds the random bf16 checkpoint (presets.build_checkpoint('v2-lite'), on the
GPU), checks the fused placement kernel against the torch path on the real shapes (placed KV
slot by slot, then pic's logits), the engine's attention against the library's dense path
(logits), and the CUDA-graph blocks against the same blocks run eagerly (logits, greedy
tokens, decode step time), then times, for prompts of 8K and 32K tokens and two edits of a
warm prompt (a changed 200-token header; the same header with the sections in reverse
order): full, prefix, pic k=0, pic default k and blend 10% with the engine's defaults (the
absorbed MLA form for blocks of few queries, absorbed.py, attending with the fused kernel,
kernels/mla_attention_triton.py, replayed as CUDA graphs, graphs.py), pic default k without
the kernel ("torch-att"), without the graphs ("eager"), on the library's dense path alone,
and with --flex on FlexAttention. Each measurement flushes the store, prefills the warm
prompt with ``full``, then times the edited prompt to its first sampled token (warm-up
round + --reps rounds, round-robin, median). A second pass with the device synchronised
around the placement gives its time and share of TTFT. Prints the table last and writes
everything to --out.

--profile FILE: after the timed runs, one pic request (default k, the header edit, the first
size, the attention the timed pic rows used) runs under torch.profiler (CPU and, on CUDA, CUDA
activities) once the warm prompt is stored, the engine's steps labelled irminsul.*; FILE gets
the operator table sorted by total device time on CUDA (CPU time on the CPU), then the same
sorted by self time, 30 rows each. Issue 6: profile before optimising.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ttft

from irminsul.engine_adapter.embedded import engine as engine_mod
from irminsul.engine_adapter.embedded import prefill as prefill_mod
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine, SamplingParams
from irminsul.engine_adapter.embedded.planner import make_plan
from irminsul.engine_adapter.embedded.presets import build_checkpoint
from irminsul.kernels.materialize import triton_available

HEADER_TOKENS = 200
SECTIONS = 8
POISON = 1234.0


class Log:
    """Prints and keeps every line; rewrites --out after each step (a timeout keeps them)."""

    def __init__(self, path: Path):
        self.path, self.lines = path, []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        self.path.write_text("\n".join(self.lines) + "\n")


def cases(k: int, flex: bool) -> list[tuple[str, str, dict, tuple[str, bool, bool]]]:
    """(label, policy, policy args, mode). A mode is (prefill attention, CUDA graphs, fused
    attention kernel). The engine's defaults (absorbed MLA for blocks of few queries with
    the fused kernel, replayed as CUDA graphs; the library's dense path for the rest), then
    pic without the kernel, without the graphs, on the library's path alone, and with --flex
    on FlexAttention."""
    on = ("auto", True, True)
    rows = [("full", "full", {}, on), ("prefix", "prefix", {}, on),
            ("pic k=0", "pic", {"k": 0}, on), (f"pic k={k}", "pic", {"k": k}, on),
            ("blend r=0.1", "blend", {"r": 0.1}, on),
            (f"pic k={k} torch-att", "pic", {"k": k}, ("auto", True, False)),
            (f"pic k={k} eager", "pic", {"k": k}, ("auto", False, True)),
            (f"pic k={k} dense", "pic", {"k": k}, ("dense", False, False))]
    if flex:
        rows.append((f"pic k={k} flex", "pic", {"k": k}, ("flex", False, False)))
    return rows


DEFAULT_MODE = ("auto", True, True)
_KERNEL: dict[int, str] = {}  # each runner's configured attention kernel


def set_mode(engine: Engine, mode: tuple[str, bool, bool]) -> None:
    attention, graphs, kernel = mode
    r = engine.runner
    base = _KERNEL.setdefault(id(r), r.attention_kernel)
    r.prefill_attention = attention
    r.use_graphs = graphs and r.graphs is not None
    r.attention_kernel = base if kernel else "torch"


def prompts(engine: Engine, n: int, corpus: np.ndarray):
    """Warm prompt and its two edits, each (ids, anchors at header end and section starts)."""
    body = corpus[:n]
    h_warm, h_new = corpus[-HEADER_TOKENS:], corpus[-2 * HEADER_TOKENS : -HEADER_TOKENS]
    cuts = np.linspace(0, n, SECTIONS + 1).astype(int)
    sections = [body[a:b] for a, b in itertools.pairwise(cuts)]

    def build(head, secs):
        ids = np.concatenate([head, *secs]).astype(np.int32)
        anchors = tuple(int(x) for x in np.cumsum([len(head)] + [len(s) for s in secs[:-1]]))
        return ids, anchors

    warm = build(h_warm, sections)
    return warm, {"header": build(h_new, sections), "reorder": build(h_warm, sections[::-1])}


def sync(engine: Engine) -> None:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()


def recordings(engine) -> int:
    g = engine.runner.graphs
    return 0 if g is None else g.stats()["recordings"]


def timed_request(engine, warm, edit, policy, args, mode=DEFAULT_MODE):
    """(seconds to the first token, counts, CUDA graphs recorded inside the timed span)."""
    engine.flush_cache()
    set_mode(engine, mode)
    engine.prefill(warm[0], anchors=warm[1], policy="full")
    sync(engine)
    before = recordings(engine)
    t0 = time.perf_counter()
    out = next(iter(engine.generate(edit[0], SamplingParams(max_new_tokens=1), anchors=edit[1],
                                    policy=policy, policy_args=args)))
    return time.perf_counter() - t0, out.counts, recordings(engine) - before


def place_seconds(engine, warm, edit, policy, args, mode=DEFAULT_MODE) -> float:
    """One more request with the device synchronised around the placement."""
    spent = []
    inner = prefill_mod.place

    def timed(*a, **kw):
        sync(engine)
        t0 = time.perf_counter()
        inner(*a, **kw)
        sync(engine)
        spent.append(time.perf_counter() - t0)

    prefill_mod.place = timed
    try:
        timed_request(engine, warm, edit, policy, args, mode)
    finally:
        prefill_mod.place = inner
    return spent[-1]


def check_placement(engine, warm, edit, k, log) -> None:
    """Kernel vs torch placement on this model's shapes: every slot, then pic's logits."""
    if engine.runner.placement != "triton":
        log("  placement check skipped: no CUDA and no Triton interpreter")
        return
    r = engine.runner
    engine.flush_cache()
    engine.prefill(warm[0], anchors=warm[1], policy="full")
    chunks = engine._chunks(edit[0], None, edit[1], "")
    plan = make_plan(engine.store, edit[0], chunks, policy="pic", args=engine.defaults._replace(k=k))
    bufs = {}
    try:
        for placement in ("torch", "triton"):
            kv = r.alloc_kv(len(edit[0]) + 3)  # not the CUDA graphs' arena: same shapes
            kv.c_kv.fill_(POISON)
            kv.k_pe.fill_(POISON)
            r.placement = placement
            prefill_mod.place(r, plan, kv)
            bufs[placement] = kv
    finally:
        r.placement = "triton"
        engine.store.release(plan.entries)
    ref, got = bufs["torch"], bufs["triton"]
    slots = np.concatenate([np.arange(plan.prefix_len)] +
                           [np.arange(p.start, p.start + p.length) for p in plan.placements])
    same_ckv = torch.equal(got.c_kv, ref.c_kv)
    outside = torch.ones(got.capacity, dtype=torch.bool, device=got.k_pe.device)
    outside[torch.from_numpy(slots).to(outside.device)] = False
    clean = bool((got.k_pe[:, outside] == POISON).all())
    w = ref.k_pe[:, slots].float()
    pair = w.reshape(*w.shape[:-1], -1, 2).norm(dim=-1).repeat_interleave(2, -1)
    ulp = 2.0 ** (torch.floor(torch.log2(pair.clamp_min(1e-30))) - 7)
    if r.dtype == torch.float32:
        ulp = 1e-6 * pair + 1e-30
    ratio = ((got.k_pe[:, slots].float() - w).abs() / ulp).max().item()
    logits = {}
    for placement in ("torch", "triton"):
        r.placement = placement
        engine.flush_cache()
        engine.prefill(warm[0], anchors=warm[1], policy="full")
        logits[placement] = engine.prefill(edit[0], anchors=edit[1], policy="pic",
                                           policy_args={"k": k}).logits
    r.placement = "triton"
    dl = (logits["triton"] - logits["torch"]).abs().max().item()
    ok = same_ckv and clean and ratio <= 1.0
    log(f"  placement kernel vs torch: {len(slots)} slots x {r.num_layers} layers, c_KV "
        f"{'bit-identical' if same_ckv else 'DIFFERS'}, k_pe max err {ratio:.2f} of the "
        f"tolerance (1 ulp), {'no stray writes' if clean else 'STRAY WRITES'}; pic logits "
        f"max|d| {dl:.2e} -> {'OK' if ok else 'FAILED'}")
    if not ok:
        raise SystemExit("the placement kernel disagrees with the torch path")


def check_attention(engine, warm, edit, k, attentions, log) -> None:
    """Logits of full and pic under each attention against the library's dense full."""
    out = {}
    for attention in attentions:
        for policy, args in (("full", {}), ("pic", {"k": k})):
            set_mode(engine, (attention, True, True))
            engine.flush_cache()
            engine.prefill(warm[0], anchors=warm[1], policy="full")
            out[attention, policy] = engine.prefill(edit[0], anchors=edit[1], policy=policy,
                                                    policy_args=args).logits
    ref = out["dense", "full"]
    scale = ref.abs().max().item()
    parts = []
    for key, v in out.items():
        if key != ("dense", "full"):
            parts.append(f"{key[1]} {key[0]} {(v - ref).abs().max().item():.3f}")
    same = ", ".join(f"pic {att} vs pic dense "
                     f"{(out[att, 'pic'] - out['dense', 'pic']).abs().max().item():.3f}"
                     for att in attentions if att != "dense")
    log(f"  logits max|d| vs dense full (scale {scale:.2f}): " + ", ".join(parts)
        + f"; {same}")


def greedy(engine, warm, edit, k, graphs, n):
    """pic's logits and n greedy tokens, with or without the CUDA graphs, and the median
    time of a decode step (the gaps between tokens after the first)."""
    set_mode(engine, ("auto", graphs, True))
    engine.flush_cache()
    engine.prefill(warm[0], anchors=warm[1], policy="full")
    logits = engine.prefill(edit[0], anchors=edit[1], policy="pic", policy_args={"k": k}).logits
    engine.flush_cache()
    engine.prefill(warm[0], anchors=warm[1], policy="full")
    tokens, stamps = [], []
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    for o in engine.generate(edit[0], params, anchors=edit[1], policy="pic",
                             policy_args={"k": k}):
        sync(engine)
        stamps.append(time.perf_counter())
        tokens.append(o.token_id)
    step = statistics.median(b - a for a, b in itertools.pairwise(stamps))
    return logits, tokens, step


def check_graphs(engine, warm, edit, k, log, n=33):
    """The CUDA-graph path against the same blocks run eagerly: pic's logits, n greedy
    tokens, and the decode step time of both."""
    g = engine.runner.graphs
    if g is None:
        log("  CUDA graphs: off on this device")
        return None
    ref, ref_tokens, eager_step = greedy(engine, warm, edit, k, False, n)
    greedy(engine, warm, edit, k, True, n)  # records the shapes
    got, tokens, graph_step = greedy(engine, warm, edit, k, True, n)
    d = (got - ref).abs().max().item()
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), n)
    log(f"  CUDA graphs vs eager blocks: pic logits max|d| {d:.3f} (scale "
        f"{ref.abs().max().item():.2f}), greedy tokens identical for {same} of {n}; decode "
        f"step {eager_step * 1e3:.2f} -> {graph_step * 1e3:.2f} ms "
        f"({eager_step / graph_step:.1f}x); {g.stats()}")
    if not d < 1.0 or g.failed is not None:
        raise SystemExit("the CUDA graph path disagrees with the eager blocks or failed")
    return eager_step, graph_step


@contextmanager
def step_labels(engine):
    """record_function ranges named irminsul.* around the engine's steps (chunking, planning,
    the prefill and its placement, the commit), so the profile shows them next to the
    operators: the host-side steps launch no kernels of their own."""
    from torch.profiler import record_function

    targets = [(engine, "_chunks"), (engine_mod, "make_plan"), (engine_mod, "run_prefill"),
               (prefill_mod, "place"), (engine_mod, "commit")]
    saved = []
    for obj, name in targets:
        inner, label = getattr(obj, name), "irminsul." + name.lstrip("_")

        def wrapped(*a, _inner=inner, _label=label, **kw):
            with record_function(_label):
                return _inner(*a, **kw)

        saved.append((obj, name, inner))
        setattr(obj, name, wrapped)
    try:
        yield
    finally:
        for obj, name, inner in saved:
            if obj is engine:
                delattr(engine, name)  # the instance attribute shadowed the method
            else:
                setattr(obj, name, inner)


def profile_request(engine, warm, edit, k, attention, path: Path, log) -> None:
    """One pic k request under torch.profiler; the operator tables go to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    engine.flush_cache()
    set_mode(engine, (attention, True, True))
    engine.prefill(warm[0], anchors=warm[1], policy="full")  # the warm prompt: not profiled
    sync(engine)
    with step_labels(engine), profile(activities=activities) as prof:
        t0 = time.perf_counter()
        out = next(iter(engine.generate(edit[0], SamplingParams(max_new_tokens=1),
                                        anchors=edit[1], policy="pic", policy_args={"k": k})))
        sync(engine)
        spent = time.perf_counter() - t0
    c = out.counts
    unit = "cuda" if cuda else "cpu"
    events = prof.key_averages()
    head = (f"# bench/gpu_ttft.py --profile: pic k={k}, header edit, {len(edit[0])}-token "
            f"prompt, {attention} attention, on {engine.runner.device.type}; TTFT under the "
            f"profiler {spent * 1e3:.1f} ms (its overhead included); recomputed "
            f"{c.recomputed_tokens + c.new_tokens} of {c.prompt_tokens}\n"
            f"# command: {' '.join(sys.argv)}\n")
    path.write_text(head + f"\n## sorted by {unit}_time_total\n"
                    + events.table(sort_by=f"{unit}_time_total", row_limit=30)
                    + f"\n\n## sorted by self_{unit}_time_total\n"
                    + events.table(sort_by=f"self_{unit}_time_total", row_limit=30) + "\n")
    log(f"\n# profile of pic k={k} at {len(edit[0])} tokens ({spent * 1e3:.1f} ms under the "
        f"profiler) written to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="file the results are written to")
    ap.add_argument("--smoke", action="store_true",
                    help="same code on the CPU with the tiny-mla preset at small sizes")
    ap.add_argument("--sizes", type=int, nargs="+", help="body lengths in tokens")
    ap.add_argument("--reps", type=int, help="timed rounds after the warm-up round")
    ap.add_argument("--edits", type=lambda v: v.split(","), default=["header", "reorder"],
                    help="which edits to time, comma-separated (header,reorder)")
    ap.add_argument("--k", type=int, default=16, help="pic's default k")
    ap.add_argument("--model", type=Path, help="an existing checkpoint instead of building one")
    ap.add_argument("--flex", action="store_true",
                    help="also time and check pic with FlexAttention (compiles: ~20 s more)")
    ap.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                    help="the engine's cuda_graphs (on with --smoke: the static blocks eagerly)")
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="after the timed runs, profile one pic request at the first size "
                         "and write torch.profiler's operator tables here")
    ap.add_argument("--profile-size", type=int, help="body length of the profiled prompt "
                    "(default: the first of --sizes)")
    a = ap.parse_args()
    log = Log(a.out)
    device = "cpu" if a.smoke else "cuda"
    sizes = a.sizes or ([400, 800] if a.smoke else [8000, 32000])
    reps = a.reps if a.reps is not None else (1 if a.smoke else 3)
    interpreted = triton_available() and os.environ.get("TRITON_INTERPRET") == "1"
    t_start = time.perf_counter()
    if a.model is None:
        preset = "tiny-mla" if a.smoke else "v2-lite"
        a.model = build_checkpoint(
            preset, tempfile.mkdtemp(prefix="gpu-ttft-"), seed=0, tokenizer_dir=ttft.SHIPPED,
            dtype="float32" if a.smoke else "bfloat16", device=device,
            init_in_dtype=not a.smoke)
    t_built = time.perf_counter()
    engine = Engine(EngineConfig(
        model_dir=str(a.model), device=device, self_check=False, pic_k=a.k,
        # the store holds the warm prompt's chunks (~1 GiB at 32K); the context, and so
        # the CUDA graphs' arena, the longest prompt with room for a few tokens
        cache_bytes=4 << 30, max_seq_len=max(32768, max(sizes) + 4 * HEADER_TOKENS),
        placement="triton" if interpreted else "auto", cuda_graphs=a.cuda_graphs))
    r = engine.runner
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    import transformers
    tri = __import__("triton").__version__ if triton_available() else "absent"
    log(f"# bench/gpu_ttft.py on {where}, {time.strftime('%Y-%m-%d %H:%M')}")
    log(f"# torch {torch.__version__}, transformers {transformers.__version__}, triton {tri}; "
        f"model {a.model.name}: {r.num_layers} layers, {r.dtype}, placement {r.placement}; "
        f"checkpoint built in {t_built - t_start:.0f} s, loaded in "
        f"{time.perf_counter() - t_built:.0f} s")
    log(f"# command: {' '.join(sys.argv)}")
    corpus = ttft.body_tokens(engine, max(sizes) + 2 * HEADER_TOKENS)
    rows, decode = [], []
    flex_ok = a.flex
    for n in sizes:
        warm, edits = prompts(engine, n, corpus)
        log(f"\n## {len(warm[0])}-token prompt ({n} body tokens in {SECTIONS} sections)")
        t0 = time.perf_counter()
        check_placement(engine, warm, edits["reorder"], a.k, log)
        check_attention(engine, warm, edits["header"], a.k, ("dense", "auto"), log)
        steps = check_graphs(engine, warm, edits["header"], a.k, log)
        if steps is not None:
            decode.append((len(warm[0]), *steps))
        if flex_ok:
            try:
                check_attention(engine, warm, edits["header"], a.k, ("dense", "flex"), log)
            except Exception as e:  # noqa: BLE001  (one GPU run: keep the other figures)
                log(f"  FLEX FAILED ({type(e).__name__}: {str(e)[:300]}); no flex rows")
                flex_ok = False
        log(f"  checks took {time.perf_counter() - t0:.0f} s")
        for edit_name, edit in edits.items():
            if edit_name not in a.edits:
                continue
            cs = cases(a.k, flex_ok)
            times = {c[0]: [] for c in cs}
            counts, recorded = {}, dict.fromkeys(times, 0)
            for rep in range(reps + 1):  # round-robin; round 0 warms allocator and compiler
                for label, policy, args, mode in cs:
                    t, counts[label], new = timed_request(engine, warm, edit, policy, args, mode)
                    if rep:
                        times[label].append(t)
                        recorded[label] += new
            for label, policy, args, mode in cs:
                place = place_seconds(engine, warm, edit, policy, args, mode)
                med = statistics.median(times[label])
                c = counts[label]
                rows.append((len(edit[0]), edit_name, label, c, med, place))
                # every round and any graph recorded after the warm-up round: a median of
                # few rounds hides neither an outlier nor a shape recorded while timed
                log(f"  {edit_name:<8}{label:<20} TTFT {med * 1e3:8.1f} ms  place "
                    f"{place * 1e3:6.2f} ms ({place / med:5.1%})  recomputed "
                    f"{c.recomputed_tokens + c.new_tokens} of {c.prompt_tokens}  rounds "
                    + "/".join(f"{x * 1e3:.1f}" for x in times[label])
                    + (f"  RECORDED {recorded[label]} graphs while timed"
                       if recorded[label] else ""))
            if device == "cuda":
                log(f"  GPU memory: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated, "
                    f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    log(f"\n# total {time.perf_counter() - t_start:.0f} s on {where}; TTFT = prefill + first "
        f"token, median of {reps}; place = placement with the device synced at its edges")
    log(f"{'prompt':>7} {'edit':<8}{'case':<20}{'exact':>6}{'reused':>7}{'recomp':>7}"
        f"{'new':>6}{'TTFT ms':>9}{'vs prefix':>10}{'place ms':>9}{'share':>7}")
    for n, edit_name, label, c, med, place in rows:
        prefix = next(m for nn, e, lab, _, m, _ in rows
                      if nn == n and e == edit_name and lab.startswith("prefix"))
        log(f"{n:>7} {edit_name:<8}{label:<20}{c.exact_prefix_tokens:>6}{c.reused_tokens:>7}"
            f"{c.recomputed_tokens:>7}{c.new_tokens:>6}{med * 1e3:>9.1f}{prefix / med:>9.2f}x"
            f"{place * 1e3:>9.2f}{place / med:>7.1%}")
    for n, eager_step, graph_step in decode:
        log(f"decode step at {n} tokens: {eager_step * 1e3:.2f} ms eager, "
            f"{graph_step * 1e3:.2f} ms as CUDA graphs ({eager_step / graph_step:.1f}x)")
    if a.profile is not None:
        warm, edits = prompts(engine, a.profile_size or sizes[0], corpus)
        profile_request(engine, warm, edits["header"], a.k, "auto", a.profile, log)


if __name__ == "__main__":
    main()
