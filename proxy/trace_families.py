"""How real agents change their prompts between turns, one generator per trace family.

Every family builds a session as a list of ``Step``s: the system prompt, the OpenAI-form chat
messages after it and the tools, as the agent would send them on that turn. The patterns come
from agents seen in the wild:

* ``header``: an environment block (time, cwd, git status, token budget) rebuilt every turn,
  at the top of the system prompt, at its end, or in the newest user message.
* ``reorder``: system-prompt sections (identity, tools, skills, memory) assembled in a
  different order by each process, and a process spawned per message (openclaw #40256, #66389).
* ``toolloop``: file reads, command outputs and search results; compaction rewrites old tool
  results (oldest first breaks the prefix; newest first keeps it, openclaw PR #58036).
* ``subagent``: sub-agents get the parent's documents and skills inside another wrapper.
* ``rag``: retrieved documents placed in a new order each turn.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from irminsul.proxy import trace_content as content
from irminsul.proxy.trace_session import EnvHeader, Step, ToolLoop, tool_call_message, with_header

FAMILIES = ("header", "reorder", "toolloop", "subagent", "rag", "mixed")


@dataclass(frozen=True)
class Agent:
    """What every session of one trace shares: the agent install and its repository."""

    package: str
    identity: str
    tools: tuple[dict, ...]
    skills: tuple[tuple[str, str], ...]

    @classmethod
    def build(cls, rng: random.Random, config) -> Agent:
        """The agent install of a trace (``config`` is a traces.TraceConfig)."""
        package = rng.choice(("atlas", "lumen", "quarry", "tessel", "vireo"))
        identity = (
            f"# Identity\n\nYou are Tessera, an autonomous coding agent working in the "
            f"`{package}` repository on behalf of one developer. Be precise and brief. Read "
            "files before editing them, run the tests after every change, and never invent "
            "command output.\n\n## Guidelines\n\n" + content.prose(rng, 220)
        )
        tools = content.tool_schemas(rng, config.tools, config.tool_desc_tokens)
        return cls(package, identity, tuple(tools),
                   tuple(content.skills(rng, config.skills, config.skill_tokens)))

    def tools_section(self) -> str:
        return content.tools_markdown(list(self.tools))

    def skills_section(self, order: list[int] | None = None) -> str:
        idx = order if order is not None else range(len(self.skills))
        return "# Skills\n\n" + "\n\n".join(self.skills[i][1] for i in idx)


class Ctx(NamedTuple):
    """What a family's session builder gets."""

    rng: random.Random
    agent: Agent
    config: object  # traces.TraceConfig (not imported: it imports this module)
    session: str
    family: str


def chat_exchange(rng: random.Random, agent: Agent) -> tuple[str, str]:
    """(user question, assistant answer) about the agent's repository."""
    path, first, code = content.code_excerpt(rng, rng.randint(60, 200))
    where = content.repo_path(path, agent.package)
    name = code.split("(")[0].split()[-1] if code.lstrip().startswith(("def ", "class ")) \
        else path.stem
    user = rng.choice((
        f"How does `{name}` in `{where}` work?",
        f"Is `{name}` in `{where}` safe to call from several threads?",
        f"Please review `{where}` around line {first}; something looks off in `{name}`.",
        f"Summarise what `{name}` does and where it is used.",
    ))
    answer = (content.prose(rng, rng.randint(60, 220)) + f"\n\nThe relevant part of `{where}`:"
              f"\n\n```python\n{code}\n```\n\n" + content.prose(rng, rng.randint(20, 80)))
    return user, answer


def session_header(ctx: Ctx) -> EnvHeader | None:
    """The session's <env> header, or None when the config asks for none."""
    tokens = ctx.config.header_tokens
    return EnvHeader(ctx.rng, tokens, ctx.agent.package) if tokens > 0 else None


def chat_session(ctx: Ctx, sections: Callable[[int], list[str]], tools: tuple[dict, ...]):
    """A question/answer session whose system prompt is ``sections(turn)`` plus the header."""
    header = session_header(ctx)
    history: list[dict] = []
    steps = []
    for turn in range(ctx.config.turns):
        user, answer = chat_exchange(ctx.rng, ctx.agent)
        msgs = history + [{"role": "user", "content": user}]
        if header is not None and turn:
            header.advance()
        system, sent = with_header("\n\n".join(sections(turn)), msgs, header,
                                   ctx.config.header_position)
        steps.append(Step(ctx.session, turn, ctx.family, system, tuple(sent), tools))
        # the user message is kept as sent (with its header, in the user position)
        history = list(sent) + [{"role": "assistant", "content": answer}]
    return steps


