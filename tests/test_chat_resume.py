"""Resumed chat-template renders (chunking/chat_split.py, chunking/chat_resume.py) give the text
a whole render gives, byte for byte, over chains of random agent turns (appends, a replaced
last message, edits, drops, swaps, a system message arriving late, tools switched), for the
templates the repo ships and tests with and for templates that are not append-only: those are
either refused when cut or caught when `pre` assigns something else, and render whole.

The checkpoints' own safety net (a few renders compared with whole ones) is off here, so that
every render goes through the cut as it would after start-up."""

import copy
import functools
import json
import random

import jinja2
import orjson
import pytest
from support.conversations import REASONING_SPECIALS as SPECIALS
from support.conversations import next_turn, random_conversation
from support.tokenizer_dirs import TINY

from irminsul.chunking.chat import _ENV, ChatTemplate, normalize_messages
from irminsul.chunking.chat_formats import DEEPSEEK_V3_STYLE
from irminsul.chunking.chat_resume import ResumableTemplate
from irminsul.chunking.chat_split import cut_template
from irminsul.chunking.tokenizer import ModelTokenizer

TINY_TEMPLATE = json.loads((TINY / "tokenizer_config.json").read_text())["chat_template"]
ROLE = "{{ m['role'] }}"

# written for these tests in the shape of DeepSeek-R1's template: the system prompt gathered
# from every system message (wherever it is), earlier answers' reasoning dropped, tool
# outputs grouped through namespace state
R1_LIKE = """\
{%- set ns = namespace(system='', tool_open=false) -%}
{%- for m in messages if m['role'] == 'system' -%}
  {%- set ns.system = ns.system ~ ('\\n\\n' if ns.system else '') ~ m['content'] -%}
{%- endfor -%}
{{- bos_token }}{{ ns.system }}
{%- for m in messages -%}
  {%- set content = m['content'] -%}
  {%- if m['role'] == 'user' -%}
    {%- if ns.tool_open %}<|outputs_end|>{% set ns.tool_open = false %}{% endif -%}
    <|User|>{{ content }}
  {%- elif m['role'] == 'assistant' -%}
    {%- if ns.tool_open %}<|outputs_end|>{% set ns.tool_open = false %}{% endif -%}
    {%- if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif -%}
    <|Assistant|>{{ content }}
    {%- for c in m['tool_calls'] | default([]) -%}
      {{ '<|calls|>' if loop.first }}<|call|>{{ c['function']['name'] }}:
      {{- c['function']['arguments'] | tojson }}{{ '<|calls_end|>' if loop.last }}
    {%- endfor -%}
    <|eos|>
  {%- elif m['role'] == 'tool' -%}
    {%- if not ns.tool_open %}<|outputs|>{% set ns.tool_open = true %}{% endif -%}
    <|output|>{{ content }}
  {%- endif -%}
{%- endfor -%}
{%- if ns.tool_open %}<|outputs_end|>{% endif -%}
{%- if add_generation_prompt and not ns.tool_open %}<|Assistant|><think>\n{% endif -%}
"""

# Qwen3's shape: reasoning kept only after the last user message, found by a scan in `pre`.
# Not append-only: a new user message changes how every earlier answer renders.
LAST_USER = """\
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- set content = m['content'] -%}
  {%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content -%}
    {%- set content = content.split('</think>')[-1] -%}
  {%- endif -%}
  <|{{ m['role'] }}|>{{ content }}<|end|>
{%- endfor -%}
{%- if add_generation_prompt %}<|assistant|>{% endif -%}
"""

# macros with namespace side effects (Qwen's image counting), transformers' generation tag,
# loop indices inside it, and messages[0] read in the loop (Kimi's default system prompt)
MACROS = """\
{%- set count = namespace(n=0) -%}
{%- macro show(m) -%}
  {%- set count.n = count.n + 1 -%}
  [{{ count.n }}:{{ m['role'] }}]{{ m['content'] }}
{%- endmacro -%}
{%- for m in messages -%}
  {%- if loop.first and m['role'] != 'system' %}[default system]{% endif -%}
  {%- generation -%}{{ loop.index }}/{{ show(m) }}{%- endgeneration -%}
  {{- '|first=' ~ messages[0]['role'] if loop.index0 % 3 == 0 }}
{%- endfor -%}
{{ count.n }}{% if add_generation_prompt %}<|assistant|>{% endif %}
{%- if messages[-1]['role'] == 'tool' %}<|after tool|>{% endif -%}
"""

