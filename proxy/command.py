"""`irminsul proxy` / `irminsul-proxy`: the click command; its options map 1:1 onto ProxyConfig."""

from __future__ import annotations

import dataclasses
import logging

import click

from irminsul import SHIPPED_MODEL_DIR
from irminsul.proxy.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_UPSTREAM_TIMEOUT_S, ProxyConfig
from irminsul.proxy.identity import DEFAULT_TENANT_SALT

# Where the embedded engine's upstream context lives (wired by the engine side): a function
# taking the ProxyConfig and returning an async generator function (app) -> yields the URL.
EMBEDDED_MODULE = "irminsul.engine_adapter.embedded.proxy_upstream"
EMBEDDED_ATTR = "embedded_upstream_ctx"


def _embedded_upstream(config: ProxyConfig):
    import importlib

    try:
        module = importlib.import_module(EMBEDDED_MODULE)
    except ImportError as e:
        raise click.UsageError(
            f"no --upstream given and the embedded engine cannot start ({e}); install the "
            "engine extra (pip install 'irminsul[engine]') or pass --upstream HOST:PORT"
        ) from e
    return getattr(module, EMBEDDED_ATTR)(config)


@click.command("proxy")
@click.option("--upstream", metavar="URL",
              help="The engine to forward to (SGLang or `irminsul serve`), e.g. localhost:30000 "
                   "or http://gpu-box:30000. Without it the embedded engine is started in this "
                   "process on --model-dir (default: the shipped tiny model).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Loopback by default: the proxy relays API keys, so "
                   "expose it on purpose (0.0.0.0) only behind your own access control.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port).")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False),
              help="The model's directory: its config.json gives FLOPs saved, its files the "
                   "model fingerprint that namespaces chunk keys, and its tokenizer is used "
                   "unless --tokenizer says otherwise.")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False),
              help="A directory with tokenizer.json and tokenizer_config.json (chat template). "
                   "Without a tokenizer the proxy still relays and logs, but cannot chunk "
                   "prompts, annotate them, or explain prefix misses.")
@click.option("--db", default="irminsul.db", show_default=True, type=click.Path(dir_okay=False),
              help="SQLite savings log, one row per request (read it with `irminsul report`).")
@click.option("--isolate-tenants", is_flag=True,
              help="Namespace chunk keys by the hashed API key, and send it as SGLang's "
                   "extra_key on chat/completions/generate so the engine's own prefix cache is "
                   "partitioned too: one tenant's prompts are never reused for another's "
                   "(requests without a key share one namespace).")
@click.option("--reorder", type=click.Choice(["off", "stable-first"]), default="off",
              show_default=True,
              help="stable-first: move volatile system-prompt lines (dates, times, cwd, git "
                   "status, token budgets) after the stable ones, so a stock prefix cache "
                   "keeps the rest. It changes what the model sees; applied to stock "
                   "upstreams only.")
@click.option("--record", type=click.Path(dir_okay=False),
              help="Append every request body to this JSONL file (for `irminsul replay`). It "
                   "holds prompts verbatim: keep it private.")
@click.option("--log-prompts", is_flag=True,
              help="Store each rendered prompt in the savings log (large; holds prompts "
                   "verbatim).")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=DEFAULT_MAX_BODY_BYTES,
              show_default=True, help="Larger request bodies are refused with 413.")
@click.option("--upstream-timeout", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_UPSTREAM_TIMEOUT_S, show_default=True, metavar="SECONDS",
              help="Longest silence allowed from the upstream (before its answer starts, or "
                   "between two stream chunks); then 504, or an error event mid-stream.")
@click.option("--normalize-claude-attribution", is_flag=True,
              help="Drop the x-anthropic-billing-header line Claude Code puts at the top of "
                   "its system prompt; its checksum changes every request and would end any "
                   "prefix cache there. (CLAUDE_CODE_ATTRIBUTION_HEADER=0 stops it at the "
                   "source.)")
@click.option("--tenant-salt", envvar="IRMINSUL_TENANT_SALT", default=DEFAULT_TENANT_SALT,
              show_default=True,
              help="Salt of the API-key hash logged as the tenant (env IRMINSUL_TENANT_SALT).")
@click.option("--audit-rate", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Embedded engine only: share of requests served with reused KV that the "
                   "engine re-runs with full in idle time, recording KL and agreement in --db "
                   "(see `irminsul serve --audit-rate`).")
@click.option("--approx-trie/--no-approx-trie", default=True, show_default=True,
              help="Embedded engine only: keep each request's composed KV as an approximate "
                   "prefix-trie tail for the next turn (see `irminsul serve --approx-trie`).")
@click.option("--prewarm", type=click.IntRange(0, 64), default=0, show_default=True,
              metavar="N",
              help="SGLang with --radix-cache-backend irminsul: before a chat/completions "
                   "request, send up to N prefill-only /generate requests that end where a "
                   "run of content seen before follows new tokens (a rewritten header), so "
                   "the backend can place that run (it places one run per request). The "
                   "proxy then tokenizes before forwarding (as in irminsul mode), and each "
                   "pre-warm costs a round trip; usage and the savings log count only what "
                   "was saved.")
@click.option("--prewarm-min-tokens", type=click.IntRange(min=1), default=256,
              show_default=True, help="Shortest run of seen content worth a pre-warm request.")
@click.option("--prewarm-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens at the start of each such run the pre-warm computes too, in their "
                   "new left context (pic's carve-out; the backend places the rest).")
@click.option("--kv-hints", is_flag=True,
              help="SGLang with --radix-cache-backend irminsul: send the chunk annotation "
                   "(message and section anchors, tenant namespace) with /generate requests in "
                   "SGLang's kv_hints envelope, the one field that reaches its scheduler (the "
                   "OpenAI endpoints have none). The proxy then tokenizes /generate requests "
                   "before forwarding. A stock SGLang ignores the envelope's action.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, help="Log verbosity.")
def proxy_command(log_level: str, **options) -> None:
    """Run the caching reverse proxy in front of an OpenAI/Anthropic-compatible engine.

    Point your agent's base URL at http://HOST:PORT (/v1 for OpenAI SDKs). The proxy serves
    /v1/chat/completions, /v1/completions, /v1/responses, /v1/messages (+count_tokens) and
    /generate, relays every other path unchanged, logs what the cache saved to --db and
    exposes Prometheus metrics at /metrics.
    """
    from irminsul.proxy.app import run_proxy

    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ProxyConfig(**options)
    except (TypeError, ValueError) as e:
        raise click.UsageError(str(e)) from e
    if config.upstream is None and config.model_dir is None:
        # Embedded mode on the shipped model: the proxy tokenizes, fingerprints and estimates
        # FLOPs with the same model directory the engine serves.
        config = dataclasses.replace(config, model_dir=str(SHIPPED_MODEL_DIR))
    upstream_ctx = None if config.upstream else _embedded_upstream(config)
    run_proxy(config, upstream_ctx=upstream_ctx)
