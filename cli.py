"""The `irminsul` command line: a click group whose commands live beside the code they drive.

Commands are imported lazily, so `irminsul report` or `irminsul-proxy --upstream ...` never
import torch; only `serve` (and the proxy's embedded mode) do.
"""

from __future__ import annotations

import importlib
import sys

import click

# name -> (module, attribute, one-line help shown by `irminsul --help` without importing it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "proxy": (
        "irminsul.proxy.command",
        "proxy_command",
        "Run the caching reverse proxy (embedded engine when no --upstream).",
    ),
    "serve": (
        "irminsul.engine_adapter.embedded.command",
        "serve_command",
        "Serve a local DeepSeek-V2-family checkpoint with the embedded engine.",
    ),
    "doctor": (
        "irminsul.engine_adapter.doctor",
        "doctor_command",
        "Check a live server's content reuse: hits reported, counts honest, outputs agree.",
    ),
    "sglang": (
        "irminsul.engine_adapter.sglang.command",
        "sglang_command",
        "Start SGLang 0.5.23 with the irminsul radix-cache backend (content reuse).",
    ),
    "eval": (
        "irminsul.engine_adapter.embedded.quality",
        "eval_command",
        "Measure output quality of each reuse policy against a full prefill.",
    ),
    "report": ("irminsul.proxy.report", "report_command", "Show what the cache saved."),
    "replay": ("irminsul.proxy.replay", "replay_command", "Replay a trace against an endpoint."),
    "traces": ("irminsul.proxy.traces", "traces_command", "Generate agentic traffic traces."),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command runs."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="irminsul")
def main():
    """Irminsul: position-independent KV caching for MLA models (DeepSeek-V2/V3, Kimi)."""


def proxy_main():
    """Entry point of `irminsul-proxy`: the same as `irminsul proxy`."""
    proxy_command = main.get_command(None, "proxy")
    proxy_command.main(args=sys.argv[1:], prog_name="irminsul-proxy")


if __name__ == "__main__":
    main()
