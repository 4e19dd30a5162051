"""`irminsul doctor`: verify a live deployment's content reuse from the outside.

Light on purpose (no torch): it runs where the user's client runs, against a server that
speaks the wire contract (the embedded engine) or SGLang with ``--radix-cache-backend
irminsul`` (recognised from its /server_info; checked with a pre-warm request and fresh
cache partitions instead of per-request policies). The checks are in doctor_checks.py.
"""

from __future__ import annotations

import asyncio

import click

from .doctor_checks import (
    FAIL,
    REUSE_POLICIES,
    DoctorConfig,
    DoctorReport,
    DoctorUnreachable,
    run_doctor,
)

EXIT_FAILED, EXIT_UNREACHABLE = 1, 3


def render(report: DoctorReport) -> str:
    """The checklist: one line per check, then the verdict."""
    width = max(len(c.name) for c in report.checks)
    lines = [f"irminsul doctor: {report.upstream}" +
             (f" (policy {report.policy})" if report.policy else "")]
    lines += [f"  {c.status:<4}  {c.name:<{width}}  {c.detail}" for c in report.checks]
    failed = sum(c.status == FAIL for c in report.checks)
    lines.append("all checks passed" if report.ok else f"{failed} check(s) failed")
    return "\n".join(lines)


@click.command("doctor")
@click.option("--upstream", required=True, metavar="URL",
              help="The server to check: the embedded engine (`irminsul serve`) or SGLang "
                   "started with --radix-cache-backend irminsul, e.g. localhost:30000.")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="The served model's directory: prompts are then real text encoded with its "
                   "tokenizer, and its fingerprint must match the server's. Without it the "
                   "prompts are random token IDs in [100, 1000), ordinary tokens in every "
                   "DeepSeek-family vocabulary.")
@click.option("--policy", type=click.Choice(REUSE_POLICIES), default=None,
              show_default="the server's default when it reuses content, else pic",
              help="The content-reuse policy to check against full and prefix.")
@click.option("--pic-k", type=click.IntRange(0), default=None,
              help="pic: tokens recomputed at the start of each reused chunk "
                   "(default: the server's).")
@click.option("--blend-r", type=click.FloatRange(0.0, 1.0), default=None,
              help="blend: fraction of reused tokens recomputed (default: the server's).")
@click.option("--clip-r", type=click.FloatRange(0.0, 1.0), default=None,
              help="clip: fraction of reused tokens recomputed (default: the server's; the "
                   "server needs its auxiliary model, see its capabilities).")
@click.option("--tokens", type=click.IntRange(1), default=16, show_default=True,
              help="Greedy tokens generated per request and compared.")
@click.option("--min-agreement", type=click.FloatRange(0.0, 1.0), default=0.5,
              show_default=True,
              help="Share of the first --tokens greedy tokens that must equal the full run's "
                   "before the first difference. A quality threshold, meaningful on a trained "
                   "model; a random-weight model can fall below it (use 0 there). Counts, "
                   "reported reuse and full = prefix are checked exactly whatever this is.")
@click.option("--content-tokens", type=click.IntRange(64), default=2048, show_default=True,
              help="Length of the content that moves behind a new header, in tokens; it "
                   "should span several of the server's chunks (256 tokens on average by "
                   "default).")
@click.option("--annotate/--no-annotate", default=True, show_default=True,
              help="Send the proxy's chunk annotation (top-level 'irminsul' key); "
                   "--no-annotate makes the server chunk on its own.")
@click.option("--seed", type=int, default=None,
              help="Seed of the prompts (default: random, so the content is new to the "
                   "server). Reusing a seed against the same server makes the first request "
                   "a content hit, which fails the freshness check.")
@click.option("--timeout", type=click.FloatRange(min=0.0, min_open=True), default=300.0,
              show_default=True, help="Seconds allowed for the whole run.")
def doctor_command(upstream, model_dir, policy, pic_k, blend_r, clip_r, tokens, min_agreement,
                   content_tokens, annotate, seed, timeout):
    """Check that a live server reuses KV by content, reports it honestly and stays close to
    a full prefill.

    Sends a prompt, then the same content behind a new header, then that prompt with policy
    full and again with policy prefix (all greedy, via POST /generate with input_ids), and
    prints a checklist: the capability probe; counts that add up (exact prefix + reused +
    recomputed + new = prompt) with the requested policy honoured; no reuse on fresh content;
    content hits reported behind the new header; an exact prefix no longer than the prompts'
    common prefix, and cached_tokens equal to it; full reusing nothing; prefix hitting the
    exact repeat with output identical to full; greedy agreement with full over the first
    --tokens tokens at least --min-agreement.

    The server's cache keeps the prompts (a few thousand tokens). Exit status: 0 when every
    check passes, 1 when one fails (a stock server without the capability probe included),
    3 when the server cannot be reached.
    """
    try:
        cfg = DoctorConfig(upstream=upstream, model_dir=model_dir, policy=policy, pic_k=pic_k,
                           blend_r=blend_r, clip_r=clip_r, tokens=tokens, min_agreement=min_agreement,
                           content_tokens=content_tokens, annotate=annotate, seed=seed,
                           timeout=timeout)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        report = asyncio.run(run_doctor(cfg))
    except DoctorUnreachable as e:
        click.echo(f"irminsul doctor: {e}", err=True)
        raise SystemExit(EXIT_UNREACHABLE) from None
    click.echo(render(report))
    if not report.ok:
        raise SystemExit(EXIT_FAILED)
