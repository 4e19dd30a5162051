"""Synthetic but realistic-looking content for agent traces, built offline and deterministically.

Code and prose come from the Python standard library's own sources on disk (the directory
``sysconfig`` names as ``stdlib``, files taken in sorted order), so nothing is downloaded and
one seed gives the same text on one Python installation. Shell outputs, tool schemas, skills
and memories are templates filled from those sources and a seeded ``random.Random``.

Sizes are in "tokens-ish" (``approx_tokens``: words plus punctuation marks), which tracks BPE
token counts to within a small factor; measure exact counts with the model's tokenizer.
"""

from __future__ import annotations

import ast
import functools
import json
import random
import re
import sysconfig
from pathlib import Path

_TOKENISH = re.compile(r"\w+|[^\w\s]")
# Modules whose source is mostly data or trivia, skipped so excerpts look like ordinary code.
_SKIP = frozenset({"antigravity.py", "this.py", "__hello__.py", "__phello__.foo.py"})


def approx_tokens(text: str) -> int:
    """Words and punctuation marks in ``text``: a tokenizer-free length ("tokens-ish")."""
    return len(_TOKENISH.findall(text))


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """The top-level ``.py`` modules of this interpreter's stdlib, sorted, larger than 4 KB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = tuple(
        p for p in sorted(root.glob("*.py")) if p.name not in _SKIP and p.stat().st_size > 4096
    )
    if len(files) < 10:
        raise RuntimeError(f"too few stdlib sources under {root} to build traces from")
    return files


@functools.lru_cache(maxsize=256)
def _lines(path: Path) -> tuple[str, ...]:
    return tuple(path.read_text(encoding="utf-8", errors="replace").splitlines())


@functools.lru_cache(maxsize=256)
def _module_docs(path: Path) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(module docstring, ((signature, docstring) of public defs)) of a stdlib module."""
    try:
        tree = ast.parse("\n".join(_lines(path)))
    except SyntaxError:
        return "", ()
    entries = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                args = ast.unparse(node.args) if isinstance(node, ast.FunctionDef) else ""
                kind = "def" if isinstance(node, ast.FunctionDef) else "class"
                entries.append((f"{kind} {node.name}({args})", doc))
    return ast.get_docstring(tree) or "", tuple(entries)


def repo_path(path: Path, package: str) -> str:
    """A stdlib module's name placed in a plausible project layout."""
    return f"src/{package}/{path.name}"


def code_excerpt(rng: random.Random, tokens: int) -> tuple[Path, int, str]:
    """(source file, first line number, text) of about ``tokens`` tokens-ish of real code,
    starting at a ``def`` or ``class`` line when the file has one."""
    path = rng.choice(stdlib_files())
    lines = _lines(path)
    starts = [i for i, s in enumerate(lines) if s.lstrip().startswith(("def ", "class "))]
    start = rng.choice(starts) if starts else 0
    out, count, i = [], 0, start
    while i < len(lines) and count < tokens:
        out.append(lines[i])
        count += approx_tokens(lines[i]) + 1
        i += 1
    return path, start + 1, "\n".join(out)


def numbered(text: str, first_line: int) -> str:
    """``cat -n`` style, as coding agents' file-read tools return files."""
    return "\n".join(f"{first_line + k:>6}\t{s}" for k, s in enumerate(text.split("\n")))


def prose(rng: random.Random, tokens: int) -> str:
    """Paragraphs of real English from stdlib docstrings, about ``tokens`` tokens-ish."""
    parts, count = [], 0
    while count < tokens:
        doc, entries = _module_docs(rng.choice(stdlib_files()))
        texts = [doc] + [d for _, d in entries]
        text = rng.choice([t for t in texts if t] or ["(undocumented module)"])
        para = " ".join(text.split())
        parts.append(para)
        count += approx_tokens(para)
    return "\n\n".join(parts)


def doc_page(rng: random.Random, tokens: int) -> tuple[str, str]:
    """(title, markdown) of an API reference page built from a stdlib module's docstrings."""
    path = rng.choice(stdlib_files())
    doc, entries = _module_docs(path)
    title = f"{path.stem} reference"
    out = [f"## {title}", "", doc.strip() or prose(rng, 60)]
    count = approx_tokens("\n".join(out))
    for sig, d in entries:
        if count >= tokens:
            break
        block = f"### `{sig}`\n\n{d.strip()}"
        out += ["", block]
        count += approx_tokens(block)
    if count < tokens:
        out += ["", prose(rng, tokens - count)]
    return title, "\n".join(out)


