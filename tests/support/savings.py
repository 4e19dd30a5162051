"""Helpers for tests of the savings log and the report."""

from __future__ import annotations

import time

from irminsul.proxy.savings import RequestRow


def make_row(**overrides) -> RequestRow:
    """A valid RequestRow with every counter known; keyword arguments override fields."""
    fields = {
        "session": "s1",
        "model": "tiny-mla",
        "endpoint": "/v1/chat/completions",
        "upstream_mode": "embedded",
        "status": 200,
        "prompt_tokens": 100,
        "exact_prefix_tokens": 40,
        "reused_tokens": 30,
        "recomputed_tokens": 10,
        "new_tokens": 20,
    }
    fields.update(overrides)
    return RequestRow(**fields)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.005) -> float:
    """Poll ``predicate`` until it is true; returns the seconds it took. Fails after timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start
