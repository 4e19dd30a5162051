"""Why a checkpoint misses retrieval prompts: each miss classed as a distractor's value (the
prompt's other facts), a near copy of the right value (same word or same number), or other.

    python bench/retrieval_misses.py [--model DIR] [--prompts 30] [--tokens 2048]

Runs on the CPU in float32 with transformers' own forward (skill_eval.greedy), on the first
prompts of the evaluation's own stream (the same seed as train_model.py's figures).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import torch

import irminsul
from irminsul.chunking.tokenizer import ModelTokenizer
from irminsul.engine_adapter.embedded import skill_eval


def classify(answer: str, said: str, text: str) -> str:
    if said.startswith(answer):
        return "right"
    if any(said.startswith(v) for v in skill_eval.VALUE_RE.findall(text) if v != answer):
        return "distractor"
    word, num = answer.split("-")
    if said.startswith(word) or num in said[:16]:
        return "near copy"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=irminsul.SHIPPED_MODEL_DIR)
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=2048)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    tok = ModelTokenizer.from_dir(a.model)
    stop = tuple(json.loads((a.model / "generation_config.json").read_text())["eos_token_id"])
    cfg = skill_eval.SkillEvalConfig(retrieval_tokens=a.tokens)
    rng = random.Random(f"irminsul-skill-eval:{cfg.seed}")  # retrieval_accuracy's stream
    by_facts: dict[int, Counter] = {}
    for i in range(a.prompts):
        p = skill_eval.retrieval_messages(rng, tok, a.tokens)
        ids = tok.encode_chat(p.messages, add_generation_prompt=True).ids
        said = tok.decode(skill_eval.greedy(model, [int(t) for t in ids], 12, stop)).strip()
        text = " ".join(m["content"] for m in p.messages)
        facts = len(set(skill_eval.VALUE_RE.findall(text)))
        kind = classify(p.answer, said, text)
        by_facts.setdefault(facts, Counter())[kind] += 1
        print(f"{i:3d} facts {facts}  {kind:<10} want {p.answer:<16} said {said[:24]!r}")
    print(f"\n# {a.model.name}, {a.prompts} prompts of ~{a.tokens} tokens; by number of facts:")
    for facts in sorted(by_facts):
        c = by_facts[facts]
        print(f"  {facts} facts: " + ", ".join(f"{k} {c[k]}" for k in
                                               ("right", "distractor", "near copy", "other")))
    total = sum(by_facts.values(), Counter())
    print("  all:     " + ", ".join(f"{k} {total[k]}" for k in
                                   ("right", "distractor", "near copy", "other")))


if __name__ == "__main__":
    main()
