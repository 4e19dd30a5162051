"""The two in-context skills that reusing a chunk's KV can break, measured on a plain
transformers causal LM (no engine, no cache): the reference figures of a checkpoint.

* induction: a sequence of random tokens, then the same sequence again; accuracy of the
  greedy next-token prediction over the second copy (its first token is not inferable and is
  not scored). A model that has learnt to copy scores near 1, a unigram model near 1/vocab.
* retrieval: a chat prompt of about N tokens: documents as user messages, some holding a
  key -> value fact, one of them the asked one, early in the prompt; the question last. The
  greedy answer must start with the value. Facts and questions come from ``FACTS``; the
  training script draws its examples from the same templates with other seeds.

The training script (examples/models/train_model.py) prints both; tests/test_shipped_model.py
checks them on the committed checkpoint.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from ...proxy import trace_content

# (fact, question) templates. {k}: a key like "basalt-42"; {v}: a value like "ORCHID-4821".
FACTS = (
    ("The access code for project {k} is {v}.",
     "What is the access code for project {k}? Answer with the code only."),
    ("Config note: the {k} key is set to {v}.",
     "What is the {k} key set to? Answer with the value only."),
    ("Remember that {k} maps to {v}.",
     "What does {k} map to? Answer with the value only."),
    ("The deploy token of service {k} is {v}.",
     "What is the deploy token of service {k}? Answer with the token only."),
)


@dataclass(frozen=True)
class SkillEvalConfig:
    induction_seqs: int = 64
    induction_len: int = 100
    retrieval_prompts: int = 100
    retrieval_tokens: int = 2048  # prompt length the retrieval prompts are built to
    seed: int = 1234
    batch: int = 32


@lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    """Lower-case words of 4-9 letters from stdlib docstrings: the pool keys and values are
    drawn from, large enough that no key or value can be memorised."""
    rng = random.Random(0)
    found = set()
    for _ in range(400):
        found.update(w.lower() for w in re.findall(r"\b[A-Za-z]{4,9}\b", trace_content.prose(rng, 200)))
    return tuple(sorted(found))


VALUE_RE = re.compile(r"\b[A-Z]{2,}-\d{4}\b")  # the shape of key_value()'s values


def key_value(rng: random.Random) -> tuple[str, str]:
    pool = words()
    return (f"{rng.choice(pool)}-{rng.randint(10, 99)}",
            f"{rng.choice(pool).upper()}-{rng.randint(1000, 9999)}")


class RetrievalPrompt(NamedTuple):
    messages: list[dict]  # OpenAI-style chat, the question last
    answer: str  # the asked value
    asked_doc: int  # index of the document holding it
    # (question, answer) pairs asked after the first answer (training prompts only)
    followups: tuple[tuple[str, str], ...] = ()


def retrieval_messages(rng: random.Random, tokenizer, target_tokens: int,
                       doc_words: tuple[int, int] = (60, 220), facts: tuple[int, int] = (1, 4),
                       questions: int = 1) -> RetrievalPrompt:
    """Documents until the rendered prompt reaches about ``target_tokens``; between ``facts``
    facts spread over them, one per document (distinct keys, one template), the asked one in
    the first 60% of the prompt. ``questions`` > 1 asks about other facts too, as ``followups`` (training prompts:
    more answers per token read, each against the same distractors)."""
    fact, question = rng.choice(FACTS)
    docs, total = [], 40
    while total < target_tokens - 60:
        title = f"Notes on {rng.choice(words())} {rng.randint(1, 999)}"
        text = trace_content.prose(rng, rng.randint(*doc_words))
        # trim so the last document does not overshoot the target by much
        ids = tokenizer.encode(text)
        room = target_tokens - 60 - total
        if len(ids) > room > 20:
            text = tokenizer.decode(ids[:room])
            ids = ids[:room]
        docs.append([title, text])
        total += len(ids) + 12
    n_facts = min(len(docs), rng.randint(*facts))
    holders = rng.sample(range(len(docs)), n_facts)
    asked = rng.choice([h for h in holders if h <= max(0, int(0.6 * len(docs)))] or holders)
    keys: set[str] = set()
    answer, pairs = "", []
    for h in holders:
        k, v = key_value(rng)
        while k in keys:
            k, v = key_value(rng)
        keys.add(k)
        sentences = docs[h][1].split(". ")
        at = rng.randrange(len(sentences) + 1)
        sentences.insert(at, fact.format(k=k, v=v).rstrip("."))
        docs[h][1] = ". ".join(sentences)
        pairs.append((k, v))
        if h == asked:
            asked_key, answer = k, v
    header = (f"Current time: 2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
              f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}. Answer from the documents below.")
    msgs = [{"role": "system", "content": header}]
    msgs += [{"role": "user", "content": f"# {t}\n\n{x}"} for t, x in docs]
    msgs.append({"role": "user", "content": question.format(k=asked_key)})
    others = [kv for kv in pairs if kv[0] != asked_key]
    extra = rng.sample(others, min(len(others), questions - 1)) if questions > 1 else []
    return RetrievalPrompt(messages=msgs, answer=answer, asked_doc=asked,
                           followups=tuple((question.format(k=k), v) for k, v in extra))


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def induction_accuracy(model, vocab_size: int, first_id: int, bos_id: int,
                       config: SkillEvalConfig = SkillEvalConfig()) -> float:
    """Random token IDs in [first_id, vocab_size) (specials excluded), repeated twice."""
    gen = torch.Generator().manual_seed(config.seed)
    n, length = config.induction_seqs, config.induction_len
    seq = torch.randint(first_id, vocab_size, (n, length), generator=gen)
    ids = torch.cat([torch.full((n, 1), bos_id), seq, seq], dim=1).to(_device(model))
    hits = total = 0
    for i in range(0, n, config.batch):
        logits = model(input_ids=ids[i:i + config.batch]).logits
        pred = logits[:, length + 1:2 * length].argmax(-1)
        target = ids[i:i + config.batch, length + 2:2 * length + 1]
        hits += int((pred == target).sum())
        total += target.numel()
    return hits / total


@torch.no_grad()
def greedy(model, ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...]) -> list[int]:
    """Greedy decoding with transformers' own KV cache: the reference path, not the engine."""
    from .model_runner import cache_kwarg

    name = cache_kwarg(type(model))
    x = torch.tensor([ids], device=_device(model))
    out = model(input_ids=x, use_cache=True)
    past, new = getattr(out, name), []
    for _ in range(max_new_tokens):
        tok = int(out.logits[0, -1].argmax())
        if tok in stop_ids:
            break
        new.append(tok)
        out = model(input_ids=torch.tensor([[tok]], device=x.device), use_cache=True,
                    **{name: past})
        past = getattr(out, name)
    return new


def retrieval_accuracy(model, tokenizer, config: SkillEvalConfig = SkillEvalConfig(),
                       stop_ids: tuple[int, ...] = ()) -> tuple[float, float]:
    """(accuracy, mean prompt tokens) over ``config.retrieval_prompts`` prompts.
    ``tokenizer`` is irminsul's ModelTokenizer (the engine's own chat rendering)."""
    rng = random.Random(f"irminsul-skill-eval:{config.seed}")
    hits, lengths = 0, []
    for _ in range(config.retrieval_prompts):
        p = retrieval_messages(rng, tokenizer, config.retrieval_tokens)
        ids = tokenizer.encode_chat(p.messages, add_generation_prompt=True).ids
        lengths.append(len(ids))
        out = tokenizer.decode(greedy(model, [int(t) for t in ids], 12, stop_ids))
        hits += out.strip().startswith(p.answer)
    return hits / config.retrieval_prompts, float(np.mean(lengths))
