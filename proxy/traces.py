"""Seeded, deterministic traces of multi-turn agent sessions, as OpenAI or Anthropic requests.

A trace is a JSONL file, one request per line, in the order the requests were sent::

    {"session": "...", "turn": 0, "family": "toolloop", "api": "openai",
     "endpoint": "/v1/chat/completions", "body": {...the request body...}}

The families (proxy/trace_families.py) model how real agents change their prompts between
turns. One seed gives byte-identical output on one Python installation (content is drawn from
its stdlib sources); ``irminsul replay`` sends a trace to a server, proxy/oracle.py measures
how much of it a cache could recover.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import click

from irminsul import SHIPPED_MODEL_DIR
from irminsul.chunking.config import ChunkerConfig
from irminsul.proxy.trace_api import ENDPOINTS, anthropic_body, openai_body
from irminsul.proxy.trace_content import TOOL_NAMES
from irminsul.proxy.trace_families import BUILDERS, FAMILIES, Agent, Ctx
from irminsul.proxy.trace_session import COMPACTIONS, HEADER_POSITIONS

APIS = ("openai", "anthropic", "mixed")
BASE_FAMILIES = tuple(f for f in FAMILIES if f != "mixed")

# What each family changes from the defaults. Only the header family and mixed traffic carry a
# varying header by default, so each other family shows its own pattern alone.
PRESETS: dict[str, dict[str, Any]] = {
    "header": {"header_tokens": 250},
    "reorder": {},
    "toolloop": {"turns": 10},
    "subagent": {"docs": 3},
    "rag": {"docs": 5},
    "mixed": {"header_tokens": 100},
}


@dataclass(frozen=True)
class TraceConfig:
    """Everything that shapes a trace; sizes are in tokens-ish (see trace_content)."""

    family: str = "mixed"
    sessions: int = 4
    turns: int = 6
    seed: int = 0
    api: str = "openai"  # openai | anthropic | mixed (chosen per session)
    model: str = "deepseek-v2-lite-chat"
    max_tokens: int = 256  # the requests' own generation limit (replay may override it)
    header_tokens: int = 0  # length of the <env> header rebuilt every turn (0: none)
    header_position: str = "system-start"  # system-start | system-end | user (newest message)
    tools: int = 10  # tools the agent offers (at most 10)
    tool_desc_tokens: int = 80  # typical length of a tool's description
    skills: int = 4
    skill_tokens: int = 400
    memory_tokens: int = 250
    reorder_prob: float = 1.0  # reorder: chance a turn runs in a new process with a new order
    tool_tokens: int = 1200  # typical tool output (file reads range 0.2x to 1.6x of it)
    compaction: str = "oldest"  # oldest | newest | none
    context_budget: int = 8000  # uncompacted tool output that triggers compaction
    keep_recent: int = 2  # newest tool results never compacted
    subagents: int = 2
    subagent_turns: int = 3
    docs: int = 5  # rag: documents retrieved per turn; subagent: shared project documents
    doc_tokens: int = 600
    rag_corpus: int = 8  # rag: documents a session's retrieval can return
    rag_churn: float = 0.0  # rag: chance per turn and slot that another document replaces one

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{f.name} must be an integer, got {v!r}")
            if f.type == "float" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"{f.name} must be a number, got {v!r}")
            if f.type == "str" and not isinstance(v, str):
                raise ValueError(f"{f.name} must be a string, got {v!r}")
        choices = {"family": FAMILIES, "api": APIS, "compaction": COMPACTIONS,
                   "header_position": HEADER_POSITIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("sessions", "turns", "skills", "subagent_turns", "docs", "rag_corpus",
                     "tool_tokens", "doc_tokens", "max_tokens", "skill_tokens", "tools",
                     "tool_desc_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "header_tokens", "memory_tokens", "keep_recent", "subagents",
                     "context_budget"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("reorder_prob", "rag_churn"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.tools > len(TOOL_NAMES):
            raise ValueError(f"tools must be <= {len(TOOL_NAMES)}, got {self.tools}")
        if self.docs > self.rag_corpus:
            raise ValueError(f"docs ({self.docs}) must be <= rag_corpus ({self.rag_corpus})")
        if self.family == "header" and self.header_tokens == 0:
            raise ValueError("the header family needs header_tokens > 0")

    @classmethod
    def preset(cls, family: str, **overrides) -> TraceConfig:
        """The family's preset; ``overrides`` that are not None replace its values."""
        if family not in PRESETS:
            raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
        values = {**PRESETS[family], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(family=family, **values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class TraceRequest(NamedTuple):
    """One line of a trace."""

    session: str
    turn: int
    family: str
    api: str  # openai | anthropic
    endpoint: str
    body: dict

    def to_line(self) -> str:
        return json.dumps(self._asdict(), ensure_ascii=False, separators=(",", ":"))


def generate(config: TraceConfig) -> list[TraceRequest]:
    """The trace's requests: sessions interleaved turn by turn, as concurrent agents send them.

    Every session shares one agent install (identity, tools, skills) drawn from the seed;
    each session has its own random stream, so sessions do not depend on each other.
    """
    agent = Agent.build(random.Random(f"irminsul-traces:{config.seed}:agent"), config)
    sessions = []
    for i in range(config.sessions):
        rng = random.Random(f"irminsul-traces:{config.seed}:{config.family}:{i}")
        family = config.family if config.family != "mixed" else rng.choice(BASE_FAMILIES)
        api = config.api if config.api != "mixed" else rng.choice(("openai", "anthropic"))
        name = f"{config.family}-{config.seed}-{i:03d}"
        steps = BUILDERS[family](Ctx(rng, agent, config, name, family))
        make = openai_body if api == "openai" else anthropic_body
        sessions.append([TraceRequest(s.session, s.turn, s.family, api, ENDPOINTS[api],
                                      make(s, config)) for s in steps])
    out = []
    for k in range(max(map(len, sessions), default=0)):
        out += [s[k] for s in sessions if k < len(s)]
    return out


def write_trace(requests, path: str | Path) -> int:
    """Write ``requests`` as JSONL (``-`` for stdout); returns the bytes written."""
    text = "".join(r.to_line() + "\n" for r in requests)
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text, encoding="utf-8")
    return len(text.encode())


# TraceConfig fields that `traces generate` sets with options of their own
OWN_OPTIONS = ("family", "sessions", "turns", "seed", "header_tokens", "header_position", "api",
               "compaction", "model")


def parse_settings(settings) -> dict[str, Any]:
    """``["key=value", ...]`` as TraceConfig keyword arguments, each value of its field's type."""
    kinds = {f.name: f.type for f in fields(TraceConfig) if f.name not in OWN_OPTIONS}
    out: dict[str, Any] = {}
    for item in settings:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key in OWN_OPTIONS:
            raise ValueError(f"--set {item!r}: use --{key.replace('_', '-')} instead")
        if not eq or key not in kinds:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(kinds)}")
        try:
            out[key] = {"int": int, "float": float}.get(kinds[key], str)(value.strip())
        except ValueError:
            raise ValueError(f"--set {item!r}: {value!r} is not a valid {kinds[key]}") from None
    return out


