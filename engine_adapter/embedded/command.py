"""`irminsul serve` and the proxy's embedded mode: run the embedded engine behind its HTTP API.

torch and the model are imported only when a command actually runs, so `irminsul --help` and
the proxy-only install stay light.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from dataclasses import fields
from pathlib import Path

import click
from aiohttp import web

import irminsul

from .config import CUDA_GRAPHS, DEVICES, DTYPES, POLICIES, EngineConfig
from .gate import BUILTIN, GATE_FILE

DEFAULT_MODEL = irminsul.SHIPPED_MODEL_DIR
# The CLI's defaults are EngineConfig's, read from the dataclass so the two cannot drift.
DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}
# The quality thresholds default to the model's gate file (gate.py).
_GATE_DEFAULT = "MODEL/" + GATE_FILE + "'s gate, else {}"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ByteSize(click.ParamType):
    """A byte count: 1073741824, 512M, 8G or 8GiB (binary units)."""

    name = "bytes"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(value))
        if m is None:
            self.fail(f"{value!r} is not a byte size (e.g. 1073741824, 512M, 8G)", param, ctx)
        return int(m.group(1)) * _UNITS[m.group(2).lower()]


def engine_config(**kw) -> EngineConfig:
    """EngineConfig from CLI values; its own checks become a usage error naming the problem."""
    try:
        return EngineConfig(**kw)
    except (TypeError, ValueError) as e:
        raise click.UsageError(str(e)) from None


def build_app(config: EngineConfig) -> web.Application:
    """Load the model once and wrap it in the HTTP app (imports torch)."""
    from .engine import Engine
    from .server import create_engine_app

    return create_engine_app(Engine(config))


async def start_embedded(engine_config: EngineConfig, host: str = "127.0.0.1",
                         port: int = 0) -> tuple[web.AppRunner, str]:
    """Start the engine server on the running loop; returns (runner, base URL).

    The model loads in a thread so the loop stays responsive. ``port=0`` picks a free port;
    the URL carries the real one. Call ``await runner.cleanup()`` to stop the server and its
    worker thread.
    """
    app = await asyncio.to_thread(build_app, engine_config)
    # handler_cancellation: a client that disconnects cancels its handler at once, which
    # cancels its engine job (the server also polls for it, for hosts that leave this off).
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{url_host}:{bound}"


@click.command("serve")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False,
              path_type=Path), default=DEFAULT_MODEL, show_default="the shipped tiny-mla",
              help="Checkpoint directory (config.json, safetensors, tokenizer.json) of a "
                   "DeepSeek-V2-family model.")
@click.option("--device", type=click.Choice(DEVICES), default=DEFAULTS["device"],
              show_default=True, help="Where to run: auto picks cuda when available.")
@click.option("--dtype", type=click.Choice(DTYPES), default=DEFAULTS["dtype"],
              show_default=True, help="Weight and KV dtype: auto is bfloat16 on cuda, "
                                      "float32 on cpu.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=30000, show_default=True,
              help="Port to listen on (SGLang's default; 0 picks a free one).")
@click.option("--cache-bytes", type=ByteSize(), default=DEFAULTS["cache_bytes"],
              show_default=f"{DEFAULTS['cache_bytes'] >> 20}M",
              help="Size of the chunk KV store, in bytes or with a binary unit (512M, 8G).")
@click.option("--policy", type=click.Choice(POLICIES), default=DEFAULTS["policy"],
              show_default=True,
              help="How a content hit is placed: full (recompute everything), prefix (exact "
                   "prefix only), pic (δ-rotate, recompute the first K tokens of each hit "
                   "chunk), blend (δ-rotate, recompute the R fraction of most-deviating "
                   "tokens), clip (δ-rotate, recompute the R fraction chosen by an auxiliary "
                   "model's attention; needs --clip-model or MODEL/aux). Requests may override "
                   "it.")
@click.option("--pic-k", type=click.IntRange(0), default=DEFAULTS["pic_k"], show_default=True,
              help="pic: tokens recomputed at the start of each reused chunk.")
@click.option("--blend-r", type=click.FloatRange(0.0, 1.0), default=DEFAULTS["blend_r"],
              show_default=True, help="blend: fraction of all reused tokens recomputed (those whose layer-1 KV "
                   "deviates most, as CacheBlend picks them).")
@click.option("--clip-r", type=click.FloatRange(0.0, 1.0), default=DEFAULTS["clip_r"],
              show_default=True, help="clip: fraction of all reused tokens recomputed (windows "
                                      "the auxiliary model's attention ranks highest, as "
                                      "CacheClip picks them).")
@click.option("--clip-model", "clip_model_dir", type=click.Path(file_okay=False, exists=True),
              default=None, show_default="MODEL/aux if it exists",
              help="clip: the auxiliary model, a small causal LM sharing the tokenizer.")
@click.option("--audit-rate", type=click.FloatRange(0.0, 1.0), default=DEFAULTS["audit_rate"],
              show_default=True,
              help="Share of requests served with reused KV that are re-run with full while "
                   "the engine is idle, to measure KL and greedy agreement (0.01: one in a "
                   "hundred; 1: all). Past the thresholds the engine serves prefix only.")
@click.option("--approx-trie/--no-approx-trie", default=DEFAULTS["approx_trie"],
              show_default=True,
              help="Keep each request's composed KV past its first reused token as an "
                   "approximate prefix-trie tail the next turn reuses without carve-outs "
                   "(--no-approx-trie: the trie holds exact prefixes only).")
@click.option("--db", "audit_db", default="irminsul.db", show_default=True,
              type=click.Path(dir_okay=False),
              help="Savings database the audits are recorded in (read it with `irminsul "
                   "report`); opened only when --audit-rate > 0.")
@click.option("--audit-max-kl", type=click.FloatRange(min=0.0), default=None,
              show_default=_GATE_DEFAULT.format(BUILTIN["audit_max_kl"]),
              help="Fall back to prefix when the mean first-token KL(full || served) of the "
                   "last audits exceeds this (nats).")
@click.option("--audit-min-agreement", type=click.FloatRange(0.0, 1.0), default=None,
              show_default=_GATE_DEFAULT.format(BUILTIN["audit_min_agreement"]),
              help="Fall back to prefix when the mean greedy agreement with full of the last "
                   "audits is below this.")
@click.option("--check-max-kl", type=click.FloatRange(min=0.0), default=None,
              show_default=_GATE_DEFAULT.format(BUILTIN["max_kl"]),
              help="Start-up self-check: serve prefix only when the probe's first-token "
                   "KL(full || policy) exceeds this (nats).")
@click.option("--check-min-agreement", type=click.FloatRange(0.0, 1.0), default=None,
              show_default=_GATE_DEFAULT.format(BUILTIN["min_agreement"]),
              help="Start-up self-check: serve prefix only when the probe's greedy agreement "
                   "with full is below this.")
@click.option("--cuda-graphs", type=click.Choice(CUDA_GRAPHS), default=DEFAULTS["cuda_graphs"],
              show_default=True,
              help="Replay decode steps and pic's recompute blocks as CUDA graphs (auto: on "
                   "CUDA; off: every block through Python, as the library runs it).")
def serve_command(model_dir, device, dtype, host, port, cache_bytes, policy, pic_k, blend_r,
                  clip_r, clip_model_dir, audit_rate, approx_trie, audit_db, audit_max_kl,
                  audit_min_agreement, check_max_kl, check_min_agreement, cuda_graphs):
    """Serve a local DeepSeek-V2-family checkpoint with the embedded engine.

    The API is SGLang's (POST /generate, /v1/chat/completions, /v1/completions, /flush_cache;
    GET /health, /model_info, /v1/models) plus POST /v1/messages, /v1/responses and the
    Irminsul capability probe, so `irminsul proxy --upstream URL` drives it like a patched
    SGLang.
    """
    config = engine_config(model_dir=str(model_dir), device=device, dtype=dtype,
                           cache_bytes=cache_bytes, policy=policy, pic_k=pic_k, blend_r=blend_r,
                           clip_r=clip_r, clip_model_dir=clip_model_dir,
                           audit_rate=audit_rate, approx_trie=approx_trie,
                           audit_max_kl=audit_max_kl,
                           audit_min_agreement=audit_min_agreement,
                           check_max_kl=check_max_kl, check_min_agreement=check_min_agreement,
                           cuda_graphs=cuda_graphs, audit_db=str(audit_db) if audit_rate > 0 else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        asyncio.run(_serve(config, host, port))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as e:  # a model directory that does not load, a busy port
        raise click.ClickException(f"cannot serve {model_dir} on {host}:{port}: {e}") from None


async def _serve(config: EngineConfig, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then stop the worker and close connections."""
    runner, url = await start_embedded(config, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    # The URL carries the real port (--port 0 picks one), so scripts can read it from here.
    click.echo(f"irminsul engine serving {config.model_dir} at {url} "
               f"(policy {config.policy})", nl=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
