"""ModelTokenizer: loading, piece-wise == whole-string encoding (shipped tiny tokenizer and
DeepSeek's real 129K one), the self-check fallback, prompt specials, decoding, the cache."""

import json
import platform
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.conversations import WORDS, random_text
from support.tokenizer_dirs import TINY, deepseek_dir
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

import irminsul
from irminsul.chunking.added_tokens import AddedTokenSplitter
from irminsul.chunking.span_cache import SpanCache, SpanEncoding
from irminsul.chunking.tokenizer import ModelTokenizer, TokenizerConfig
from irminsul.examples.models.make_tokenizer import SPECIAL_TOKENS as SPECIALS

ROOT = Path(irminsul.__file__).parent


@pytest.fixture(scope="module")
def tiny():
    return ModelTokenizer.from_dir(TINY)


@pytest.fixture(scope="module")
def deepseek():
    return ModelTokenizer.from_dir(deepseek_dir())


def whole(tok: ModelTokenizer, text: str) -> list[int]:
    return tok._tok.encode(text, add_special_tokens=False).ids


# --- loading --------------------------------------------------------------------------------


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        ModelTokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        ModelTokenizer.from_dir(tmp_path)
    shutil.copy(TINY / "tokenizer.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json is missing"):
        ModelTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        ModelTokenizer.from_dir(tmp_path)


def test_config_is_checked():
    with pytest.raises(ValueError, match="final_assistant"):
        TokenizerConfig(final_assistant="drop")
    with pytest.raises(ValueError, match="cache"):
        TokenizerConfig(cache_entries=-1)


def test_shipped_tiny_tokenizer(tiny):
    assert tiny.vocab_size == 4096
    assert [tiny._tok.token_to_id(s) for s in SPECIALS] == list(range(10))
    assert tiny.bos_token_id == 0 and tiny.eos_token_ids == (1, 7)  # <|eos|>, <|end|>
    assert tiny.special_ids == frozenset(range(10))
    assert tiny.per_span and tiny.self_check_failure is None
    size = sum((TINY / f).stat().st_size for f in ("tokenizer.json", "tokenizer_config.json"))
    assert size < 400_000


def test_make_tokenizer_reproduces_the_shipped_files(tmp_path):
    # The corpus is this Python's stdlib, so only the same Python version can reproduce it.
    cfg = json.loads((TINY / "tokenizer_config.json").read_text())
    if cfg["irminsul_corpus"]["python"] != platform.python_version():
        pytest.skip(f"shipped files were trained on python {cfg['irminsul_corpus']['python']}")
    script = ROOT / "examples" / "models" / "make_tokenizer.py"
    subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), name


def test_deepseek_tokenizer_loads(deepseek):
    assert deepseek.vocab_size == 129280
    assert deepseek.bos_token_id == 0 and deepseek.eos_token_ids == (1,)
    assert deepseek.per_span, deepseek.self_check_failure
    assert deepseek.chat_template is None  # the package ships none (see chat_formats.py)
    assert deepseek._pieces._byte_len is not None  # byte-level: boundaries from a length table


# --- piece-wise encoding equals the library's whole-string encoding -------------------------


@pytest.mark.parametrize("which", ["tiny", "deepseek"])
def test_per_span_equals_whole_on_random_texts(which, request):
    tok = request.getfixturevalue(which)
    specials = (
        SPECIALS
        if which == "tiny"
        else (
            "<｜User｜>",
            "<｜Assistant｜>",
            "<｜end▁of▁sentence｜>",
            "<think>",
            "</think>",
            "<｜tool▁sep｜>",
            "<｜begin▁of▁sentence｜>",
            "<｜place▁holder▁no▁7｜>",
            "<dsml:",
        )
    )
    rng = random.Random(1234)
    tok.clear_cache()
    for i in range(400):
        text = random_text(rng, specials)
        # the second pass is served from the piece cache
        for _ in range(2):
            assert tok.encode(text).tolist() == whole(tok, text), (i, text)
    assert tok.cache_stats[1] > 0


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.sampled_from(SPECIALS + WORDS + (" ", "\n", "  ", "<|", "|>", "<|user", "|"))
        | st.text(max_size=8),
        max_size=25,
    )
)
def test_per_span_equals_whole_hypothesis(tiny, parts):
    text = "".join(parts) if isinstance(parts, list) else parts
    assert tiny.encode(text).tolist() == whole(tiny, text)