def grep_output(rng: random.Random, package: str, max_hits: int) -> tuple[str, str]:
    """(pattern, ``grep -rn`` output) over a few stdlib files, as a search tool returns it."""
    files = rng.sample(stdlib_files(), 6)
    words = [w for w in re.findall(r"\bdef (\w{4,})", "\n".join(_lines(files[0]))) if w]
    pattern = rng.choice(words) if words else "self"
    hits = []
    for p in files:
        for n, s in enumerate(_lines(p), 1):
            if pattern in s:
                hits.append(f"{repo_path(p, package)}:{n}:{s.strip()}")
                if len(hits) >= max_hits:
                    return pattern, "\n".join(hits)
    return pattern, "\n".join(hits) or "(no matches)"


def pytest_output(rng: random.Random, package: str, tokens: int) -> str:
    """A pytest run with one failure whose traceback shows real code."""
    n_files = rng.randint(3, 8)
    names = [f"tests/test_{p.stem}.py" for p in rng.sample(stdlib_files(), n_files)]
    counts = [rng.randint(3, 30) for _ in names]
    lines = [
        "============================= test session starts ==============================",
        "platform linux -- Python 3.11.9, pytest-8.3.2, pluggy-1.5.0",
        f"rootdir: /home/dev/{package}",
        f"collected {sum(counts)} items",
        "",
    ]
    failing = rng.randrange(n_files)
    for k, (name, c) in enumerate(zip(names, counts)):
        dots = "." * c if k != failing else "." * (c - 1) + "F"
        lines.append(f"{name} {dots:<40} [{100 * (k + 1) // n_files:>3}%]")
    path, first, code = code_excerpt(rng, max(40, tokens - approx_tokens("\n".join(lines))))
    lines += ["", "=" * 30 + " FAILURES " + "=" * 30, f"_____ test_{path.stem}_roundtrip _____", ""]
    lines += [f"    {s}" for s in code.split("\n")]
    lines += [
        "E       AssertionError: assert 3 == 4",
        f"{repo_path(path, package)}:{first + 3}: AssertionError",
        "=========================== short test summary info ============================",
        f"FAILED {names[failing]}::test_{path.stem}_roundtrip - AssertionError: assert 3 == 4",
        f"==== 1 failed, {sum(counts) - 1} passed in {rng.uniform(0.5, 9):.2f}s ====",
    ]
    return "\n".join(lines)


def ls_output(rng: random.Random, package: str) -> str:
    """``ls -la`` of a source directory."""
    files = rng.sample(stdlib_files(), rng.randint(6, 16))
    lines = [f"total {rng.randint(40, 400)}", "drwxr-xr-x  4 dev dev  4096 Mar  3 09:12 ."]
    for p in sorted(files):
        size = p.stat().st_size
        lines.append(f"-rw-r--r--  1 dev dev {size:>6} Mar {rng.randint(1, 28):>2} "
                     f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} {p.name}")
    return "\n".join(lines)


def git_diff(rng: random.Random, package: str, tokens: int) -> str:
    """A unified diff touching real code."""
    path, first, code = code_excerpt(rng, tokens)
    lines = code.split("\n")
    out = [f"diff --git a/{repo_path(path, package)} b/{repo_path(path, package)}",
           f"--- a/{repo_path(path, package)}", f"+++ b/{repo_path(path, package)}",
           f"@@ -{first},{len(lines)} +{first},{len(lines) + 1} @@"]
    k = rng.randrange(len(lines))
    for i, s in enumerate(lines):
        if i == k:
            out += [f"-{s}", f"+{s.rstrip()}  # checked", "+    # TODO: handle the empty case"]
        else:
            out.append(f" {s}")
    return "\n".join(out)


TOOL_NAMES = ("read_file", "bash", "grep", "edit_file", "write_file", "glob", "web_fetch",
              "todo_write", "task", "memory_search")


def _param(kind: str, text: str) -> dict:
    return {"type": kind, "description": text}