# the end of the list seen from inside the loop: refused when cut
LOOP_LAST = (
    "{%- for m in messages -%}<|" + ROLE + "|>{%- if m['role'] == 'assistant' and not "
    "loop.last %}{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}"
    "{% endif %}<|end|>{%- endfor -%}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LOOKAHEAD = (
    "{%- for m in messages -%}<|" + ROLE + "|>{{ m['content'] }}{% if loop.index0 + 1 < "
    "messages | length and messages[loop.index0 + 1]['role'] == 'tool' %}<|calls|>{% endif %}"
    "{%- endfor -%}"
)

APPEND_ONLY = {
    "tiny": TINY_TEMPLATE,
    "deepseek_v3_style": DEEPSEEK_V3_STYLE,
    "r1_like": R1_LIKE,
    "macros": MACROS,
    "llama_like": "{% for m in messages %}<|start_header_id|>" + ROLE + "<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}",
    "no_system": "{% for m in messages if m['role'] != 'system' %}<|user|>"
    + ROLE + "{{ m['content'] }}<|end|>{% endfor %}",
}
NOT_APPEND_ONLY = {"last_user": LAST_USER, "loop_last": LOOP_LAST, "lookahead": LOOKAHEAD}


def resumable(source: str) -> ResumableTemplate:
    cut = cut_template(_ENV, source)
    return ResumableTemplate(_ENV.from_string(source), None if isinstance(cut, str) else cut,
                             verify_fresh=0, verify_resumed=0)


@functools.cache
def compiled(source: str):
    return _ENV.from_string(source)


def whole(source: str, msgs, variables) -> str:
    try:
        return compiled(source).render(messages=msgs, **variables)
    except Exception as e:  # noqa: BLE001 - the resumed render must fail the same way
        return f"raised {type(e).__name__}: {e}"


def rendered(rt: ResumableTemplate, msgs, variables) -> str:
    try:
        return rt.render(msgs, variables)
    except Exception as e:  # noqa: BLE001
        return f"raised {type(e).__name__}: {e}"


def chains(seed: int, count: int, turns: int):
    """Each step of ``count`` random conversations, ``turns`` turns long."""
    rng = random.Random(seed)
    for _ in range(count):
        msgs, tools = random_conversation(rng, SPECIALS, 14)
        for _ in range(turns):
            variables = {"bos_token": "<s>", "eos_token": "</s>", "tools": tools,
                         "documents": None, "add_generation_prompt": rng.random() < 0.7}
            yield normalize_messages(msgs), variables
            msgs, tools = next_turn(rng, msgs, tools)


@pytest.mark.parametrize("name", sorted(APPEND_ONLY))
def test_append_only_templates_resume_and_equal_whole_renders(name):
    source = APPEND_ONLY[name]
    rt = resumable(source)
    assert rt.cut is not None, cut_template(_ENV, source)
    for msgs, variables in chains(11, 60, 8):
        assert rendered(rt, msgs, variables) == whole(source, msgs, variables), name
        # a prefix render, as chat_layout asks for (a checkpoint of the same list)
        k = len(msgs) - 1
        prefix_vars = {**variables, "add_generation_prompt": False}
        assert rendered(rt, msgs[:k], prefix_vars) == whole(source, msgs[:k], prefix_vars)
    assert rt.stats["resumed"] > 300, rt.stats
    assert rt.stats["mismatch"] == 0


@pytest.mark.parametrize("name", sorted(NOT_APPEND_ONLY))
def test_templates_that_are_not_append_only_fall_back(name):
    source = NOT_APPEND_ONLY[name]
    rt = resumable(source)
    for msgs, variables in chains(12, 60, 8):
        assert rendered(rt, msgs, variables) == whole(source, msgs, variables), name
    if name == "last_user":  # cut, but each new user message changes what pre assigns
        assert rt.stats["pre_changed"] > 20 and rt.stats["resumed"] > 0, rt.stats
    else:
        assert rt.cut is None and rt.stats["resumed"] == 0


