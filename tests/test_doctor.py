"""`irminsul doctor` against real servers on 127.0.0.1: the embedded engine (every check
passes), the SGLang-shaped test server in stock mode (no capability probe) and in irminsul mode
(ignores the per-request policy), a refused port; and the judging of replies a dishonest
server would send.

The CLI runs in a thread (CliRunner, asyncio.run inside) while the servers run on the test's
event loop.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support.fake_sglang import FakeSGLang
from support.models import aux_model, yarn_model  # noqa: F401  (fixtures)

from irminsul.chunking.config import ChunkerConfig
from irminsul.engine_adapter.contract import ReuseCounts
from irminsul.engine_adapter.doctor import doctor_command
from irminsul.engine_adapter.doctor_checks import (
    FAIL,
    PASS,
    DoctorConfig,
    Reply,
    agreement,
    judge,
)
from irminsul.engine_adapter.doctor_prompts import prompts
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine
from irminsul.engine_adapter.embedded.server import create_engine_app

CHUNKER = ChunkerConfig(min_tokens=8, avg_tokens=32, max_tokens=128)


@pytest.fixture(scope="module")
def engine(yarn_model):  # noqa: F811
    return Engine(EngineConfig(model_dir=str(yarn_model), device="cpu", max_seq_len=2048,
                               chunker=CHUNKER))


async def doctor(*args: str):
    """Run the CLI in a thread; returns click's Result."""
    return await asyncio.to_thread(CliRunner().invoke, doctor_command, list(args))


def statuses(output: str) -> dict[str, str]:
    """Check name -> PASS/FAIL/SKIP from the printed checklist."""
    out = {}
    for line in output.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] in ("PASS", "FAIL", "SKIP"):
            out[parts[1].split("  ")[0]] = parts[0]
    return out


@pytest.mark.parametrize("policy,model_args", [
    ("pic", ()),  # random token IDs
    ("blend", ("--model-dir", "MODEL")),  # the model's tokenizer, fingerprint compared
])
async def test_embedded_engine_passes_every_check(aiohttp_server, engine, yarn_model,  # noqa: F811
                                                  policy, model_args):
    server = await aiohttp_server(create_engine_app(engine))
    args = [a.replace("MODEL", str(yarn_model)) for a in model_args]
    # A random-weight model's greedy outputs drift from full's at once (0-6% measured), so
    # the quality threshold is 0 here; every exactness check still applies.
    result = await doctor("--upstream", str(server.make_url("")), "--policy", policy,
                          "--content-tokens", "400", "--tokens", "8", "--min-agreement", "0",
                          *args)
    assert result.exit_code == 0, result.output
    got = statuses(result.output)
    expected_pass = {"capability probe", "counts add up", "fresh content not reported as reused",
                     "content hits reported", "exact prefix not inflated", "full reuses nothing",
                     "prefix hits the exact repeat", "full = prefix on an exact repeat",
                     f"greedy agreement {policy} vs full"}
    assert {name for name, s in got.items() if s == PASS} >= expected_pass, result.output
    assert got["model fingerprint"] == ("PASS" if model_args else "SKIP")
    assert "all checks passed" in result.output


async def test_clip_is_checked_where_the_server_has_an_aux_model(aiohttp_server, engine,
                                                                 yarn_model, aux_model,  # noqa: F811
                                                                 tmp_path):
    root = tmp_path / "with-aux"  # the tiny model with the auxiliary one in its aux/ folder
    root.mkdir()
    for f in Path(yarn_model).iterdir():
        (root / f.name).symlink_to(f)
    (root / "aux").symlink_to(aux_model, target_is_directory=True)
    with_aux = Engine(EngineConfig(model_dir=str(root), device="cpu", max_seq_len=2048,
                                   chunker=CHUNKER))
    server = await aiohttp_server(create_engine_app(with_aux))
    result = await doctor("--upstream", str(server.make_url("")), "--policy", "clip",
                          "--clip-r", "0.2", "--content-tokens", "400", "--tokens", "8",
                          "--min-agreement", "0")
    assert result.exit_code == 0, result.output
    assert statuses(result.output)["greedy agreement clip vs full"] == PASS
    assert "(policy clip)" in result.output
    # The engine without one leaves clip out of its capabilities: the probe says so.
    server = await aiohttp_server(create_engine_app(engine))
    result = await doctor("--upstream", str(server.make_url("")), "--policy", "clip",
                          "--content-tokens", "200", "--tokens", "4", "--min-agreement", "0")
    assert result.exit_code == 1
    assert statuses(result.output) == {"capability probe": FAIL}
    assert "lack ['clip']" in result.output


async def test_repeated_seed_fails_the_freshness_check(aiohttp_server, engine):
    server = await aiohttp_server(create_engine_app(engine))
    args = ["--upstream", str(server.make_url("")), "--seed", "7", "--content-tokens", "200",
            "--tokens", "4", "--min-agreement", "0"]
    assert (await doctor(*args)).exit_code == 0
    again = await doctor(*args)  # the server has this content stored now
    assert again.exit_code == 1
    got = statuses(again.output)
    assert got["fresh content not reported as reused"] == FAIL
    assert got["exact prefix not inflated"] == FAIL  # the whole second prompt is cached now


