"""The shipped model's training rows (examples/models/train_data.py): retrieval prompts tokenized
exactly as the chat template renders the whole conversation, loss on the answers only, and a
failing sample worker stops the run instead of leaving it to train on text alone."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from irminsul.engine_adapter.embedded.skill_eval import VALUE_RE, retrieval_messages

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
sys.path.insert(0, str(MODELS))
import train_data

TOKENIZER = MODELS / "tiny-mla"


@pytest.fixture(scope="module")
def tok():
    train_data._init(str(TOKENIZER))
    return train_data._TOKENIZER


@pytest.mark.parametrize("facts,questions,drill", [(4, 1, None), (8, 4, None),
                                                   (8, 8, train_data.Drill())])
def test_retrieval_rows_are_the_rendered_conversation(tok, facts, questions, drill):
    asked_more = 0
    limit = 2049 if drill is None else drill.max_tokens
    extra = {} if drill is None else {"doc_words": drill.doc_words}
    for seed in range(12):
        ids, w = train_data._retrieval_sample(random.Random(seed), limit, facts, questions,
                                              **extra)
        rng = random.Random(seed)  # the same draws, rebuilt as one chat and rendered whole
        target = rng.randint(min(200, limit // 2), limit - train_data.room_after(questions))
        n = rng.randint(1, questions) if questions > 1 else 1
        p = retrieval_messages(rng, tok, target, facts=(1, facts), questions=n, **extra)
        chat = [*p.messages, {"role": "assistant", "content": p.answer}]
        for q, a in p.followups:
            chat += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        whole = tok.encode_chat(chat, add_generation_prompt=False).ids
        assert list(ids) == list(whole[:limit])
        # loss weight 5 on exactly the answers (and their end markers), 1 elsewhere
        answers = [p.answer, *(a for _, a in p.followups)]
        assert list(ids[w == 5]) == [t for a in answers for t in tok.encode(f"{a}<|end|>\n")]
        assert set(np.unique(w)) <= {1.0, 5.0}
        # every answer is a value stated in the prompt, and the questions differ
        prompt = " ".join(m["content"] for m in p.messages)
        assert all(a in VALUE_RE.findall(prompt) for a in answers)
        assert len({q for q, _ in p.followups} | {p.messages[-1]["content"]}) == len(answers)
        asked_more += bool(p.followups)
        if questions == 1:
            assert p.followups == ()
            assert len(set(VALUE_RE.findall(prompt))) <= 4
    if questions > 1:
        assert asked_more > 0


def test_drills_are_dense(tok):
    """A drill asks several questions in a few hundred tokens: more answers per token read
    than the evaluation's prompts (what it is for)."""
    rng, drill = random.Random(0), train_data.Drill()
    dense, sparse = [], []
    for _ in range(20):
        ids, w = train_data._retrieval_sample(rng, drill.max_tokens, drill.facts,
                                              drill.questions, drill.doc_words)
        dense.append(((w == 5).sum(), len(ids)))
        ids, w = train_data._retrieval_sample(rng, 2049, 4, 1)
        sparse.append(((w == 5).sum(), len(ids)))
    per_token = [sum(a for a, _ in x) / sum(n for _, n in x) for x in (dense, sparse)]
    assert per_token[0] > 3 * per_token[1]


def test_a_failing_sample_worker_fails_take(tok):
    # rows of 50 tokens leave no room for a retrieval prompt: every worker job raises
    pool = train_data.ChatPool(TOKENIZER, {50: 1}, seed=0, workers=1, pad_id=0,
                               retrieval_share=1.0)
    try:
        deadline = time.monotonic() + 60
        while pool.error is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(RuntimeError, match="chat sample workers failed"):
            pool.take(50)
    finally:
        pool.close()