@click.group("traces")
def traces_command():
    """Agentic traffic traces: multi-turn agent sessions as OpenAI or Anthropic requests.

    A trace is JSONL, one request per line: {"session", "turn", "family", "api", "endpoint",
    "body"}. Replay one with `irminsul replay TRACE --base-url URL`.
    """


@traces_command.command("generate")
@click.option("--family", type=click.Choice(FAMILIES), required=True,
              help="header: an env header rebuilt every turn; reorder: system-prompt sections "
                   "reordered per process; toolloop: tool outputs and compaction; subagent: "
                   "shared docs in another wrapper; rag: documents reordered each turn; "
                   "mixed: sessions of every family.")
@click.option("--sessions", type=click.IntRange(min=1), default=4, show_default=True,
              help="Number of sessions (sub-agents come on top).")
@click.option("--turns", type=click.IntRange(min=1), default=None,
              help="Requests per session [default: the family's preset].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed: the same seed gives a byte-identical trace.")
@click.option("--header-tokens", type=click.IntRange(min=0), default=None,
              help="Length in tokens-ish of the header rebuilt every turn; 0 for none "
                   "[default: 250 for header, 100 for mixed, else 0].")
@click.option("--header-position", type=click.Choice(HEADER_POSITIONS), default=None,
              help="Where the header goes [default: system-start].")
