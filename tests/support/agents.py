"""Real agent CLIs (Claude Code, opencode) for end-to-end tests and bench/agents_second_turn.py.

``install_agents()`` npm-installs the pinned client versions once into ``.cache/agents`` inside
the checkout and reuses that install while the pins match; a failed install raises
``AgentInstallError`` carrying npm's own output. The other helpers build each client's
environment (a private HOME, the proxy as base URL, no other network) and run it as a child
process without blocking the event loop that serves the proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]
AGENTS_DIR = REPO / ".cache" / "agents"
TINY_MODEL = REPO / "examples" / "models" / "tiny-mla"
# Pinned: the tests assert these clients' wire behaviour (headers, flags, retries).
PINS = {"@anthropic-ai/claude-code": "2.1.330", "opencode-ai": "1.18.33"}
CLAUDE_SAFE_FLAGS = ("--bare", "--tools", "Bash", "--allowedTools", "Bash(echo:*)")
NPM_TIMEOUT_S = 900


class AgentInstallError(RuntimeError):
    """npm could not install the clients; the message holds npm's output."""


class AgentInstall(NamedTuple):
    root: Path
    claude: Path
    opencode: Path
    seconds: float  # time spent installing (0.0 when the cached install was reused)


class AgentRun(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        return (f"exit {self.returncode} after {self.seconds:.1f} s\n--- stdout\n"
                f"{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}")


def _installed_version(root: Path, package: str) -> str | None:
    manifest = root / "node_modules" / package / "package.json"
    try:
        return json.loads(manifest.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def _binaries(root: Path) -> tuple[Path, Path]:
    return root / "node_modules" / ".bin" / "claude", root / "node_modules" / ".bin" / "opencode"


def _check_runs(binary: Path, version: str) -> None:
    """The native binary must answer --version with the pinned version (claude's postinstall
    swaps a placeholder for the platform binary; a skipped postinstall leaves the stub)."""
    try:
        with tempfile.TemporaryDirectory() as home:
            out = subprocess.run([str(binary), "--version"], check=False, capture_output=True,
                                 text=True, timeout=60, env=base_env(Path(home)))
    except OSError as e:
        raise AgentInstallError(f"{binary} cannot run: {e}") from e
    if out.returncode != 0 or version not in out.stdout:
        raise AgentInstallError(f"{binary} --version gave exit {out.returncode}, stdout "
                                f"{out.stdout!r}, stderr {out.stderr[-2000:]!r}; expected "
                                f"{version}")


def install_agents(root: Path = AGENTS_DIR) -> AgentInstall:
    """Install (or reuse) the pinned clients under ``root``. Changes ``root`` only."""
    start = time.perf_counter()
    if all(_installed_version(root, p) == v for p, v in PINS.items()):
        seconds = 0.0
    else:
        npm = shutil.which("npm")
        if npm is None:
            raise AgentInstallError("npm is not on PATH; the e2e agent tests need node >= 20")
        root.mkdir(parents=True, exist_ok=True)
        (root / "package.json").write_text(json.dumps(
            {"name": "irminsul-e2e-agents", "private": True, "dependencies": PINS}, indent=1))
        try:
            out = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=warn"],
                                 cwd=root, check=False, capture_output=True, text=True,
                                 timeout=NPM_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise AgentInstallError(f"npm install timed out after {NPM_TIMEOUT_S} s:\n"
                                    f"{e.stderr}") from e
        if out.returncode != 0:
            raise AgentInstallError(f"npm install failed (exit {out.returncode}) in {root}:\n"
                                    f"{out.stdout[-4000:]}\n{out.stderr[-8000:]}")
        wrong = {p: _installed_version(root, p) for p in PINS
                 if _installed_version(root, p) != PINS[p]}
        if wrong:
            raise AgentInstallError(f"npm install left {wrong} instead of {PINS}:\n"
                                    f"{out.stderr[-4000:]}")
        seconds = time.perf_counter() - start
    claude, opencode = _binaries(root)
    _check_runs(claude, PINS["@anthropic-ai/claude-code"])
    _check_runs(opencode, PINS["opencode-ai"])
    return AgentInstall(root, claude, opencode, seconds)


def short_reply_model(out: Path, every: int = 8) -> Path:
    """A view of the shipped tiny model (files linked, not copied) whose generation config
    declares every ``every``-th token id an end of turn.

    Its random weights never sample the real EOS, so every reply would run to max_tokens, and
    Claude Code treats a reply cut at max_tokens as an API error (it retries, then exits 1).
    With this config a reply ends after about ``every`` tokens, as a trained model's would.
    Prompts, chunking and KV reuse are those of the shipped model (the fingerprint covers
    config.json, tokenizer and weights, not generation_config.json).
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        link = out / name
        if not link.exists():
            link.symlink_to(TINY_MODEL / name)
    gen = json.loads((TINY_MODEL / "generation_config.json").read_text())
    vocab = json.loads((TINY_MODEL / "config.json").read_text())["vocab_size"]
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    gen["eos_token_id"] = sorted(set(eos) | set(range(every, vocab, every)))
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def base_env(home: Path) -> dict[str, str]:
    """A clean environment: no keys or settings of the machine's user leak into the client."""
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "LANG": "C.UTF-8", "TERM": "dumb", "TMPDIR": str(home)}


def claude_env(home: Path, base_url: str, *, max_output_tokens: int | None = None) -> dict:
    env = base_env(home)
    env.update(ANTHROPIC_BASE_URL=base_url, ANTHROPIC_API_KEY="local-e2e",
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1")
    if max_output_tokens is not None:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(max_output_tokens)
    return env


def claude_argv(install: AgentInstall, prompt: str, session_id: str, *,
                resume: bool = False) -> list[str]:
    """``claude -p`` in JSON output; the first turn names the session, later turns resume it."""
    session = ["--resume", session_id] if resume else ["--session-id", session_id]
    return [str(install.claude), "-p", prompt, "--output-format", "json", *CLAUDE_SAFE_FLAGS,
            *session]


def opencode_env(home: Path, base_url: str, *, model: str, output_limit: int) -> dict:
    """Writes $HOME/.config/opencode/opencode.json: provider ``local`` (OpenAI-compatible at
    ``base_url``/v1) with one model and only the bash tool (a small prompt for a CPU model)."""
    env = base_env(home)
    cfg_dir = home / ".config" / "opencode"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "$schema": "https://opencode.ai/config.json", "autoupdate": False,
        "share": "disabled", "tools": {"*": False, "bash": True},
        "permission": {"bash": "allow"},
        "provider": {"local": {
            "npm": "@ai-sdk/openai-compatible", "name": "Irminsul",
            "options": {"baseURL": base_url.rstrip("/") + "/v1", "apiKey": "local-e2e"},
            "models": {model: {"name": model, "tool_call": True,
                               "limit": {"context": 32768, "output": output_limit}}}}},
    }
    (cfg_dir / "opencode.json").write_text(json.dumps(config, indent=1))
    # PURE / DISABLE_DEFAULT_PLUGINS: without them opencode npm-installs @opencode-ai/plugin
    # into its config dir at every fresh HOME (a run-time download).
    env.update(OPENCODE_DISABLE_MODELS_FETCH="1", OPENCODE_PURE="1",
               OPENCODE_DISABLE_DEFAULT_PLUGINS="1", OPENCODE_DISABLE_AUTOUPDATE="1",
               OPENCODE_DISABLE_LSP_DOWNLOAD="1", OPENCODE_DISABLE_SHARE="1",
               npm_config_offline="true")
    return env


def opencode_argv(install: AgentInstall, model: str, prompt: str, *,
                  cont: bool = False) -> list[str]:
    """``opencode run``; ``--title`` skips the title-generation request; ``cont`` continues
    the last session (opencode keeps it under $HOME)."""
    return [str(install.opencode), "run", "-m", f"local/{model}", "--title", "e2e",
            *(["--continue"] if cont else []), prompt]


async def run_agent(argv: list[str], env: dict, cwd: Path, timeout: float) -> AgentRun:
    """Run one client invocation to completion (killed, with its output, after ``timeout``)."""
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        run = AgentRun(-9, out.decode(errors="replace"), err.decode(errors="replace"),
                       time.perf_counter() - start)
        raise AssertionError(f"{argv[0]} timed out: {run.describe()}") from None
    return AgentRun(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                    time.perf_counter() - start)