def test_splitter_is_leftmost_longest():
    sp = AddedTokenSplitter(
        [
            {"id": 1, "content": "<a>"},
            {"id": 2, "content": "<a>b"},
            {"id": 3, "content": "b<a"},
            {"id": 4, "content": "<"},
        ]
    )
    pieces = [(p.text, p.token_id) for p in sp.split("xb<a>b<a>y<")]
    assert pieces == [("x", -1), ("b<a", 3), (">", -1), ("b<a", 3), (">y", -1), ("<", 4)]
    assert [(p.text, p.token_id) for p in sp.split("<a>bc")] == [("<a>b", 2), ("c", -1)]


def _train(pre_tokenizer, normalizer=None, extra=()) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.Metaspace()
    corpus = [" ".join(random.Random(s).choices(WORDS[:12], k=40)) for s in range(50)]
    corpus.append("intro\n# Heading\nbody <mask> xy")
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["[UNK]", "<s>", "<sep>"], show_progress=False
        ),
    )
    tok.add_tokens(list(extra))
    return tok


def _model_dir(tmp_path: Path, tok: Tokenizer) -> Path:
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    return tmp_path


def test_self_check_falls_back_when_pieces_interact(tmp_path):
    # Metaspace "first" adds the word-start marker only at the very start of the input, so a
    # piece after an added token encodes differently on its own than inside the whole text.
    raw = _train(pre_tokenizers.Metaspace(prepend_scheme="first"))
    d = _model_dir(tmp_path, raw)
    text = "the agent<sep>the agent<s> x"
    assert (
        ModelTokenizer.from_dir(d, options=TokenizerConfig(self_check=False)).encode(text).tolist()
        != raw.encode(text, add_special_tokens=False).ids
    )  # piece-wise really is wrong here
    tok = ModelTokenizer.from_dir(d)
    assert not tok.per_span and tok.self_check_failure is not None
    rng = random.Random(7)
    for _ in range(100):
        t = random_text(rng, ("<s>", "<sep>"), 10)
        assert tok.encode(t).tolist() == raw.encode(t, add_special_tokens=False).ids
    text = "intro<sep>the agent\n# Heading\nbody"
    p = tok.encode_prompt(text)
    ref = raw.encode(text, add_special_tokens=False)
    assert p.ids.tolist() == ref.ids
    # the section starts at '#'; "agent\n#" is one token here, so the anchor is the next one
    a, sec = p.anchors[-1], text.index("#")
    assert ref.offsets[a][0] >= sec > ref.offsets[a - 1][0]
    assert tok._pieces._byte_len is None  # not byte-level: offsets map chars to tokens


def test_self_check_passes_with_metaspace_always_and_lstrip_tokens(tmp_path):
    raw = _train(pre_tokenizers.Metaspace(prepend_scheme="always"), normalizers.NFC())
    raw.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, normalized=False)])
    tok = ModelTokenizer.from_dir(_model_dir(tmp_path, raw))
    assert tok.per_span, tok.self_check_failure
    for t in ("a  <mask>  b", "<mask>", "x<mask>y", "the agent <sep> e\u0301"):
        assert tok.encode(t).tolist() == raw.encode(t, add_special_tokens=False).ids