def tool_schemas(rng: random.Random, count: int, desc_tokens: int) -> list[dict]:
    """The first ``count`` OpenAI-style function tools of a coding agent, descriptions of
    about ``desc_tokens`` tokens-ish from stdlib prose."""
    params = {
        "read_file": {"path": _param("string", "Absolute or workspace-relative path."),
                      "offset": _param("integer", "First line to read (1-based)."),
                      "limit": _param("integer", "Number of lines to read.")},
        "bash": {"command": _param("string", "The shell command to run."),
                 "timeout": _param("integer", "Seconds before the command is killed.")},
        "grep": {"pattern": _param("string", "A regular expression."),
                 "path": _param("string", "Directory to search."),
                 "glob": _param("string", "Only files matching this glob.")},
        "edit_file": {"path": _param("string", "File to edit."),
                      "old_string": _param("string", "Exact text to replace."),
                      "new_string": _param("string", "Replacement text.")},
        "write_file": {"path": _param("string", "File to write."),
                       "content": _param("string", "The whole new content.")},
        "glob": {"pattern": _param("string", "A glob such as src/**/*.py.")},
        "web_fetch": {"url": _param("string", "An http(s) URL."),
                      "prompt": _param("string", "What to extract from the page.")},
        "todo_write": {"todos": {"type": "array", "items": {"type": "object", "properties": {
            "content": _param("string", "The task."),
            "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]}}}}},
        "task": {"description": _param("string", "A short task title."),
                 "prompt": _param("string", "Everything the sub-agent needs to know.")},
        "memory_search": {"query": _param("string", "What to look for in memory files.")},
    }
    tools = []
    for name in TOOL_NAMES[:count]:
        length = rng.randint(max(1, desc_tokens // 2), max(1, desc_tokens * 3 // 2))
        desc = f"{name.replace('_', ' ').capitalize()}. " + prose(rng, length)
        props = params[name]
        tools.append({"type": "function", "function": {
            "name": name, "description": desc,
            "parameters": {"type": "object", "properties": props, "required": [next(iter(props))]},
        }})
    return tools


def tools_markdown(tools: list[dict]) -> str:
    """The system prompt's tool section: each tool's description and JSON schema."""
    out = ["# Tools", "", "You can call these tools. Arguments must match the JSON schema."]
    for t in tools:
        f = t["function"]
        out += ["", f"## {f['name']}", "", f["description"], "", "```json",
                json.dumps(f["parameters"], indent=2, sort_keys=True), "```"]
    return "\n".join(out)


_SKILLS = ("release-notes", "pdf-extract", "db-migrations", "code-review", "benchmarking",
           "dependency-upgrade", "incident-triage", "api-docs")


def skills(rng: random.Random, count: int, tokens: int) -> list[tuple[str, str]]:
    """(name, markdown) skill files: when to use, steps with commands, notes from prose."""
    out = []
    for name in rng.sample(_SKILLS, min(count, len(_SKILLS))):
        steps = [f"{i}. Run `{rng.choice(['make', 'uv run', 'npm run', 'just'])} {name}-{i}` "
                 f"and check the output under `reports/{name}/`." for i in range(1, 6)]
        body = (f"## Skill: {name}\n\nUse this skill when the task mentions {name.replace('-', ' ')}."
                f"\n\n### Steps\n\n" + "\n".join(steps) + "\n\n### Notes\n\n")
        out.append((name, body + prose(rng, max(20, tokens - approx_tokens(body)))))
    return out


_FACTS = (
    ("The user prefers {} over {}.", ("pytest", "ruff", "uv", "httpx"), ("unittest", "black",
                                                                         "pip", "requests")),
    ("Run `{}` before committing.", ("make check", "uv run pytest -q", "just lint", "tox -e py311"),),
    ("Never edit files under `{}/` by hand.", ("vendor", "generated", "migrations", "dist"),),
    ("The user's timezone is {}.", ("UTC", "Europe/Berlin", "America/Chicago", "Asia/Tokyo"),),
    ("Deploys of the {} service go through the {} pipeline.", ("billing", "search", "auth"),
     ("nightly", "staging", "canary")),
)


def memory(rng: random.Random, tokens: int) -> str:
    """A MEMORY.md of bullet facts about the user and the project."""
    out, count = ["# Memory", ""], 0
    while count < tokens:
        template, *slots = rng.choice(_FACTS)
        line = "- " + template.format(*(rng.choice(s) for s in slots))
        if rng.random() < 0.3:
            line += f" (noted {rng.randint(2, 40)} days ago)"
        out.append(line)
        count += approx_tokens(line)
    return "\n".join(out)
