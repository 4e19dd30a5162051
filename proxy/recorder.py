"""``--record FILE``: every request body, appended as one JSONL line, for `irminsul replay`.

Line: ``{"type": "request", "endpoint": ..., "time": ISO-8601 UTC, "session": ..., "body": {...}}``.
The body is the one the client sent (before any rewrite by the proxy). Serialising and writing
happen on one background thread, in submission order, so a 1 MB body never stalls the loop.
Callers must not mutate a body after handing it over (the proxy's handlers never do).
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Recorder:
    """Appends request lines to ``path`` (created if missing; opened at construction, so a bad
    path fails at start)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="irminsul-record")
        self._closed = False
        self.failed = 0

    def record(self, endpoint: str, session: str, body: Any) -> None:
        """Queue one line (non-blocking)."""
        if self._closed:
            raise RuntimeError("Recorder is closed")
        time = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self._pool.submit(self._write, {"type": "request", "endpoint": endpoint, "time": time,
                                        "session": session, "body": body})

    def _write(self, line: dict) -> None:
        try:
            self._file.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
            self._file.flush()
        except (OSError, TypeError, ValueError):
            self.failed += 1
            log.exception("could not record a request to %s", self.path)

    def close_sync(self) -> None:
        """Write every queued line, then close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._file.close()

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)
