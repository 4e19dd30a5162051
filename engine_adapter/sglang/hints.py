"""The Irminsul annotation inside SGLang 0.5.23's ``kv_hints`` envelope (no SGLang import).

SGLang types ``kv_hints`` (``managers/kv_hints.py``: ``KvHintsEnvelope{protocol_version,
message_id, actions: [KvHintAction{action_id, action_type, action_version, payload}]}``) and
refuses anything else at the HTTP layer, while unknown top-level keys never reach the scheduler.
So the one way an annotation reaches the cache backend is as one action of that envelope:

    {"protocol_version": "1", "message_id": <rid>,
     "actions": [{"action_id": "irminsul", "action_type": "irminsul.chunks",
                  "action_version": "1", "payload": <Annotation.to_json()>}]}

SGLang's consumers ignore actions they do not implement, so the envelope is harmless to a stock
server. The backend reads the payload here; a malformed one is ignored (the request is then
served from its own token IDs), never an error.
"""

from __future__ import annotations

import logging
from typing import Any

from ..contract import Annotation, ContractError

log = logging.getLogger(__name__)

ACTION_TYPE = "irminsul.chunks"
ACTION_VERSION = "1"
ENVELOPE_VERSION = "1"


def kv_hints_envelope(annotation: Annotation, message_id: str) -> dict[str, Any]:
    """The ``kv_hints`` value carrying ``annotation`` (what a client of /generate sends)."""
    return {
        "protocol_version": ENVELOPE_VERSION,
        "message_id": str(message_id),
        "actions": [{
            "action_id": "irminsul",
            "action_type": ACTION_TYPE,
            "action_version": ACTION_VERSION,
            "payload": annotation.to_json(),
        }],
    }


def _field(obj: Any, name: str) -> Any:
    # SGLang hands us a msgspec KvHintsEnvelope; tests and old callers may pass a dict.
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def annotation_from_kv_hints(kv_hints: Any) -> Annotation | None:
    """The annotation of the first ``irminsul.chunks`` v1 action, or None (absent or bad)."""
    if kv_hints is None:
        return None
    for action in _field(kv_hints, "actions") or ():
        if _field(action, "action_type") != ACTION_TYPE:
            continue
        if _field(action, "action_version") != ACTION_VERSION:
            log.warning("ignoring irminsul kv_hints action version %r",
                        _field(action, "action_version"))
            return None
        try:
            return Annotation.from_json(_field(action, "payload"))
        except ContractError as e:
            log.warning("ignoring malformed irminsul annotation in kv_hints: %s", e)
            return None
    return None