def test_self_check_catches_a_splitter_that_disagrees(tmp_path, monkeypatch):
    # A splitter that cuts where the library does not (here at every "e", as if it were an
    # added token) gives other IDs; the check must notice and switch to whole strings.
    d = _model_dir(
        tmp_path, _train(pre_tokenizers.Metaspace(prepend_scheme="always"), extra=["<tool>"])
    )
    real_init = AddedTokenSplitter.__init__

    def inventive(self, tokens):
        real_init(self, [*tokens, {"id": 5, "content": "e"}])

    monkeypatch.setattr(AddedTokenSplitter, "__init__", inventive)
    tok = ModelTokenizer.from_dir(d)
    assert not tok.per_span and "e" in tok.self_check_failure
    for t in ("the agent<tool>e", "e", "<tool>"):
        assert tok.encode(t).tolist() == tok._tok.encode(t, add_special_tokens=False).ids


# --- prompts, decoding, cache ---------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "deepseek"])
def test_encode_prompt_matches_transformers(which, request):
    from transformers import AutoTokenizer

    tok = request.getfixturevalue(which)
    hf = AutoTokenizer.from_pretrained(TINY if which == "tiny" else deepseek_dir())
    for text in ("hello world", "", "<|user|>hi<|end|>", "多语言 text\n\n# h\n", "x" * 50):
        assert tok.encode_prompt(text).ids.tolist() == hf(text)["input_ids"], text
    assert tok.encode_prompt("hi").ids[0] == (0 if which == "tiny" else 6366)


def test_encode_prompt_anchors(tiny):
    text = "<|user|>q<|end|>\n<|assistant|>a\n## Plan\nstep<|end|>"
    p = tiny.encode_prompt(text)
    assert p.message_starts == () and p.text == text
    got = [tiny.decode(p.ids[a:], skip_special_tokens=False) for a in p.anchors]
    assert got[0].startswith("<|user|>") and got[-1].startswith("<|end|>")
    assert any(g.startswith("<|end|>\n<|assistant|>") for g in got)
    assert any(g.startswith("## Plan") for g in got)
    assert all(0 < a < len(p.ids) for a in p.anchors)


def test_char_to_token_moves_to_the_next_boundary(tiny):
    text = "<|user|>internationalization"
    enc = tiny._pieces.encode(text)
    n_ids = len(enc.ids)
    assert n_ids >= 3  # <|user|> and at least two pieces of the word
    first_len = len(tiny.decode(enc.ids[1:2]))
    assert enc.char_to_token(8) == 1  # piece start
    assert enc.char_to_token(9) == 2  # inside the first word token: the next token
    assert enc.char_to_token(8 + first_len) == 2
    assert enc.char_to_token(3) == 1  # inside the added token
    assert enc.char_to_token(len(text)) == n_ids


@pytest.mark.parametrize("which", ["tiny", "deepseek"])
def test_char_to_token_agrees_with_library_offsets(which, request):
    # Byte-level vocabularies map chars to tokens with a byte-length table, not offsets;
    # the result must be the library's: the first token starting at or after the char.
    tok = request.getfixturevalue(which)
    assert tok._pieces._byte_len is not None
    rng = random.Random(8)
    for _ in range(60):
        text = random_text(rng, SPECIALS if which == "tiny" else ("<｜User｜>",))
        enc = tok._pieces.encode(text)
        starts = [s for s, _ in tok._tok.encode(text, add_special_tokens=False).offsets]
        for pos in range(len(text) + 1):
            want = next((i for i, s in enumerate(starts) if s >= pos), len(starts))
            assert enc.char_to_token(pos) == want, (text, pos)


@pytest.mark.parametrize("rust", [True, False])
def test_stream_decoder(tiny, deepseek, rust):
    from irminsul.chunking.stream import StreamDecoder

    for tok in (tiny, deepseek):
        text = "Résumé: 日本語 🙂👍🏽 done.\n  x"
        ids = tok.encode(text).tolist()
        dec = StreamDecoder(tok._tok, use_rust=rust)
        assert dec.uses_rust == rust
        parts = [dec.step(i) for i in ids]
        assert "".join(parts) == tok.decode(ids) == text
        assert any(p == "" for p in parts)  # some tokens end inside a character
    dec = tiny.stream_decoder()
    assert dec.step(0) == "" and dec.step(tiny.encode("hi")[0]) != ""  # <|bos|> skipped


