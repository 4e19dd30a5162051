"""Train the shipped MLA model (and its CacheClip auxiliary model) on one GPU in minutes.

Usage, on an H100 (the corpus made once by ``train_data.py prepare``):
    python examples/models/train_model.py --out DIR --minutes 8
and on a CPU, to check the script end to end in a minute:
    python examples/models/train_model.py --out /tmp/m --smoke
Add ``--profile-steps 20`` to log where a training step's time goes (torch.profiler).

The model is transformers' own DeepseekV2ForCausalLM with the ``irminsul-mla`` preset
(presets.py), so the checkpoint loads wherever DeepSeek-V2 does; the aux model is the
``irminsul-aux`` preset, trained on the same batches. The run is time-boxed: the learning-rate
schedule follows elapsed time, not a step count, so the same command fits its budget on any
GPU; the last ``--long-frac`` of the time trains on longer rows. ``--then`` adds a second
stage to the same run, from when the copy circuit forms: the shipped model's command (README)
uses it to turn to retrieval prompts once copying, which binding a key to its value needs, is
there. At the end it prints and
writes (training.json) the held-out loss, induction accuracy and retrieval accuracy at 2K and
4K tokens, measured on transformers' own forward (engine_adapter/embedded/skill_eval.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train_data

from irminsul.chunking.tokenizer import ModelTokenizer
from irminsul.engine_adapter.embedded import skill_eval
from irminsul.engine_adapter.embedded.presets import copy_tokenizer, preset_config


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Batches:
    """Builds each step's rows on the GPU: corpus windows (half with a span copied later),
    random-block repeat rows, and packed chat rows from the background pool."""

    def __init__(self, corpus: np.ndarray, chat: train_data.ChatPool, vocab: int,
                 first_id: int, bos: int, device, seed: int, shares: tuple[float, float]):
        self.corpus = torch.from_numpy(corpus.astype(np.int64)).to(device)
        self.pool = chat
        self.chat: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.vocab, self.first_id, self.bos, self.device = vocab, first_id, bos, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.chat_share, self.copy_share = shares

    def refresh(self) -> None:
        """Move the chat rows made since the last call to the GPU."""
        for seq in self.pool.seqs:
            new = self.pool.take(seq)
            if new is None:
                continue
            ids = torch.from_numpy(new[0].astype(np.int64)).to(self.device)
            w = torch.from_numpy(new[1]).to(self.device)
            if seq in self.chat:
                ids = torch.cat([self.chat[seq][0], ids])
                w = torch.cat([self.chat[seq][1], w])
            self.chat[seq] = (ids, w)

    def set_drill(self, drill: train_data.Drill | None) -> None:
        """Retrieval samples become drills (or, with None, the evaluation's kind again) from
        the pool's next jobs on; the chat rows gathered so far are dropped, their mix changed,
        and text rows stand in for them until new ones arrive."""
        self.pool.drill = drill
        self.chat.clear()

    def set_mix(self, chat_share: float, copy_share: float, retrieval_share: float,
                facts: int, questions: int) -> None:
        """A new stage's mix, from the next batch (chat rows: from the pool's next jobs on;
        those gathered so far are dropped, as in set_drill)."""
        self.chat_share, self.copy_share = chat_share, copy_share
        pool = self.pool
        pool.share, pool.facts, pool.questions = retrieval_share, facts, questions
        self.chat.clear()

    def _randint(self, low, high, n):
        return torch.randint(low, high, (n,), generator=self.gen, device=self.device)

    def text(self, n: int, seq: int):
        starts = self._randint(0, len(self.corpus) - seq - 1, n)
        pos = torch.arange(seq + 1, device=self.device)
        rows = self.corpus[starts[:, None] + pos]
        # half the rows repeat a span later: copying real text, the prefix-cache case's cousin
        span = self._randint(8, 129, n)
        a = (torch.rand(n, generator=self.gen, device=self.device) * (seq // 2 - span)).long()
        b = a + span + (torch.rand(n, generator=self.gen, device=self.device)
                        * (seq - 2 * span - a)).long()
        inside = (pos >= b[:, None]) & (pos < (b + span)[:, None])
        inside &= (torch.arange(n, device=self.device) % 2 == 0)[:, None]
        src = torch.where(inside, pos - b[:, None] + a[:, None], pos)
        return rows.gather(1, src), torch.ones(n, seq + 1, device=self.device)

    def repeats(self, n: int, seq: int):
        block = self._randint(8, 257, n)
        tokens = torch.randint(self.first_id, self.vocab, (n, 256), generator=self.gen,
                               device=self.device)
        t = torch.arange(seq, device=self.device)
        body = tokens.gather(1, t[None, :] % block[:, None])
        rows = torch.cat([torch.full((n, 1), self.bos, device=self.device), body], dim=1)
        w = torch.ones(n, seq + 1, device=self.device)
        w[:, 1:] *= (t[None, :] >= block[:, None]).float()  # the first copy is unpredictable
        return rows, w

    def chat_rows(self, n: int, seq: int):
        ids, w = self.chat[seq]
        pick = self._randint(0, len(ids), n)
        return ids[pick], w[pick]

    def copy_rows(self, rows: int) -> int:
        """How many of a batch's rows are random-block repeats (they come first)."""
        return round(rows * self.copy_share)

    def __call__(self, rows: int, seq: int):
        # until the pool has rows of this length, text rows stand in for chat rows
        n_chat = round(rows * self.chat_share) if seq in self.chat else 0
        n_rep = self.copy_rows(rows)
        parts = [self.repeats(n_rep, seq), self.text(rows - n_chat - n_rep, seq)]
        if n_chat:
            parts.append(self.chat_rows(n_chat, seq))
        ids = torch.cat([p[0] for p in parts])
        w = torch.cat([p[1] for p in parts])
        return ids[:, :-1], ids[:, 1:], w[:, 1:]