@click.option("--api", type=click.Choice(APIS), default=None,
              help="Request shape: OpenAI chat, Anthropic messages, or mixed per session "
                   "[default: openai].")
@click.option("--compaction", type=click.Choice(COMPACTIONS), default=None,
              help="How old tool results are compacted (toolloop, subagent) [default: oldest].")
@click.option("--model", default=None, help="The requests' model field.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Set any other TraceConfig field, e.g. --set tool_tokens=600 (repeatable).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="JSONL file to write ('-' for stdout).")
def generate_command(family, sessions, turns, seed, header_tokens, header_position, api,
                     compaction, model, settings, output):
    """Generate a trace of --family sessions and write it as JSONL to -o FILE.

    The same options and seed give a byte-identical file on the same Python installation
    (code and prose are drawn from its stdlib sources). Sizes are in tokens-ish: words plus
    punctuation marks, near what a BPE tokenizer counts.
    """
    try:
        extra = parse_settings(settings)
        config = TraceConfig.preset(family, sessions=sessions, turns=turns, seed=seed,
                                    header_tokens=header_tokens, header_position=header_position,
                                    api=api, compaction=compaction, model=model, **extra)
    except (ValueError, TypeError) as e:
        raise click.UsageError(str(e)) from e
    requests = generate(config)
    size = write_trace(requests, output)
    if output != "-":
        click.echo(f"wrote {len(requests)} requests ({size / 1024:.0f} KiB) of "
                   f"{len({r.session for r in requests})} sessions to {output}", err=True)



@traces_command.command("recovery")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(file_okay=False, exists=True),
              default=str(SHIPPED_MODEL_DIR),
              help="Directory with the model's tokenizer.json and tokenizer_config.json "
                   "[default: the shipped tiny model's].")
@click.option("--scope", type=click.Choice(("session", "global")), default="global",
              show_default=True, help="Exact prefix against the same session's earlier "
                                      "requests, or against all (a shared radix cache).")
@click.option("--chunk-tokens", show_default=True, metavar="MIN/AVG/MAX",
              # the product chunker's defaults, so the analysis matches what the proxy cuts
              default="{0.min_tokens}/{0.avg_tokens}/{0.max_tokens}".format(ChunkerConfig()),
              help="The content-defined chunker's min/avg/max chunk length in tokens.")
@click.option("--fixed-block", type=click.IntRange(min=1), default=256, show_default=True,
              help="Block length of the fixed-block baseline (LMCache's chunk size).")
@click.option("--carve", type=click.IntRange(min=0), default=16, show_default=True,
              help="Tokens recomputed at the start of every reused chunk (the net columns).")
@click.option("--oracle-min", type=click.IntRange(min=1), default=16, show_default=True,
              help="Shortest repeated run of tokens the oracle counts.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Analyse only the first N requests.")
def recovery_command(trace, tokenizer_dir, scope, chunk_tokens, fixed_block, carve, oracle_min,
                     limit):
    """How much of TRACE's prompts an exact-prefix cache gets, and what content reuse adds.

    TRACE is anything `irminsul replay` reads (generated traces, --record files, bare chat
    bodies). Prints, per family, recovery above the exact prefix for content-defined chunks
    and for fixed blocks matched at any offset, against an oracle (every run of tokens seen
    before), as shares of the prompt, of the prefix cache's misses and of the oracle.
    """
    from irminsul.proxy.oracle import OracleConfig
    from irminsul.proxy.oracle_report import recovery_report
    from irminsul.proxy.trace_io import TraceError

    try:
        lo, avg, hi = (int(x) for x in chunk_tokens.split("/"))
        chunker = ChunkerConfig(min_tokens=lo, avg_tokens=avg, max_tokens=hi)
    except ValueError as e:
        raise click.BadParameter(f"{chunk_tokens!r}: {e}", param_hint="--chunk-tokens") from None
    config = OracleConfig(prefix_scope=scope, fixed_block=fixed_block, carve_tokens=carve,
                          oracle_min_tokens=oracle_min)
    try:
        click.echo(recovery_report(trace, tokenizer_dir, chunker, config, limit=limit))
    except TraceError as e:
        raise click.BadParameter(str(e), param_hint="TRACE") from None