def test_a_late_system_message_is_caught_in_pre():
    rt = resumable(R1_LIKE)
    msgs = normalize_messages(
        [{"role": "system", "content": "S"}]
        + [{"role": r, "content": f"{r} {i}"} for i in range(5) for r in ("user", "assistant")]
    )
    v = {"bos_token": "<s>", "tools": None, "add_generation_prompt": True}
    assert rt.render(msgs, v) == whole(R1_LIKE, msgs, v)
    more = msgs + [{"role": "system", "content": "LATE"}, {"role": "user", "content": "q"}]
    text = rt.render(more, v)
    assert text == whole(R1_LIKE, more, v) and text.startswith("<s>S\n\nLATE<|User|>")
    assert rt.stats["pre_changed"] == 1 and rt.stats["resumed"] == 0
    again = more + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    assert rt.render(again, v) == whole(R1_LIKE, again, v)
    assert rt.stats["resumed"] == 1


STRICT = (
    "{% for m in messages %}[{% for k in m %}{{ k }},{% endfor %}{{ m['n'] | default('') }}"
    "{{ m['parts'] | default('') }}]{{ m['content'] }}{% endfor %}"
)


@pytest.mark.parametrize("change", [
    lambda m: m.update(n=1.0),  # 1 == 1.0 == True in Python, not in the text
    lambda m: m.update(n=True),
    lambda m: m.update(parts=("a",)),  # a tuple prints unlike a list
    lambda m: m.update({"role": m.pop("role")}),  # key order
])
def test_equal_in_python_is_not_enough_to_resume(change):
    rt = resumable(STRICT)
    msgs = [{"role": "user", "content": f"c{i}", "n": 1, "parts": ["a"]} for i in range(6)]
    v = {"add_generation_prompt": False}
    assert rt.render(msgs, v) == whole(STRICT, msgs, v)
    edited = copy.deepcopy(msgs)
    change(edited[2])
    # == alone, or the JSON form alone, would resume from the first render
    assert edited[:5] == msgs[:5] or orjson.dumps(edited[:5]) == orjson.dumps(msgs[:5])
    edited.append({"role": "user", "content": "new"})
    assert rt.render(edited, v) == whole(STRICT, edited, v)
    assert rt.stats["resumed"] == 0


@pytest.mark.parametrize("source, why", [
    (LOOP_LAST, "loop.last"),
    ("{% for m in messages %}{{ loop.length }}{% endfor %}", "loop.length"),
    ("{% for m in messages %}{{ loop.revindex }}{% endfor %}", "loop.revindex"),
    ("{% for m in messages %}{{ loop.nextitem }}{% endfor %}", "loop.nextitem"),
    ("{% for m in messages %}{{ loop }}{% endfor %}", "other than loop.first"),
    (LOOKAHEAD, "messages"),
    ("{% for m in messages %}{{ messages[-1] }}{% endfor %}", "constant index >= 0"),
    ("{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}{% endfor %}",
     "breaks"),
    ("{% for m in messages %}{% macro f() %}x{% endmacro %}{% endfor %}", "macro inside"),
    (("{% macro f() %}{{ messages | length }}{% endmacro %}{% for m in messages %}{{ f() }}"
      "{% endfor %}"), "messages"),
    ("{% for m in messages %}{{ strftime_now('%d') }}{% endfor %}", "strftime_now"),
    ("{% set c = cycler('a', 'b') %}{% for m in messages %}{{ c.next() }}{% endfor %}",
     "cycler"),
    ("{% for m in messages if m.role != 'system' %}{{ loop.index }}{% endfor %}", "filtered"),
    ("{% for m in messages %}{{ y }}{% endfor %}{% set y = 1 %}", "assigns after the loop"),
    ("{% set messages = messages[1:] %}{% for m in messages %}{% endfor %}", "assigns messages"),
    (("{% macro f() %}{{ caller() }}{% endmacro %}{% for m in messages %}{% call f() %}x"
      "{% endcall %}{% endfor %}"), "call"),
    ("{% include 'x' %}{% for m in messages %}{% endfor %}", "Include"),
    ("{% for m in messages %}{{ m }}{% else %}none{% endfor %}", "loop else"),
    ("{% if messages %}{% for m in messages %}{{ m }}{% endfor %}{% endif %}", "top-level"),
])
def test_cut_refuses_what_sees_past_the_list_or_could_change_meaning(source, why):
    refusal = cut_template(_ENV, source)
    assert isinstance(refusal, str) and why in refusal, refusal