class Profiling:
    """--profile-steps: ``steps`` training steps after ``after`` warm-up ones under
    torch.profiler (CPU, and CUDA on a GPU); the operator table, sorted by device time on a
    GPU, goes to the log. The steps still train; the profiler slows them a little."""

    def __init__(self, steps: int, after: int, device):
        self.steps, self.start, self.device = steps, after, device
        self.prof = None

    def before(self, step: int) -> None:
        if self.steps > 0 and self.prof is None and step == self.start:
            from torch.profiler import ProfilerActivity, profile

            cuda = self.device.type == "cuda"
            self.prof = profile(activities=[ProfilerActivity.CPU]
                                + ([ProfilerActivity.CUDA] if cuda else []))
            self.t0 = time.perf_counter()
            self.prof.__enter__()

    def after(self, step: int) -> None:
        if self.prof is None or self.steps <= 0 or step < self.start + self.steps:
            return
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        spent = time.perf_counter() - self.t0
        key = "cuda_time_total" if cuda else "cpu_time_total"
        log(f"profile of steps {self.start + 1}-{step} ({spent:.2f} s under the profiler), "
            f"by {key}:\n" + self.prof.key_averages().table(sort_by=key, row_limit=25))
        self.steps = 0  # once


def weighted_loss(model, x, y, w, copy_rows: int = 0):
    """(weighted loss, and the loss on the first ``copy_rows`` rows — the random-block
    repeats, learnt only by copying — detached, or None)."""
    logits = model(input_ids=x).logits
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
    ce = ce.view_as(w)
    loss = (ce * w).sum() / w.sum().clamp_min(1)
    if not copy_rows:
        return loss, None
    wc = w[:copy_rows]
    return loss, ((ce[:copy_rows] * wc).sum() / wc.sum().clamp_min(1)).detach()