def header_family(ctx: Ctx) -> list[Step]:
    a = ctx.agent
    memory = content.memory(ctx.rng, ctx.config.memory_tokens)
    fixed = [a.identity, a.tools_section(), a.skills_section(), memory]
    return chat_session(ctx, lambda _turn: fixed, a.tools)


def reorder_family(ctx: Ctx) -> list[Step]:
    """Each turn is a new process (prob. ``reorder_prob``) that orders sections its own way."""
    a, rng, cfg = ctx.agent, ctx.rng, ctx.config
    memory = content.memory(rng, cfg.memory_tokens)
    order, skill_order = [0, 1, 2, 3], list(range(len(a.skills)))

    def sections(turn: int) -> list[str]:
        if turn and rng.random() < cfg.reorder_prob:
            rng.shuffle(order)
            rng.shuffle(skill_order)
        parts = [a.identity, a.tools_section(), a.skills_section(skill_order), memory]
        return [parts[i] for i in order]

    return chat_session(ctx, sections, a.tools)


def rag_family(ctx: Ctx) -> list[Step]:
    """Retrieval returns the session's documents ranked anew for every question."""
    rng, cfg = ctx.rng, ctx.config
    corpus = [content.doc_page(rng, cfg.doc_tokens) for _ in range(cfg.rag_corpus)]
    picked = rng.sample(range(len(corpus)), cfg.docs)
    intro = ("# Role\n\nYou answer questions about the project's libraries using only the "
             "retrieved documents below. Cite documents by their index.")

    def sections(turn: int) -> list[str]:
        if turn:
            rng.shuffle(picked)
            for k in range(len(picked)):
                if rng.random() < cfg.rag_churn:
                    spare = [i for i in range(len(corpus)) if i not in picked]
                    picked[k] = rng.choice(spare) if spare else picked[k]
        docs = [f'<document index="{n}" source="{corpus[i][0]}">\n{corpus[i][1]}\n</document>'
                for n, i in enumerate(picked, 1)]
        return [intro, "# Retrieved documents\n\n" + "\n\n".join(docs)]

    return chat_session(ctx, sections, ())


def toolloop_family(ctx: Ctx) -> list[Step]:
    a = ctx.agent
    system = "\n\n".join([a.identity, a.tools_section(), a.skills_section(),
                          content.memory(ctx.rng, ctx.config.memory_tokens)])
    loop = ToolLoop(ctx.rng, a.package, ctx.config)
    return loop.run(ctx, system, session_header(ctx))


def subagent_family(ctx: Ctx) -> list[Step]:
    """A parent that delegates; its sub-agents get the same docs and skills, wrapped anew."""
    rng, a, cfg = ctx.rng, ctx.agent, ctx.config
    docs = [content.doc_page(rng, cfg.doc_tokens) for _ in range(cfg.docs)]
    doc_block = "\n\n".join(text for _, text in docs)
    system = "\n\n".join([a.identity, a.tools_section(), a.skills_section(),
                          "# Project documents\n\n" + doc_block])
    parent = ToolLoop(rng, a.package, cfg)
    wrapper = ("# Role\n\nYou are a sub-agent. A parent agent delegated one task to you; work "
               "only on it, use the tools, and end with a short report for the parent.")
    tasks = [f"Investigate {content.prose(rng, 12).split('.')[0].lower()}"
             for _ in range(cfg.subagents)]
    calls = tool_call_message(rng, [("task", {"description": t[:60], "prompt": t})
                                    for t in tasks])
    subs = []
    for k, task in enumerate(tasks, 1):
        context = "\n\n".join(f'<document path="docs/{title.split()[0]}.md">\n{text}\n'
                              f"</document>" for title, text in docs)
        user = (f"<context>\n{context}\n</context>\n\n<skills>\n"
                + "\n\n".join(s for _, s in a.skills) + f"\n</skills>\n\nTask: {task}")
        sub_ctx = Ctx(rng, a, cfg, f"{ctx.session}/sub{k}", ctx.family)
        loop = ToolLoop(rng, a.package, cfg)
        subs.append(loop.run(sub_ctx, wrapper + "\n\n" + a.tools_section(), None,
                             first_user=user, turns=cfg.subagent_turns))
    spawn = (calls, subs) if tasks else None
    return parent.run(ctx, system, session_header(ctx), spawn=spawn)


BUILDERS: dict[str, Callable[[Ctx], list[Step]]] = {
    "header": header_family, "reorder": reorder_family, "toolloop": toolloop_family,
    "subagent": subagent_family, "rag": rag_family,
}
