"""Warm turns give exactly what a cold tokenizer gives: token IDs, anchors, message starts and
chunk keys, over chains of random agent turns (appends, edits in the middle, reordered and
dropped messages, tool calls, changed tools), with the tiny and DeepSeek tokenizers.

The warm side keeps every cache (piece cache, recent prompts, the last chat alignment, the
chunk reuse); the reference clears its caches before every call."""

import copy
import random

import numpy as np
import pytest
from support.conversations import TOOLS, random_conversation, random_text
from support.tokenizer_dirs import TINY, deepseek_dir

from irminsul.chunking.chat import normalize_messages
from irminsul.chunking.chat_formats import DEEPSEEK_V3_STYLE
from irminsul.chunking.keys import Chunker
from irminsul.chunking.reuse import ReusingChunker
from irminsul.chunking.tokenizer import ModelTokenizer

TINY_SPECIALS = ("<|user|>", "<|end|>", "<|assistant|>")
DS_SPECIALS = ("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>")


def _load(which: str) -> ModelTokenizer:
    if which == "tiny":
        return ModelTokenizer.from_dir(TINY)
    return ModelTokenizer.from_dir(deepseek_dir(), chat_template=DEEPSEEK_V3_STYLE)


def _next_turn(rng: random.Random, msgs: list[dict], tools, specials):
    """An agent's next request: mostly the same messages plus new ones, sometimes edited."""
    msgs = copy.deepcopy(msgs)
    r = rng.random()
    if r < 0.45 or len(msgs) < 3:  # new turn(s) appended
        more, _ = random_conversation(rng, specials, 4)
        msgs += [m for m in more if m["role"] != "system"]
    elif r < 0.6:  # the last message replaced (a retried or edited last turn)
        msgs[-1] = {"role": "user", "content": random_text(rng, specials)}
    elif r < 0.72:  # a message in the middle edited (a few chars)
        i = rng.randrange(len(msgs))
        c = msgs[i].get("content")
        if isinstance(c, str) and c:
            p = rng.randrange(len(c))
            msgs[i]["content"] = c[:p] + rng.choice(["x", "", "\n# New\n", " "]) + c[p + 1 :]
        else:
            msgs[i]["content"] = random_text(rng, specials, 3)
    elif r < 0.82:  # two messages swapped (reordered history)
        i, j = sorted(rng.sample(range(len(msgs)), 2))
        msgs[i], msgs[j] = msgs[j], msgs[i]
    elif r < 0.9:  # history compacted: a middle message dropped
        del msgs[rng.randrange(1, len(msgs) - 1)]
    else:  # tools switched on or off
        tools = None if tools else TOOLS
    if msgs[-1]["role"] == "system":
        msgs.append({"role": "user", "content": "go"})
    return msgs, tools


@pytest.mark.parametrize("which", ["tiny", "deepseek"])
def test_warm_turns_equal_cold_encoding_and_chunks(which):
    from transformers import AutoTokenizer

    warm, cold = _load(which), _load(which)
    # module-level memos (parsed tool arguments and their tojson) are shared by both sides:
    # transformers' own rendering is the reference the text is held to
    hf = AutoTokenizer.from_pretrained(TINY if which == "tiny" else deepseek_dir())
    template = DEEPSEEK_V3_STYLE if which == "deepseek" else None
    specials = TINY_SPECIALS if which == "tiny" else DS_SPECIALS
    chunker = Chunker()
    reuse = ReusingChunker(keep=4)
    rng = random.Random(2026)
    compared = 0
    for conv in range(8):
        msgs, tools = random_conversation(rng, specials, 10)
        for _ in range(12):
            try:
                want = (cold.clear_cache(), cold.encode_chat(msgs, tools=tools))[1]
            except Exception as e:  # noqa: BLE001 - the warm side must fail the same way
                with pytest.raises(type(e)):
                    warm.encode_chat(msgs, tools=tools)
            else:
                got = warm.encode_chat(msgs, tools=tools)
                assert got.text == want.text == hf.apply_chat_template(
                    normalize_messages(msgs),
                    tools=tools,
                    tokenize=False,
                    add_generation_prompt=True,
                    chat_template=template,
                )
                assert np.array_equal(got.ids, want.ids)
                assert got.anchors == want.anchors, (conv, msgs)
                assert got.message_starts == want.message_starts
                anchors = list(want.anchors)
                ref_chunks = chunker.split(want.ids, anchors=anchors, model_fingerprint="m")
                assert reuse.split(chunker, got.ids, anchors=anchors, model_fingerprint="m") == (
                    ref_chunks
                )
                compared += 1
            msgs, tools = _next_turn(rng, msgs, tools, specials)
    assert compared >= 80
    assert reuse.reused_chunks > 0


@pytest.mark.parametrize("which", ["tiny", "deepseek"])
def test_chars_to_tokens_equals_char_to_token(which):
    tok = _load(which)
    specials = TINY_SPECIALS if which == "tiny" else DS_SPECIALS
    rng = random.Random(4)
    for _ in range(20):
        text = random_text(rng, specials)
        enc = tok._pieces.encode(text)
        starts = [p.start for p in enc.pieces]
        positions = sorted(rng.sample(range(len(text) + 1), min(30, len(text) + 1)) + starts)
        assert enc.chars_to_tokens(positions) == [enc.char_to_token(p) for p in positions]