async def test_stock_server_is_not_irminsul_capable(aiohttp_server):
    server = await aiohttp_server(FakeSGLang(irminsul=False).app())
    result = await doctor("--upstream", str(server.make_url("")))
    assert result.exit_code == 1
    assert statuses(result.output) == {"capability probe": FAIL}
    assert "not Irminsul-capable" in result.output and "404" in result.output


async def test_server_ignoring_the_policy_override_fails(aiohttp_server):
    fake = FakeSGLang(irminsul=True, chunker=CHUNKER)  # reports policy "pic" for every request
    server = await aiohttp_server(fake.app())
    result = await doctor("--upstream", str(server.make_url("")), "--min-agreement", "0")
    assert result.exit_code == 1
    assert statuses(result.output)["counts add up"] == FAIL
    assert "asked for 'full'" in result.output
    assert fake.received[-1].body["irminsul"]["policy"] == "prefix"  # the annotation went too


async def test_refused_port_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await doctor("--upstream", f"127.0.0.1:{port}")
    assert result.exit_code == 3
    assert f"cannot reach http://127.0.0.1:{port}" in result.output


def test_bad_flags_are_usage_errors():
    result = CliRunner().invoke(doctor_command, ["--upstream", "x", "--min-agreement", "2"])
    assert result.exit_code == 2 and "--min-agreement" in result.output
    with pytest.raises(ValueError, match="policy"):
        DoctorConfig(upstream="x", policy="full")


# ---- judging replies: what a dishonest or broken server sends ---------------------------------


def reply(ids, policy, out, *, exact=0, reused=0, cached=None) -> Reply:
    n = len(ids)
    counts = ReuseCounts(prompt_tokens=n, exact_prefix_tokens=exact, reused_tokens=reused,
                         new_tokens=n - exact - reused, chunks_total=4,
                         chunks_hit=int(reused > 0), policy=policy)
    meta = {"prompt_tokens": n, "cached_tokens": exact if cached is None else cached}
    return Reply(tuple(out), counts, meta, "")


def judged(**over) -> tuple[dict[str, str], float | None]:
    cfg = DoctorConfig(upstream="x", tokens=4, min_agreement=0.5, content_tokens=64, seed=1)
    a, b, start = prompts(cfg)
    out = [5, 6, 7, 8]
    replies = {"first": reply(a, "pic", out), "moved": reply(b, "pic", out, reused=60),
               "full": reply(b, "full", out), "prefix": reply(b, "prefix", out, exact=len(b) - 1)}
    replies.update(over.get("replies", lambda a, b: {})(a, b))
    expected = {"first": (a, "pic"), "moved": (b, "pic"), "full": (b, "full"),
                "prefix": (b, "prefix")}
    checks = {}
    found = judge(lambda name, ok, detail: checks.__setitem__(name, PASS if ok else FAIL),
                  replies, expected, start, cfg)
    return checks, found


def test_honest_replies_pass():
    checks, found = judged()
    assert set(checks.values()) == {PASS} and found == 1.0


@pytest.mark.parametrize("bad,failing", [
    # part of the content reuse counted as exact prefix
    (lambda a, b: {"moved": reply(b, "pic", [5, 6, 7, 8], exact=len(b) - 45, reused=40)},
     "exact prefix not inflated"),
    # cached_tokens including the reused tokens
    (lambda a, b: {"moved": reply(b, "pic", [5, 6, 7, 8], reused=60, cached=60)},
     "exact prefix not inflated"),
    (lambda a, b: {"moved": reply(b, "pic", [5, 6, 7, 8])}, "content hits reported"),
    (lambda a, b: {"first": reply(a, "pic", [5, 6, 7, 8], reused=30)},
     "fresh content not reported as reused"),
    (lambda a, b: {"full": reply(b, "full", [5, 6, 7, 8], exact=10)}, "full reuses nothing"),
    (lambda a, b: {"prefix": reply(b, "prefix", [5, 6, 7, 8])}, "prefix hits the exact repeat"),
    (lambda a, b: {"prefix": reply(b, "prefix", [5, 6, 0, 0], exact=len(b) - 1)},
     "full = prefix on an exact repeat"),
    (lambda a, b: {"moved": reply(b, "pic", [5, 0, 0, 0], reused=60)},
     "greedy agreement pic vs full"),
])
def test_each_dishonest_reply_fails_its_check(bad, failing):
    checks, _ = judged(replies=bad)
    assert {name for name, s in checks.items() if s == FAIL} == {failing}


def test_unreadable_counts_and_short_outputs_fail_counts():
    def bad(a, b):
        return {"first": Reply((), None, {}, "meta_info.irminsul unreadable: 'irminsul'"),
                "full": reply(b, "full", [5, 6])}
    checks, found = judged(replies=bad)
    assert checks == {"counts add up": FAIL} and found is None


def test_agreement_counts_matching_tokens_before_the_first_difference():
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4], 4) == 0.5  # the 4th match comes too late
    assert agreement([1, 2], [1, 2, 3], 2) == 1.0


def test_prompts_share_content_behind_headers_that_differ_at_once():
    cfg = DoctorConfig(upstream="x", content_tokens=100, seed=3)
    a, b, start = prompts(cfg)
    assert a[0] != b[0] and np.array_equal(a[-100:], b[start:]) and len(b) == start + 100
    again = prompts(DoctorConfig(upstream="x", content_tokens=100, seed=4))
    assert not np.array_equal(again.b[start:], b[start:])
