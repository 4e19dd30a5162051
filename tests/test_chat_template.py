"""Chat rendering against transformers, message normalisation, and the anchors of encode_chat
(message starts checked against the prefix definition: render(messages[:i]) ends there)."""

import random

import pytest
from support.conversations import TOOLS, random_conversation
from support.tokenizer_dirs import TINY, deepseek_dir

from irminsul.chunking.anchors import HeaderBook, RenderMemo, chat_layout
from irminsul.chunking.chat import ChatTemplate, ChatTemplateError, normalize_messages
from irminsul.chunking.chat_formats import DEEPSEEK_V3_STYLE
from irminsul.chunking.tokenizer import ModelTokenizer, TokenizerConfig

TINY_SPECIALS = ("<|user|>", "<|end|>", "<|assistant|>", "<|tool_call|>", "<|bos|>")
DS_SPECIALS = (
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜end▁of▁sentence｜>",
    "<think>",
    "<｜tool▁sep｜>",
)


@pytest.fixture(scope="module")
def tiny():
    return ModelTokenizer.from_dir(TINY)


@pytest.fixture(scope="module")
def deepseek():
    return ModelTokenizer.from_dir(deepseek_dir(), chat_template=DEEPSEEK_V3_STYLE)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    return {
        "tiny": AutoTokenizer.from_pretrained(TINY),
        "deepseek": AutoTokenizer.from_pretrained(deepseek_dir()),
    }


def exact_starts(tok, msgs, tools, text):
    """Token offset of every message start by the prefix definition (None where the
    template's prefix render is not a prefix of the whole render)."""
    name = tok.chat_template.select(tools)
    variables = {**tok._vars, "tools": tools, "documents": None}
    enc = tok._pieces.encode(text)
    out = [0]
    for i in range(1, len(msgs) + 1):
        r = tok.chat_template.render(name, msgs[:i], {**variables, "add_generation_prompt": False})
        out.append(enc.char_to_token(len(r)) if text.startswith(r) else None)
    return out[:-1], out[-1]


@pytest.mark.parametrize("which", ["tiny", "deepseek"])
def test_random_conversations_match_transformers_and_prefix_starts(which, request, hf):
    tok = request.getfixturevalue(which)
    ref = hf[which]
    template = DEEPSEEK_V3_STYLE if which == "deepseek" else None
    specials = TINY_SPECIALS if which == "tiny" else DS_SPECIALS
    rng = random.Random(99)
    checked = 0
    tok.clear_cache()
    for k in range(60):
        messages, tools = random_conversation(rng, specials)
        msgs = normalize_messages(messages)
        for _ in range(2):  # cold, then served from the piece cache and learned headers
            p = tok.encode_chat(messages, tools=tools)
            assert p.text == ref.apply_chat_template(
                msgs,
                tools=tools,
                tokenize=False,
                add_generation_prompt=True,
                chat_template=template,
            )
            assert p.ids.tolist() == ref.apply_chat_template(
                msgs,
                tools=tools,
                add_generation_prompt=True,
                chat_template=template,
                return_dict=False,
            )
            assert p.ids.tolist() == ref(p.text, add_special_tokens=False)["input_ids"]
            starts, gen = exact_starts(tok, msgs, tools, p.text)
            assert len(p.message_starts) == len(messages) and p.message_starts[0] == 0
            for i, (got, want) in enumerate(zip(p.message_starts, starts)):
                if want is not None:
                    assert got == want, (k, i, p.text)
                    checked += 1
            assert list(p.message_starts) == sorted(set(p.message_starts))  # never shared
            assert set(p.message_starts[1:]) <= set(p.anchors)
            if gen is not None and gen < len(p.ids):
                assert gen in p.anchors
    assert checked > 300


def test_sections_are_anchored_inside_content_only(tiny):
    system = "intro\n# Rules\nbe nice\n<env>\nx\n</env>\n---\nend\n#nospace"
    p = tiny.encode_chat(
        [{"role": "system", "content": system}, {"role": "user", "content": "q\n## Step 1\ndo"}],
        tools=TOOLS,
    )
    starts = {tiny.decode(p.ids[a : a + 3], skip_special_tokens=False) for a in p.anchors}
    heads = [tiny.decode(p.ids[a:], skip_special_tokens=False) for a in p.anchors]
    for line in ("# Rules", "<env>", "</env>", "---\nend", "## Step 1"):
        assert sum(h.startswith(line) for h in heads) == 1, (line, starts)
    assert not any(h.startswith(("#nospace", "# Tools")) for h in heads)
    assert "\n# Tools\n" in p.text  # the template's own heading is glue, not a section
    # ... but the tool block (>= TEMPLATE_BLOCK_TOKENS of glue) is a segment of its own:
    # a boundary where the system content ends, and none where a user content ends
    ends = [tiny.decode(p.ids[:a], skip_special_tokens=False) for a in p.anchors]
    assert sum(e.endswith("#nospace") for e in ends) == 1
    assert not any(e.endswith("do") for e in ends)