@torch.no_grad()
def heldout_loss(model, heldout: np.ndarray, seq: int, device, rows: int = 64) -> float:
    data = torch.from_numpy(heldout.astype(np.int64)).to(device)
    n = min(rows, (len(data) - 1) // seq)
    total, count = 0.0, 0
    for i in range(0, n, 16):
        starts = torch.arange(i, min(n, i + 16), device=device) * seq
        rows_ = data[starts[:, None] + torch.arange(seq + 1, device=device)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=rows_[:, :-1]).logits
        total += float(F.cross_entropy(logits.float().flatten(0, 1), rows_[:, 1:].flatten(),
                                       reduction="sum"))
        count += rows_[:, 1:].numel()
    return total / max(count, 1)


def new_model(preset: str, special: dict, device, seed: int, init: Path | None = None,
              init_std: float | None = None):
    """A model of ``preset`` with fresh weights (normal, std ``init_std`` or the preset's
    initializer_range), or ``init``'s."""
    from transformers import DeepseekV2ForCausalLM

    if init is not None:  # a second stage starts from an earlier run's weights
        model = DeepseekV2ForCausalLM.from_pretrained(init, dtype=torch.float32,
                                                      attn_implementation="sdpa")
        return model.to(device).train()
    torch.manual_seed(seed)
    cfg = preset_config(preset, **special)
    if init_std is not None:
        cfg.initializer_range = init_std
    cfg._attn_implementation = "sdpa"
    return DeepseekV2ForCausalLM(cfg).to(device)


def save(model, out: Path, tokenizer_dir: Path | None) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16).eval()
    model.config.dtype = "bfloat16"
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:  # the tokenizer files, as presets.build_checkpoint copies them
        _, gen_bytes = copy_tokenizer(tokenizer_dir, out)
        if gen_bytes is not None:
            (out / "generation_config.json").write_bytes(gen_bytes)


STAGE_OPTIONS = ("--lr", "--warmup", "--chat-share", "--copy-share", "--retrieval-share",
                 "--retrieval-facts", "--retrieval-questions", "--long-frac")


def add_stage_options(ap: argparse.ArgumentParser) -> None:
    """The options a stage sets (STAGE_OPTIONS): the main model's rate and its batches' mix.
    Both the run and its --then stage take them."""
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=float, default=0.04, help="share of time warming up")
    ap.add_argument("--chat-share", type=float, default=0.45)
    ap.add_argument("--copy-share", type=float, default=0.15)
    ap.add_argument("--retrieval-share", type=float, default=0.6,
                    help="share of chat samples that are retrieval prompts")
    ap.add_argument("--retrieval-facts", type=int, default=4,
                    help="facts per retrieval prompt, at most (the evaluation's: 4)")
    ap.add_argument("--retrieval-questions", type=int, default=1,
                    help="questions per retrieval prompt, at most (each answered in turn)")
    ap.add_argument("--long-frac", type=float, default=0.25,
                    help="the last share of the stage's time trains on --long-seq rows")


def then_stage(a: argparse.Namespace) -> argparse.Namespace:
    """The run's options with --then's applied: the second stage's. Only STAGE_OPTIONS may be
    given; anything else stops the run with a message naming it."""
    ap = argparse.ArgumentParser(prog="train_model.py --then", add_help=False)
    add_stage_options(ap)
    ap.set_defaults(**{o[2:].replace("-", "_"): getattr(a, o[2:].replace("-", "_"))
                       for o in STAGE_OPTIONS})
    return argparse.Namespace(**{**vars(a), **vars(ap.parse_args(shlex.split(a.then)))})


