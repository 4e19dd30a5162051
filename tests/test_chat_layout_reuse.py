"""chat_layout's reuse of the last call (alignment.py's shared-head walk, anchors.py's settled
starts) gives exactly what a call without it gives, with the same header book, over chains of
random agent turns and the templates that make the layout work hardest."""

import random

import pytest
from support.conversations import REASONING_SPECIALS as SPECIALS
from support.conversations import next_turn, random_conversation
from support.tokenizer_dirs import TINY, deepseek_dir
from test_chat_template import VARIANTS

from irminsul.chunking import alignment, anchors
from irminsul.chunking.anchors import RenderMemo, chat_layout
from irminsul.chunking.chat import ChatTemplateError
from irminsul.chunking.chat_formats import DEEPSEEK_V3_STYLE
from irminsul.chunking.tokenizer import ModelTokenizer


def _tokenizer(which: str) -> ModelTokenizer:
    if which == "deepseek":
        return ModelTokenizer.from_dir(deepseek_dir(), chat_template=DEEPSEEK_V3_STYLE)
    return ModelTokenizer.from_dir(TINY, chat_template=VARIANTS.get(which))


def _clone(book: anchors.HeaderBook) -> anchors.HeaderBook:
    out = anchors.HeaderBook(book.max_headers, book.max_glues, book.max_glue_chars)
    out._by_role = {k: list(v) for k, v in book._by_role.items()}
    out._glues = dict(book._glues)
    return out


@pytest.mark.parametrize("which", ["tiny", "deepseek", *sorted(VARIANTS)])
def test_reused_layout_equals_a_fresh_one(which, monkeypatch):
    tok = _tokenizer(which)
    reused = {"starts": 0, "entries": 0}
    settled_head, reusable = anchors._settled_head, alignment._reusable

    def count_starts(*a):
        r = settled_head(*a)
        reused["starts"] += r
        return r

    def count_entries(*a):
        k = reusable(*a)
        reused["entries"] += k
        return k

    monkeypatch.setattr(anchors, "_settled_head", count_starts)
    monkeypatch.setattr(alignment, "_reusable", count_entries)
    memo, book = RenderMemo(), anchors.HeaderBook()
    rng = random.Random(17)
    for _ in range(25):
        msgs, tools = random_conversation(rng, SPECIALS, 12)
        for _ in range(6):
            try:
                name, norm, variables, render, text, _, agp = tok._chat(
                    msgs, tools, True, False, None, {}
                )
            except ChatTemplateError:  # a late system message the template refuses
                msgs, tools = next_turn(rng, msgs, tools)
                continue

            def key(name=name, variables=variables):
                return repr((name, variables)).encode()

            fresh_book = _clone(book)  # what the reusing call starts from, too
            want = chat_layout(render, norm, text, agp, fresh_book, RenderMemo(), key)
            got = chat_layout(render, norm, text, agp, book, memo, key)
            # the exact path (a template the walk cannot follow) memoises what each prefix
            # of the messages renders to and checks it against this call's text: a late
            # system message that changes the text's head must change its anchors too
            assert got == want, (which, len(norm), want.exact)
            msgs, tools = next_turn(rng, msgs, tools)
    if which in ("tiny", "deepseek", "llama_like"):  # templates the alignment walks
        assert reused["starts"] > 300 and reused["entries"] > 300, reused
