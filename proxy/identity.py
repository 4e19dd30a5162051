"""Who sent a request: its session (for miss-cause tracking) and its tenant (hashed API key)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import xxhash

from irminsul.proxy.reorder import is_volatile

SESSION_HEADERS = ("x-claude-code-session-id", "session-id", "x-session-id")
SESSION_MAX_CHARS = 200
# The salt keeps tenant digests from being compared across deployments; set your own with
# `tenant_salt` in the proxy's config. API keys carry enough entropy that the digest, though
# not a cryptographic hash, does not let anyone recover them.
DEFAULT_TENANT_SALT = "irminsul-tenant-v1"


def session_key(headers: Mapping[str, str], body: Any) -> str:
    """The session a request belongs to, by the first of these that is present:

    1. a header X-Claude-Code-Session-Id, session-id or x-session-id (any case);
    2. the body's ``prompt_cache_key`` (OpenAI);
    3. the body's ``metadata.user_id`` (Anthropic; Claude Code puts its session there);
    4. ``derived-`` + xxh3_64 of the first system prompt and the first user message, which a
       conversation resends every turn. The system prompt counts by its set of stable lines:
       agents rewrite a timestamp/cwd header and reorder sections between turns, and that must
       show as a miss cause within the session, not as a new session.
    """
    lowered = {str(k).lower(): v for k, v in reversed(list(headers.items()))}  # first one wins
    for name in SESSION_HEADERS:
        value = str(lowered.get(name) or "").strip()
        if value:
            return value[:SESSION_MAX_CHARS]
    body = body if isinstance(body, Mapping) else {}
    key = body.get("prompt_cache_key")
    if isinstance(key, str) and key.strip():
        return key.strip()[:SESSION_MAX_CHARS]
    meta = body.get("metadata")
    if isinstance(meta, Mapping) and isinstance(meta.get("user_id"), str) and meta["user_id"]:
        return meta["user_id"][:SESSION_MAX_CHARS]
    system, user = _first_system_and_user(body)
    digest = xxhash.xxh3_64_hexdigest(f"{_stable_lines(system)}\x00{user}".encode())
    return f"derived-{digest}"


@lru_cache(maxsize=64)
def _stable_lines(system: str) -> str:
    """The system prompt's distinct stable lines, sorted, one per line. Cached by the whole
    text: agents resend the same system prompt every turn, and scanning it for volatile
    lines costs a new prompt ~1 ms per 17K characters (reorder.is_volatile), while the cache
    lookup is a hash and a compare."""
    return "\n".join(sorted({ln for ln in system.splitlines() if not is_volatile(ln)}))


def _first_system_and_user(body: Mapping) -> tuple[str, str]:
    system = body.get("system", body.get("instructions"))  # Anthropic / Responses API
    user = None
    messages = body.get("messages")
    if not isinstance(messages, list):
        messages = body.get("input") if isinstance(body.get("input"), list) else []
    for m in messages:
        if not isinstance(m, Mapping):
            continue
        if system is None and m.get("role") in ("system", "developer"):
            system = m.get("content")
        elif user is None and m.get("role") == "user":
            user = m.get("content")
    if user is None:  # Responses API string input, /v1/completions, SGLang /generate
        for name in ("input", "prompt", "text"):
            if isinstance(body.get(name), (str, list)):
                user = body[name]
                break
    return _text(system), _text(user)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)


def tenant_hash(api_key: str, salt: str | bytes = DEFAULT_TENANT_SALT) -> str:
    """Salted xxh3_128 hex digest of an API key: what the savings log stores as the tenant."""
    if not isinstance(api_key, str) or not api_key:
        raise ValueError("tenant_hash needs a non-empty API key")
    salt_bytes = salt.encode() if isinstance(salt, str) else bytes(salt)
    return xxhash.xxh3_128_hexdigest(salt_bytes + b"\x00" + api_key.encode())


def api_key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The API key of a request: ``Authorization: Bearer KEY``, ``x-api-key`` or ``api-key``."""
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    auth = lowered.get("authorization", "").strip()
    if auth.lower().startswith("bearer "):
        auth = auth[7:].strip()
    for value in (auth, lowered.get("x-api-key", ""), lowered.get("api-key", "")):
        if value.strip():
            return value.strip()
    return None


def tenant_from_headers(
    headers: Mapping[str, str], salt: str | bytes = DEFAULT_TENANT_SALT
) -> str | None:
    """tenant_hash() of the request's API key, or None when it carries none."""
    key = api_key_from_headers(headers)
    return None if key is None else tenant_hash(key, salt)


def tenant_extra_key(isolate: bool, tenant: str | None, body: Mapping) -> str | None:
    """SGLang's ``extra_key`` for an isolated tenant (--isolate-tenants): it partitions
    SGLang's own radix tree, and with it the irminsul backend's chunk index, so one tenant's
    exact-prefix hits cannot reveal another's prompts through timing either (namespaced chunk
    keys alone leave the engine's prefix cache shared). A key the client sent stays inside its
    tenant's partition. None when tenants are not isolated or the request has no API key."""
    if not (isolate and tenant):
        return None
    own = body.get("extra_key")
    return f"irminsul-tenant:{tenant}" + (f":{own}" if isinstance(own, str) and own else "")