def test_warm_turn_only_encodes_the_new_message(deepseek):
    rng = random.Random(5)
    messages, tools = random_conversation(rng, (), 10)
    deepseek.encode_chat(messages, tools=tools)
    _, hits, misses = deepseek.cache_stats
    new = messages + [{"role": "user", "content": "a brand new question, never seen"}]
    p = deepseek.encode_chat(new, tools=tools)
    _, hits2, misses2 = deepseek.cache_stats
    assert misses2 - misses == 1 and hits2 > hits
    assert p.ids.tolist() == deepseek._tok.encode(p.text, add_special_tokens=False).ids


# --- templates that make the fast path work harder -------------------------------------------

ROLE = "{{ m['role'] }}"
VARIANTS = {
    # headers with no added tokens: starts fall inside cached pieces
    "llama_like": "{% for m in messages %}<|start_header_id|>" + ROLE + "<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}",
    # content stripped by the template
    "trim": "{% for m in messages %}<|user|>" + ROLE + ":{{ m['content'] | trim }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    # empty content changes the glue: the sentinel pass with empty contents fails
    "falsy": "{% for m in messages %}<|user|>" + ROLE + "{% if m['content'] %}: {{ m['content'] }}"
    "{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    # branches on the content itself: only exact prefix renders work
    "branchy": "{% for m in messages %}{% if 'agent' in m['content'] %}[A]{% endif %}<|user|>"
    + ROLE
    + "{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    # drops system messages entirely
    "no_system": "{% for m in messages if m['role'] != 'system' %}<|user|>"
    + ROLE
    + "{{ m['content'] }}<|end|>{% endfor %}",
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_template_variants_give_prefix_starts(variant):
    tok = ModelTokenizer.from_dir(TINY, chat_template=VARIANTS[variant])
    rng = random.Random(3)
    checked = 0
    for k in range(25):
        messages, _ = random_conversation(rng, ("<|end|>",), 8)
        messages = [
            {**m, "content": m["content"] if k % 3 else ""} if m["role"] == "assistant" else m
            for m in messages
        ]
        msgs = normalize_messages(messages)
        for _ in range(2):
            p = tok.encode_chat(messages)
            assert p.ids.tolist() == tok._tok.encode(p.text, add_special_tokens=False).ids
            starts, _ = exact_starts(tok, msgs, None, p.text)
            for i, (got, want) in enumerate(zip(p.message_starts, starts)):
                if want is not None:
                    assert got == want, (variant, k, i)
                    checked += 1
    assert checked > 60


def test_layout_modes():
    tmpl = ChatTemplate(VARIANTS["branchy"])
    msgs = normalize_messages(
        [{"role": "user", "content": "the agent"}, {"role": "assistant", "content": "ok"}]
    )

    def render(m, gen):
        return tmpl.render("default", m, {"add_generation_prompt": gen})

    text = render(msgs, True)
    lay = chat_layout(render, msgs, text, True, HeaderBook(), RenderMemo(), lambda: b"k")
    assert lay.exact and lay.contents == (None, None)
    assert lay.message_starts == (0, len(render(msgs[:1], False)))
    assert lay.generation_start == len(render(msgs, False))
    msgs[0]["content"] = "plain"
    text = render(msgs, True)
    lay = chat_layout(render, msgs, text, True, HeaderBook(), RenderMemo(), lambda: b"k")
    assert not lay.exact and text[slice(*lay.contents[1])] == "ok"


# --- rendering environment and normalisation -------------------------------------------------

FEATURES = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}{%- if loop.index > 2 %}{% break %}{% endif -%}
{%- generation -%}
[{{ m.role }}] {{ m.content | tojson }} {{ m | tojson(indent=2) }}
{%- endgeneration -%}
{%- set ns.n = ns.n + 1 -%}
{%- endfor -%} {{ ns.n }} {{ bos_token }}{{ eos_token }} <b>&"</b>
{%- if tools %}{{ tools | tojson }}{% endif -%}"""


def test_environment_features_match_transformers(tiny, hf):
    msgs = normalize_messages(
        [
            {"role": "user", "content": 'é <tag> "q"'},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "z"},
        ]
    )
    tok = ModelTokenizer.from_dir(TINY, chat_template=FEATURES)
    mine = tok.apply_chat_template(msgs, tools=TOOLS)
    assert mine == hf["tiny"].apply_chat_template(
        msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True, chat_template=FEATURES
    )
    assert "\\u" not in mine and "&amp;" not in mine and '}2 <|bos|><|eos|> <b>&"</b>' in mine


def test_raise_exception_and_bad_input(tiny):
    with pytest.raises(ChatTemplateError, match="unknown role: robot"):
        tiny.encode_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="system message must be the first"):
        tiny.encode_chat([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}])
    for bad, msg in (
        ([], "non-empty list"),
        ([{"content": "x"}], "role"),
        ([{"role": "user", "content": 5}], "content must be"),
        (["hi"], "must be an object"),
    ):
        with pytest.raises(ChatTemplateError, match=msg):
            tiny.encode_chat(bad)
    with pytest.raises(ChatTemplateError, match="tools must be a list"):
        tiny.encode_chat([{"role": "user", "content": "x"}], tools={"a": 1})
    with pytest.raises(ChatTemplateError, match="'documents' cannot be passed"):
        tiny.encode_chat([{"role": "user", "content": "x"}], documents=[])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ModelTokenizer.from_dir(deepseek_dir()).encode_chat([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_normalize_messages():
    src = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url"},
                {"type": "text", "text": "b"},
            ],
            "name": None,
        },
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "think",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"x": [1, 2]}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "out"}]},
    ]
    out = normalize_messages(src)
    assert out[0] == {"role": "user", "content": "a b"}
    assert out[1]["content"] == "" and out[1]["thinking"] == "think"
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"x": [1, 2]}
    assert out[2] == {"role": "tool", "tool_call_id": "c1", "content": "out"}
    assert src[1]["tool_calls"][0]["function"]["arguments"] == '{"x": [1, 2]}'  # untouched
    kept = normalize_messages(src, parse_arguments=False, content_parts=True)
    assert kept[1]["tool_calls"][0]["function"]["arguments"] == '{"x": [1, 2]}'
    assert kept[0]["content"][1] == {"type": "image_url"}
    for args, msg in (("{bad", "not valid JSON"), ("[1]", "must be a JSON object")):
        bad = [
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": args}}]}
        ]
        with pytest.raises(ChatTemplateError, match=msg):
            normalize_messages(bad)


def test_named_templates_and_content_parts_detection():
    t = ChatTemplate.from_config(
        [
            {"name": "default", "template": "D{{ messages|length }}"},
            {"name": "tool_use", "template": "T"},
        ]
    )
    assert t.select(None) == "default" and t.select([{"x": 1}]) == "tool_use"
    assert t.select(None, "tool_use") == "tool_use"
    with pytest.raises(ChatTemplateError, match="no chat template named"):
        t.select(None, "nope")
    with pytest.raises(ChatTemplateError, match="no default"):
        ChatTemplate({"tool_use": "T"}).select(None)
    parts = ChatTemplate(
        "{% for message in messages %}{% for c in message['content'] %}"
        "{{ c.text }}{% endfor %}{% endfor %}"
    )
    assert parts.content_parts["default"] and not t.content_parts["default"]


def test_tool_use_template_is_picked_by_encode_chat(tmp_path, tiny):
    import json
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / f, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [
        {"name": "default", "template": cfg["chat_template"]},
        {"name": "tool_use", "template": "TOOLS{{ tools|length }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = ModelTokenizer.from_dir(tmp_path)
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs, tools=TOOLS) == "TOOLS2"
    assert tok.apply_chat_template(msgs) == tiny.apply_chat_template(msgs)


def test_continue_final_message_and_final_assistant(tiny):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is"}]
    p = tiny.encode_chat(msgs, continue_final_message=True)
    head = tiny.encode_chat(msgs[:1])
    assert p.text == head.text + "The answer is"
    assert p.ids.tolist() == head.ids.tolist() + tiny.encode("The answer is").tolist()
    assert p.message_starts == (0, len(head.ids))
    as_user = ModelTokenizer.from_dir(TINY, options=TokenizerConfig(final_assistant="as_user"))
    assert as_user.apply_chat_template(msgs).endswith("<|user|>The answer is<|end|>\n<|assistant|>")
    assert tiny.apply_chat_template(msgs).endswith(
        "<|assistant|>The answer is<|end|>\n<|assistant|>"
    )


def test_tools_fall_back_to_bare_functions(tiny):
    tok = ModelTokenizer.from_dir(TINY, chat_template="{{ tools[0]['name'] + '!' }}")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=TOOLS) == "read_file!"
