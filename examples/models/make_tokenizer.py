"""Train the tiny byte-level BPE tokenizer shipped with examples/models/tiny-mla/.

Usage: python examples/models/make_tokenizer.py [--out DIR] [--max-bytes N]

The corpus is the top-level modules of Python's own standard library (found with
sysconfig, so it is on every machine without a download), read in sorted order and capped
at --max-bytes so training stays well under a minute on two cores. The output depends only
on that text: the same Python minor version gives byte-identical files. The Python version
used is recorded in tokenizer_config.json ("irminsul_corpus").

Writes tokenizer.json, tokenizer_config.json and generation_config.json (token IDs only);
config.json and the weights are written by the engine's model script.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 4096  # includes the special tokens
DEFAULT_MAX_BYTES = 3_000_000  # about 2 s of training on 2 cores
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<|end|>",
    "<|tool_call|>",
    "<|/tool_call|>",
)

# System part first (with the tool list as JSON lines), one <|end|>-terminated block per
# message, assistant tool calls as JSON between <|tool_call|> and <|/tool_call|>.
# Content is always rendered (even when empty) so every message has a fixed header.
CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- set has_system = messages and messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] if has_system else '' -%}
{%- if has_system or tools -%}
<|system|>{{ system }}
{%- if tools -%}
{%- if system %}{{ '\\n\\n' }}{% endif -%}
# Tools{{ '\\n' }}
{%- for tool in tools -%}
{%- set spec = tool['function'] if tool['function'] is defined else tool -%}
{{ spec | tojson }}{{ '\\n' }}
{%- endfor -%}
{%- endif -%}
<|end|>{{ '\\n' }}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{%- if not loop.first -%}
{{ raise_exception('the system message must be the first message') }}
{%- endif -%}
{%- elif message['role'] == 'user' -%}
<|user|>{{ message['content'] }}<|end|>{{ '\\n' }}
{%- elif message['role'] == 'assistant' -%}
<|assistant|>{{ message['content'] }}
{%- for call in message['tool_calls'] | default([]) -%}
{%- set fn = call['function'] if call['function'] is defined else call -%}
{%- set args = fn['arguments'] if fn['arguments'] is defined else {} -%}
{%- set args = args if args is string else args | tojson -%}
<|tool_call|>{"name": {{ fn['name'] | tojson }}, "arguments": {{ args }}}<|/tool_call|>
{%- endfor -%}
<|end|>{{ '\\n' }}
{%- elif message['role'] == 'tool' -%}
<|tool|>{{ message['content'] }}<|end|>{{ '\\n' }}
{%- else -%}
{{ raise_exception('unknown role: ' + message['role']) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}
"""


def corpus_files() -> list[Path]:
    """Top-level stdlib modules in sorted order (no site-packages, no test packages)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"), key=lambda p: p.name)


def corpus(max_bytes: int):
    """Yield file texts until max_bytes of UTF-8 have been produced (the last one cut)."""
    left = max_bytes
    for path in corpus_files():
        if left <= 0:
            return
        data = path.read_bytes()[:left]
        left -= len(data)
        yield data.decode("utf-8", errors="ignore")


def build(max_bytes: int = DEFAULT_MAX_BYTES) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(max_bytes), trainer=trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise SystemExit(f"trained vocab is {tok.get_vocab_size()}, wanted {VOCAB_SIZE}")
    return tok


def tokenizer_config(max_bytes: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
        "irminsul_corpus": {
            "source": "python stdlib top-level *.py, sorted by name",
            "python": platform.python_version(),
            "max_bytes": max_bytes,
        },
    }


def generation_config(tok: Tokenizer) -> dict:
    # <|end|> closes every chat turn, so it stops generation as <|eos|> does.
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return {
        "bos_token_id": ids["<|bos|>"],
        "eos_token_id": [ids["<|eos|>"], ids["<|end|>"]],
        "pad_token_id": ids["<|pad|>"],
    }


def write(out: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok = build(max_bytes)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    dump = {"ensure_ascii": False, "indent": 2, "sort_keys": False}
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(max_bytes), **dump) + "\n"
    )
    (out / "generation_config.json").write_text(json.dumps(generation_config(tok), **dump) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tiny-mla")
    ap.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    args = ap.parse_args(argv)
    if args.max_bytes < 100_000:
        ap.error("--max-bytes must be at least 100000 to reach a 4096-token vocabulary")
    write(args.out, args.max_bytes)
    print(f"wrote tokenizer files to {args.out} (python {platform.python_version()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