def test_cut_keeps_inner_loops_own_indices_and_shifts_the_outer_ones():
    source = (
        "{% for m in messages %}{{ loop.index0 }}{{ loop.index }}{{ loop.first }}"
        "{% for c in m['content'] %}{{ loop.last }}{{ loop.index }}{% endfor %}"
        "{% for x in range(loop.index) %}.{% endfor %}|{% endfor %}"
    )
    rt = resumable(source)
    assert rt.cut is not None
    msgs = [{"role": "user", "content": "ab" * i} for i in range(1, 9)]
    v = {}
    for k in (5, 6, 8):
        assert rt.render(msgs[:k], v) == whole(source, msgs[:k], v)
    assert rt.stats["resumed"] == 2


def test_a_cut_that_disagrees_is_caught_by_the_first_renders():
    # a deliberately wrong cut (another template's loop): the safety net renders whole,
    # compares, and turns the cut off
    wrong = cut_template(_ENV, "{% for m in messages %}!{{ m['content'] }}{% endfor %}")
    rt = ResumableTemplate(_ENV.from_string(TINY_TEMPLATE), wrong)
    msgs = normalize_messages([{"role": "user", "content": f"q{i}"} for i in range(6)])
    v = {"bos_token": "<s>", "tools": None, "add_generation_prompt": True}
    assert rt.render(msgs, v) == whole(TINY_TEMPLATE, msgs, v)
    assert rt.cut is None and rt.stats["mismatch"] == 1
    # and where only the whole render fails (the tiny template refuses a late system message)
    rt = ResumableTemplate(_ENV.from_string(TINY_TEMPLATE), wrong)
    late = msgs + [{"role": "system", "content": "late"}]
    with pytest.raises(jinja2.TemplateError, match="system message must be the first"):
        rt.render(late, v)
    assert rt.cut is None


def test_checkpoints_stay_within_their_budget():
    rt = ResumableTemplate(_ENV.from_string(TINY_TEMPLATE), cut_template(_ENV, TINY_TEMPLATE),
                           max_chars=20_000, verify_fresh=0, verify_resumed=0)
    for msgs, variables in chains(13, 30, 6):
        assert rendered(rt, msgs, variables) == whole(TINY_TEMPLATE, msgs, variables)
        assert rt._chars <= 20_000 or len(rt._memo) <= 2
    assert rt.stats["resumed"] > 0


def test_tokenizer_turns_resume_with_cold_text():
    warm, cold = ModelTokenizer.from_dir(TINY), ModelTokenizer.from_dir(TINY)
    rng = random.Random(3)
    msgs, tools = random_conversation(rng, SPECIALS, 30)
    for i in range(12):
        p = warm.encode_chat(msgs, tools=tools)
        cold.clear_cache()
        assert p.text == cold.apply_chat_template(msgs, tools=tools)
        if i % 2:
            msgs = msgs[:-1] + [{"role": "user", "content": f"step {i}"}]
        else:
            msgs = msgs + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "go"}]
    stats = warm.chat_template._resumable["default"].stats
    assert stats["resumed"] >= 10 and stats["mismatch"] == 0, stats
    assert isinstance(ChatTemplate(LOOP_LAST).cut_refusals["default"], str)


def test_a_message_the_loop_reads_by_index_must_lie_in_the_reused_head():
    source = ("{% for m in messages %}{{ m['content'] }}{{ messages[5]['content'] if "
              "messages[5] is defined }};{% endfor %}")
    rt = resumable(source)
    assert rt.cut.min_prefix == 6
    msgs = [{"role": "user", "content": f"q{i}"} for i in range(9)]
    for k in (4, 5, 7, 8, 9):  # messages[5] appears at k = 6: the first renders cannot resume
        assert rt.render(msgs[:k], {}) == whole(source, msgs[:k], {})
    assert rt.stats["resumed"] == 2