def lr_at(progress: float, peak: float, warmup: float) -> float:
    if progress < warmup:
        return peak * progress / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="writes OUT/irminsul-mla[/aux]")
    ap.add_argument("--minutes", type=float, default=8.0, help="training time budget")
    ap.add_argument("--corpus", type=Path, default=train_data.DEFAULT_CORPUS)
    ap.add_argument("--tokenizer", type=Path, default=HERE / "tiny-mla")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--long-seq", type=int, default=4096)
    ap.add_argument("--batch-tokens", type=int, default=131072)
    ap.add_argument("--aux-lr", type=float, default=3e-3)
    add_stage_options(ap)
    ap.add_argument("--init", type=Path, default=None,
                    help="start from this checkpoint (OUT/irminsul-mla of an earlier run) "
                         "and its aux/; the record adds up both stages' training time")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-steps", type=int, default=0, metavar="N",
                    help="run N steps (after 20 warm-up steps; 2 in --smoke) under "
                         "torch.profiler and log its operator table: where a step's time goes")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole script")
    ap.add_argument("--compile", action="store_true",
                    help="train through torch.compile (its compile time counts in --minutes): "
                         "1.31x the tokens a second on an H100 after ~32 s of compiling "
                         "(bench/results/2026-12-06-h100-train-compile.txt); --long-seq rows "
                         "run eagerly rather than compile a second graph")
    ap.add_argument("--drill-until", type=float, default=0.0, metavar="F",
                    help="until this share of the time, retrieval samples are drills (short "
                         "prompts, many facts and questions: train_data.Drill)")
    ap.add_argument("--drill-after-copying", type=float, default=0.0, metavar="F",
                    help="drills for this share of the time, from when the loss on the "
                         "repeat rows first falls below --copying-loss (the copy circuit "
                         "has formed: binding a key to its fact needs it)")
    ap.add_argument("--copying-loss", type=float, default=2.0,
                    help="the repeat rows' loss below which copying counts as formed (logged "
                         "once, and recorded in training.json as copy_formed)")
    ap.add_argument("--init-std", type=float, default=None, metavar="S",
                    help="std of the fresh weights (the preset's initializer_range, 0.02, by "
                         "default)")
    ap.add_argument("--aux-from", type=float, default=0.0, metavar="F",
                    help="train the aux model only from this share of the time on (its own "
                         "warm-up and decay within it): the main model's steps before it run "
                         "alone, faster, so its copy circuit forms sooner")
    ap.add_argument("--then", metavar="OPTIONS",
                    help="a second stage in the same run, from when the copy circuit forms "
                         "(see --copying-loss; at --then-by at the latest): these options "
                         f"({' '.join(STAGE_OPTIONS)}) replace the first stage's, over the time "
                         "left, with their own warm-up and decay of the main model's rate. "
                         "Example: --then '--lr 1e-3 --chat-share 0.7 --retrieval-share 0.8'")
    ap.add_argument("--then-by", type=float, default=0.6, metavar="F",
                    help="the latest share of the time at which --then's stage starts")
    ap.add_argument("--no-eval", action="store_true",
                    help="stop after training: no evaluation, nothing saved (sweeps that "
                         "read only the log)")
    ap.add_argument("--drill-tokens", type=int, default=900)
    ap.add_argument("--drill-facts", type=int, default=8)
    ap.add_argument("--drill-questions", type=int, default=8)
    a = ap.parse_args(argv)
    if not 0 <= a.aux_from < 1:
        ap.error(f"--aux-from must be in [0, 1), got {a.aux_from}")
    if not 0 < a.then_by < 1:
        ap.error(f"--then-by must be in (0, 1), got {a.then_by}")
    then = then_stage(a) if a.then is not None else None
    if a.smoke:
        a.minutes, a.seq, a.long_seq, a.batch_tokens, a.workers = 0.4, 256, 512, 2048, 1
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    tok = ModelTokenizer.from_dir(a.tokenizer)
    gen_cfg = json.loads((a.tokenizer / "generation_config.json").read_text())
    special = {k: gen_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    bos, pad = special["bos_token_id"], special["pad_token_id"]
    stop = tuple(gen_cfg["eos_token_id"])
    first_id = max(bos, pad, *stop) + 1  # the specials sit at the start of the vocabulary
    vocab = preset_config("irminsul-mla").vocab_size

    train, heldout = train_data.load_corpus(a.corpus)
    log(f"corpus: {len(train) / 1e6:.2f} M train tokens, {len(heldout) / 1e3:.0f} K held out")
    # long rows are needed only at the end, so they get a third of the workers' jobs
    chat = train_data.ChatPool(a.tokenizer, {a.seq: 2, a.long_seq: 1}, a.seed, a.workers, pad,
                               retrieval_share=a.retrieval_share,
                               retrieval_facts=a.retrieval_facts,
                               retrieval_questions=a.retrieval_questions)
    batches = Batches(train, chat, vocab, first_id, bos, device, a.seed,
                      (a.chat_share, a.copy_share))
    drill = train_data.Drill(a.drill_tokens, a.drill_facts, a.drill_questions)
    drill_end = a.drill_until
    if a.drill_until > 0:
        batches.set_drill(drill)

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    log(f"device {device} ({gpu}), torch {torch.__version__}")
    model = new_model("irminsul-mla", special, device, a.seed, a.init, a.init_std)
    aux = new_model("irminsul-aux", special, device, a.seed + 1, a.init and a.init / "aux",
                    a.init_std)
    n_params = sum(p.numel() for p in model.parameters())
    n_aux = sum(p.numel() for p in aux.parameters())
    log(f"model {n_params / 1e6:.1f} M params, aux {n_aux / 1e6:.1f} M")
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=fused)
    opt_aux = torch.optim.AdamW(aux.parameters(), lr=a.aux_lr, betas=(0.9, 0.95),
                                weight_decay=0.1, fused=fused)
    # the training steps go through the compiled modules (same parameters); evaluation and
    # saving use the plain ones
    steps_of = {id(m): torch.compile(m) if a.compile else m for m in (model, aux)}
    budget = a.minutes * 60
    t_train = time.perf_counter()
    step, tokens, history = 0, 0, []
    aux_loss, formed, then_at = None, None, None
    stage, stage_from = a, 0.0  # the options in force, and the progress at which they began
    profiling = Profiling(a.profile_steps, 2 if a.smoke else 20, device)
    while True:
        profiling.before(step)
        progress = (time.perf_counter() - t_train) / budget
        if progress >= 1:
            break
        if then is not None and stage is a and (formed is not None or progress >= a.then_by):
            stage, stage_from = then, progress
            batches.set_mix(then.chat_share, then.copy_share, then.retrieval_share,
                            then.retrieval_facts, then.retrieval_questions)
            then_at = {"step": step, "progress": round(progress, 4), "tokens": tokens,
                       "why": "copying formed" if formed is not None else "--then-by"}
            log(f"step {step}: the --then stage starts ({then_at['why']}): {a.then}")
        in_stage = (progress - stage_from) / (1 - stage_from)
        seq = a.long_seq if in_stage >= 1 - stage.long_frac else a.seq
        if chat.drill is not None and progress >= drill_end:
            batches.set_drill(None)
            log(f"step {step}: drills end, retrieval prompts as evaluated from here")
        if step % 20 == 0:
            batches.refresh()
        rows = max(1, a.batch_tokens // seq)
        x, y, w = batches(rows, seq)
        # the repeat rows' own loss, read at each log line (and every 10 steps while drills
        # wait on it): it falls from ~8 to < 1 when the copy circuit forms, the event every
        # run so far has waited on
        logged = (step + 1) % 50 == 0 or step == 0
        waits = a.drill_after_copying > 0 or (then is not None and stage is a)
        watch = logged or (formed is None and waits and step % 10 == 0)
        for m, o in ((model, opt), (aux, opt_aux)):
            if m is model:
                lr = lr_at(in_stage, stage.lr, stage.warmup)
            else:  # the aux model trains from --aux-from on, on its own schedule
                if progress < a.aux_from:
                    continue
                lr = lr_at((progress - a.aux_from) / (1 - a.aux_from), a.aux_lr, a.warmup)
            for g in o.param_groups:
                g["lr"] = lr
            # compiled for --seq rows only: --long-seq rows would compile a second graph
            forward = steps_of[id(m)] if seq == a.seq else m
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fused):
                copy_rows = batches.copy_rows(rows) if watch and m is model else 0
                loss, copy_loss = weighted_loss(forward, x, y, w, copy_rows)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()
            o.zero_grad(set_to_none=True)
            if m is aux:
                aux_loss = loss
            else:
                main_loss, main_copy = loss, copy_loss
                if (formed is None and copy_loss is not None
                        and (copied := float(copy_loss)) < a.copying_loss):
                    # recorded so that runs compare by it
                    formed = {"step": step + 1, "progress": round(progress, 4),
                              "tokens": tokens + x.numel(),
                              "seconds": round(time.perf_counter() - t_train, 1)}
                    log(f"step {step + 1}: loss on the repeats {copied:.2f} < {a.copying_loss}: "
                        f"the copy circuit has formed, {formed['tokens'] / 1e6:.0f} M tokens in")
                    if a.drill_after_copying > 0:
                        drill_end = progress + a.drill_after_copying
                        batches.set_drill(drill)
                        log(f"drills until {drill_end:.0%} of the time")
        step += 1
        tokens += x.numel()
        profiling.after(step)
        if logged:
            ml = float(main_loss.detach())
            history.append((step, round(progress, 4), ml))
            rate = tokens / (time.perf_counter() - t_train)
            copied = f" repeats {float(main_copy):.3f}" if main_copy is not None else ""
            aux_text = f"{float(aux_loss.detach()):.3f}" if aux_loss is not None else "-"
            log(f"step {step} seq {seq} loss {ml:.3f}{copied} aux {aux_text} "
                f"{rate / 1e6:.2f} M tok/s progress {progress:.0%}")
    train_s = time.perf_counter() - t_train
    chat.close()
    log(f"trained {step} steps, {tokens / 1e6:.0f} M tokens in {train_s:.0f} s; chat rows made "
        f"{chat.made}, used pools {({s: len(v[0]) for s, v in batches.chat.items()})}")
    if a.no_eval:  # a sweep's run: its log is the result
        return 0

    model.eval()
    aux.eval()
    small = a.smoke
    ev = skill_eval.SkillEvalConfig(induction_seqs=4 if small else 64,
                                    induction_len=20 if small else 100,
                                    retrieval_prompts=2 if small else 100)
    metrics = {"heldout_loss": heldout_loss(model, heldout, a.seq, device),
               "aux_heldout_loss": heldout_loss(aux, heldout, a.seq, device)}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fused):
        metrics["induction_accuracy"] = skill_eval.induction_accuracy(model, vocab, first_id,
                                                                      bos, ev)
        metrics["aux_induction_accuracy"] = skill_eval.induction_accuracy(aux, vocab, first_id,
                                                                          bos, ev)
        for n in ((300,) if small else (2048, 4096)):
            cfg = skill_eval.SkillEvalConfig(retrieval_prompts=ev.retrieval_prompts,
                                             retrieval_tokens=n)
            acc, mean_len = skill_eval.retrieval_accuracy(model, tok, cfg, stop)
            metrics[f"retrieval_accuracy@{n}"] = acc
            metrics[f"retrieval_mean_tokens@{n}"] = round(mean_len)
    for k, v in metrics.items():
        log(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")

    out = a.out / "irminsul-mla"
    save(model, out, a.tokenizer)
    save(aux, out / "aux", None)
    record = {
        "command": shlex.join(["python", "examples/models/train_model.py",
                               *(argv or sys.argv[1:])]),
        "device": gpu, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "date": time.strftime("%Y-%m-%d"), "steps": step, "tokens": tokens,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "params": n_params, "aux_params": n_aux, "metrics": metrics, "copy_formed": formed,
        "then_started": then_at,
        "args": {k: str(v) for k, v in vars(a).items()}, "loss_history": history,
    }
    if a.init is not None:
        before = json.loads((a.init / "training.json").read_text())
        record["stages"] = [*before.get("stages", [before]), {k: record[k] for k in (
            "command", "steps", "tokens", "train_seconds", "total_seconds", "metrics")}]
        for stage in record["stages"]:
            stage.pop("stages", None)
            stage.pop("loss_history", None)
        record["train_seconds_all_stages"] = round(
            sum(s["train_seconds"] for s in record["stages"]), 1)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {out} in {record['total_seconds']} s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
