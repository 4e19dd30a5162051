"""`irminsul sglang ...`: start SGLang 0.5.23's server with the irminsul radix-cache backend.

A convenience only: it is `python -m sglang.launch_server ARGS --radix-cache-backend irminsul`
with the plugin whitelisted and the backend's settings in the environment (config.py).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence

import click

from .config import SGLANG_POLICIES, SGLangReuseConfig
from .plugin import BACKEND_NAME

FLAG = "--radix-cache-backend"


def launch(args: Sequence[str], environ: Mapping[str, str], *, policy: str | None = None,
           pic_k: int | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the SGLang server; raises click.UsageError on a conflicting flag."""
    args = list(args)
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith(FLAG + "=") else (
            args[i + 1] if arg == FLAG and i + 1 < len(args) else None)
        if value is not None and value != BACKEND_NAME:
            raise click.UsageError(f"{FLAG} {value} conflicts with irminsul's backend")
    if not any(a == FLAG or a.startswith(FLAG + "=") for a in args):
        args += [FLAG, BACKEND_NAME]
    env = dict(environ)
    # Unset, SGLang loads every installed plugin (ours included); a whitelist must name us.
    allowed = [p.strip() for p in env.get("SGLANG_PLUGINS", "").split(",") if p.strip()]
    if allowed and BACKEND_NAME not in allowed:
        env["SGLANG_PLUGINS"] = ",".join([*allowed, BACKEND_NAME])
    if policy is not None:
        env["IRMINSUL_SGLANG_POLICY"] = policy
    if pic_k is not None:
        env["IRMINSUL_SGLANG_PIC_K"] = str(pic_k)
    try:
        SGLangReuseConfig.from_env(env)  # bad settings fail here, not in the scheduler
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    return [sys.executable, "-m", "sglang.launch_server", *args], env


@click.command(
    "sglang",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("--policy", type=click.Choice(SGLANG_POLICIES), default=None,
              help="pic: SGLang's radix cache plus content hits (default); prefix: radix only.")
@click.option("--pic-k", type=click.IntRange(min=0), default=None,
              help="Tokens recomputed where a reused run's left context changed (default 0).")
@click.option("--dry-run", is_flag=True, help="Print the command and settings, do not run.")
@click.argument("sglang_args", nargs=-1, type=click.UNPROCESSED)
def sglang_command(policy, pic_k, dry_run, sglang_args):
    """Start SGLang 0.5.23 with Irminsul's backend; other arguments go to sglang.launch_server
    (e.g. `irminsul sglang --model-path deepseek-ai/DeepSeek-V2-Lite-Chat --port 30000`)."""
    argv, env = launch(sglang_args, os.environ, policy=policy, pic_k=pic_k)
    if dry_run:
        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
        click.echo(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in sorted(changed.items())),
                             *map(shlex.quote, argv)]))
        return
    os.execvpe(argv[0], argv, env)
