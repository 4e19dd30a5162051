"""Start a fake SGLang and an Irminsul proxy in front of it, both real servers on 127.0.0.1."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, NamedTuple

from irminsul.proxy.app import create_app
from irminsul.proxy.config import ProxyConfig
from irminsul.proxy.state import STATE_KEY
from support.fake_sglang import FakeSGLang

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO / "examples" / "models" / "tiny-mla"


def tiny_tokenizer():
    """The shipped tiny model's tokenizer, or None while it is not in the tree."""
    if not (TINY_MODEL / "tokenizer.json").is_file():
        return None
    try:
        from irminsul.chunking.tokenizer import ModelTokenizer
    except ImportError:
        return None
    return ModelTokenizer.from_dir(TINY_MODEL)


class Stack(NamedTuple):
    fake: FakeSGLang
    upstream: Any  # the fake's TestServer
    proxy: Any  # the proxy's TestServer
    app: Any

    @property
    def base(self) -> str:
        return str(self.proxy.make_url("")).rstrip("/")

    @property
    def state(self):
        return self.app[STATE_KEY]

    async def close(self) -> None:
        """Stop the proxy (rows flushed, log closed), then the fake."""
        await self.proxy.close()
        await self.upstream.close()


async def start_stack(aiohttp_server, *, fake: FakeSGLang | None = None, tokenizer=None,
                      **config) -> Stack:
    fake = fake if fake is not None else FakeSGLang(tokenizer=tokenizer)
    upstream = await aiohttp_server(fake.app())
    cfg = ProxyConfig(upstream=str(upstream.make_url("")), **config)
    app = create_app(cfg, tokenizer=tokenizer)
    proxy = await aiohttp_server(app)
    return Stack(fake, upstream, proxy, app)


def read_rows(db: Path) -> list[dict]:
    """Every row of the savings log, oldest first."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY id")]
    finally:
        conn.close()
