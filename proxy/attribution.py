"""``--normalize-claude-attribution``: drop Claude Code's per-request billing line.

Claude Code (2.1.36 and later) starts its system prompt with a text block such as
``x-anthropic-billing-header: cc_version=2.1.100.7b4; cc_entrypoint=cli; cch=eb6c6;`` whose
``cch`` checksum changes on every request. Anthropic's API reads it; any other engine sees
plain text a few dozen tokens into the prompt, so its prefix cache ends there on every turn.
The line means nothing to a local model, so removing it changes no instruction; it is still a
rewrite of what the client sent, hence opt-in. (Setting CLAUDE_CODE_ATTRIBUTION_HEADER=0 in
Claude Code's environment stops it at the source.)
"""

from __future__ import annotations

import re

from irminsul.proxy.system_text import map_system_texts

BILLING_LINE = re.compile(r"^[ \t]*x-anthropic-billing-header:[^\n]*(\n|$)", re.MULTILINE)


def strip_attribution(text: str) -> str:
    """``text`` without its x-anthropic-billing-header lines."""
    return BILLING_LINE.sub("", text) if "x-anthropic-billing-header" in text else text


def normalize_attribution(body: dict, api: str) -> tuple[dict, bool]:
    """A copy of ``body`` without billing lines in its system prompt (a block holding only
    that line is dropped), and whether anything was removed. ``body`` is not changed."""
    changed = False

    def fn(text: str) -> str:
        nonlocal changed
        out = strip_attribution(text)
        changed = changed or out != text
        return out

    out = map_system_texts(body, api, fn)
    return (out, True) if changed else (body, False)