def test_decode_keeps_or_skips_specials(tiny):
    ids = tiny.encode("<|user|>hi<|end|>")
    assert tiny.decode(ids) == "hi"
    assert tiny.decode(ids, skip_special_tokens=False) == "<|user|>hi<|end|>"


def test_span_cache_bounds():
    e = SpanEncoding(np.zeros(1, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32), None)
    c = SpanCache(max_entries=3, max_chars=10)
    for k in ("a", "bb", "ccc", "dddd"):
        c.put(k, e)
    assert len(c) == 3 and c.get("a") is None and c.get("dddd") is e
    c.put("eeeeeeeee", e)  # 9 chars: evicts until <= 10
    assert c.get("eeeeeeeee") is e and c.get("bb") is None and c._chars <= 10
    c.put("x" * 11, e)  # longer than the whole budget: not kept
    assert c.get("x" * 11) is None


def test_cache_serves_resent_pieces():
    tok = ModelTokenizer.from_dir(TINY, options=TokenizerConfig(recent_prompts=0))
    text = "<|system|>" + "long system prompt " * 50 + "<|end|>\n<|user|>q1"
    tok.encode(text)
    entries, hits, misses = tok.cache_stats
    assert (entries, hits, misses) == (3, 0, 3)
    tok.encode(text.replace("q1", "q2"))
    assert tok.cache_stats == (4, 2, 4)  # only the new question is encoded


@pytest.mark.parametrize("which", ["tiny", "deepseek"])
def test_prefix_reuse_after_random_edits(which, request):
    # The next prompt shares a prefix with a recent one: pieces before a safe split point
    # are reused. Edits land anywhere (inside added tokens, next to them, at the end).
    tok = request.getfixturevalue(which)
    specials = (
        SPECIALS if which == "tiny" else ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")
    )
    rng = random.Random(11)
    tok.clear_cache()
    base = "".join(random_text(rng, specials) for _ in range(6))
    assert len(base) > 600
    reused = 0
    for i in range(300):
        cut = rng.randrange(len(base) + 1)
        edit = rng.choice(
            ["", rng.choice(specials), random_text(rng, specials, 4), specials[0][:3]]
        )
        text = base[:cut] + edit + (base[cut:] if rng.random() < 0.5 else "")
        found = tok._pieces.recent.best(text)
        reused += found is not None and tok._pieces._reusable(*found) > 0
        enc = tok._pieces.encode(text)
        assert enc.ids.tolist() == whole(tok, text), (i, cut, edit)
        fresh = tok._pieces.encode(text, use_cache=False)  # no piece cache, no reuse
        for a, b in zip(enc.section_tokens(), fresh.section_tokens()):
            assert a.tolist() == b.tolist()
        for pos in rng.sample(range(len(text) + 1), min(20, len(text) + 1)):
            assert enc.char_to_token(pos) == fresh.char_to_token(pos)
        if rng.random() < 0.3 and len(text) > 600:
            base = text
    assert reused > 80  # cuts inside the first 512 chars (the head) cannot reuse


def test_common_prefix():
    from irminsul.chunking.recent import common_prefix

    rng = random.Random(2)
    for _ in range(500):
        a = "".join(rng.choices("ab", k=rng.randrange(0, 9000)))
        n = rng.randrange(len(a) + 1)
        b = a[:n] + "".join(rng.choices("abc", k=rng.randrange(0, 50)))
        want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == want


def test_encode_rejects_non_text(tiny):
    with pytest.raises(TypeError, match="must be a str"):
        tiny.encode(b"bytes")
    with pytest.raises(ValueError, match="lone UTF-16 surrogate"):
        tiny.encode_chat([{"role": "user", "content": "bad \ud800 text"}])
