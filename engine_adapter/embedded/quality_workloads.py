"""Seeded prompts for the quality harness: earlier contexts to warm the store, then a new
prompt in which the reused chunks sit elsewhere.

* ``needle``: a key -> value fact inside one document; the documents are first seen in one
  order under one header, then asked about in another order under a new header, the question
  after them. The answer is known, so retrieval can be scored.
* ``agentic``: multi-turn agent sessions from proxy/traces.py (a rebuilt header, reordered
  system-prompt sections, compacted tool results), rendered with the model's chat template;
  the earlier turns warm the store, the last one is measured.
* ``rag``: retrieved documents in a new order each turn (the traces' rag family).

Everything is drawn from ``random.Random`` seeded by the config, so one seed gives the same
token IDs on one installation (the text comes from its stdlib sources, as the traces do).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from ...proxy import trace_content as content
from ...proxy.traces import TraceConfig, generate

WORKLOADS = ("needle", "agentic", "rag")
AGENTIC_FAMILIES = ("header", "reorder", "toolloop")


class Prompt(NamedTuple):
    ids: np.ndarray  # int32 token IDs
    anchors: tuple[int, ...]  # structural anchors (message / section starts) for chunking


class Case(NamedTuple):
    workload: str
    name: str
    warm: tuple[Prompt, ...]  # earlier contexts, prefilled with full and stored first
    prompt: Prompt  # the prompt every policy is measured on
    answer: str | None  # needle: the value the answer should contain


@dataclass(frozen=True)
class WorkloadConfig:
    """How many cases and how large. Sizes are tokens-ish (words and punctuation), so the
    prompts run ~1.5x that many tokens with the tiny BPE tokenizer."""

    workloads: tuple[str, ...] = WORKLOADS
    cases: int = 2  # per workload
    seed: int = 0
    docs: int = 4  # needle / rag: documents per prompt
    doc_tokens: int = 120  # needle / rag: size of a document; agentic: of a tool result
    turns: int = 3  # agentic: turns per session (all but the last warm the store)

    def __post_init__(self) -> None:
        object.__setattr__(self, "workloads", tuple(self.workloads))
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown or not self.workloads:
            raise ValueError(f"workloads must be some of {', '.join(WORKLOADS)}, "
                             f"got {', '.join(self.workloads) or 'none'}")
        for name, low in (("cases", 1), ("seed", 0), ("docs", 2), ("doc_tokens", 20),
                          ("turns", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


def build_cases(tokenizer, config: WorkloadConfig) -> list[Case]:
    """Every case of every workload in ``config``, in workload order."""
    makers = {"needle": _needle, "agentic": _agentic, "rag": _rag}
    return [makers[w](tokenizer, config, i) for w in config.workloads
            for i in range(config.cases)]


def _chat(tokenizer, messages, tools=None, generation: bool = True) -> Prompt:
    p = tokenizer.encode_chat(messages, tools=tools, add_generation_prompt=generation)
    return Prompt(np.asarray(p.ids, np.int32), tuple(p.anchors))


def _header(rng: random.Random) -> str:
    return (f"Current time: 2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}. "
            f"Session {rng.randrange(16**6):06x}.")


_NAMES = ("atlas", "lumen", "quarry", "tessel", "vireo", "orchid", "basalt", "cinder")


def _needle(tokenizer, config: WorkloadConfig, index: int) -> Case:
    rng = random.Random(f"irminsul-quality:needle:{config.seed}:{index}")
    key = f"{rng.choice(_NAMES)}-{rng.randint(10, 99)}"
    value = f"{rng.choice(_NAMES).upper()}-{rng.randint(1000, 9999)}"
    docs = [_document(rng, config.doc_tokens) for _ in range(config.docs)]
    where = rng.randrange(config.docs)
    title, text = docs[where]
    half = len(text) // 2
    cut = text.rfind("\n\n", 0, half) if "\n\n" in text[:half] else half
    docs[where] = (title, (f"{text[:cut]}\n\nThe access code for project {key} is {value}."
                          f"{text[cut:]}"))
    order = list(range(config.docs))
    before = _docs_prompt(tokenizer, _header(rng), [docs[i] for i in order], None)
    while order == sorted(order):
        rng.shuffle(order)
    question = f"What is the access code for project {key}? Answer with the code only."
    after = _docs_prompt(tokenizer, _header(rng), [docs[i] for i in order], question)
    return Case("needle", f"needle-{index}", (before,), after, value)


def _document(rng: random.Random, tokens: int) -> tuple[str, str]:
    """(title, text): stdlib docstring prose clipped to ``tokens`` words."""
    words = content.prose(rng, tokens).split(" ")
    return f"Notes on {rng.choice(_NAMES)} {rng.randint(1, 999)}", " ".join(words[:tokens])


def _docs_prompt(tokenizer, header: str, docs, question: str | None) -> Prompt:
    system = f"{header}\nAnswer from the documents below."
    msgs = [{"role": "system", "content": system}]
    msgs += [{"role": "user", "content": f"# {title}\n\n{text}"} for title, text in docs]
    if question is not None:
        msgs.append({"role": "user", "content": question})
    return _chat(tokenizer, msgs, generation=question is not None)


def _session(family: str, config: WorkloadConfig, index: int, **sizes) -> list[dict]:
    """The request bodies (OpenAI shape) of one seeded trace session, turn by turn."""
    trace = TraceConfig.preset(family, sessions=1, turns=config.turns, seed=config.seed + index,
                               **sizes)
    return [r.body for r in generate(trace)]


def _agentic(tokenizer, config: WorkloadConfig, index: int) -> Case:
    family = AGENTIC_FAMILIES[index % len(AGENTIC_FAMILIES)]
    n = config.doc_tokens
    sizes = {"tools": 2, "tool_desc_tokens": 20, "skills": 2, "skill_tokens": n,
             "memory_tokens": n // 2, "tool_tokens": n, "context_budget": 2 * n,
             "header_tokens": 40 if family == "header" else 0, "keep_recent": 1}
    bodies = _session(family, config, index, **sizes)
    prompts = [_chat(tokenizer, b["messages"], tools=b.get("tools")) for b in bodies]
    return Case("agentic", f"agentic-{family}-{index}", tuple(prompts[:-1]), prompts[-1], None)


def _rag(tokenizer, config: WorkloadConfig, index: int) -> Case:
    bodies = _session("rag", replace(config, turns=2), index, docs=config.docs,
                      rag_corpus=config.docs, doc_tokens=config.doc_tokens, tools=1,
                      tool_desc_tokens=20, skills=1, skill_tokens=40, memory_tokens=0)
    prompts = [_chat(tokenizer, b["messages"], tools=b.get("tools")) for b in bodies]
    return Case("rag", f"rag-{index}", tuple(prompts[-2:-1]), prompts[-1], None)
