"""The proxy's embedded mode: the engine server started inside the proxy's own process.

proxy/command.py imports this module only when no --upstream is given, so the proxy alone
never imports torch.
"""

from __future__ import annotations

import dataclasses

from ...proxy.config import ProxyConfig
from .command import DEFAULT_MODEL, start_embedded
from .config import EngineConfig


def embedded_engine_config(config: ProxyConfig,
                           engine_config: EngineConfig | None = None) -> EngineConfig:
    """The engine's config in embedded mode: ``engine_config`` if given, else
    ``config.model_dir`` (default: the shipped tiny model) with EngineConfig's defaults and the
    proxy's engine options (audit_rate, approx_trie); audits go to the proxy's --db unless
    ``engine_config`` names another database."""
    engine_config = engine_config or EngineConfig(model_dir=config.model_dir or str(DEFAULT_MODEL),
                                                  audit_rate=config.audit_rate,
                                                  approx_trie=config.approx_trie)
    if engine_config.audit_db is None and config.db is not None:
        engine_config = dataclasses.replace(engine_config, audit_db=config.db)
    return engine_config


def embedded_upstream_ctx(config: ProxyConfig, *, engine_config: EngineConfig | None = None):
    """An async generator function (app) -> yields the engine's URL once, for
    ``create_app(upstream_ctx=...)``: the engine starts on 127.0.0.1 (a free port) before the
    proxy probes it and stops after the proxy closed its session.

    The engine serves ``engine_config`` if given, else ``config.model_dir`` (default: the
    shipped tiny model) with EngineConfig's defaults and the proxy's engine options. Its quality
    audits go to the proxy's savings database unless ``engine_config`` names another, so
    `irminsul report` reads requests and audits from one file.
    """
    engine_config = embedded_engine_config(config, engine_config)

    async def ctx(app):
        runner, url = await start_embedded(engine_config)
        try:
            yield url
        finally:
            await runner.cleanup()

    return ctx
