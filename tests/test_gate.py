"""A model's quality gate (gate.py, MODEL/irminsul.json): validation, precedence (config over
file over built-in), where the thresholds came from in /health, /irminsul/stats and the log,
and the shipped model's own gate: its reuse passes it, a broken δ-rotation fails it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import aiohttp
import pytest
from support.models import yarn_model  # noqa: F401  (fixture)

import irminsul
from irminsul.chunking.config import ChunkerConfig
from irminsul.engine_adapter.embedded import guard
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine
from irminsul.engine_adapter.embedded.gate import (
    BUILTIN,
    GATE_FILE,
    GateFileError,
    read_gate_file,
    resolve_gate,
)
from irminsul.engine_adapter.embedded.server import create_engine_app
from irminsul.kernels import rope

SHIPPED = irminsul.SHIPPED_MODEL_DIR
CHUNKER = ChunkerConfig(min_tokens=16, avg_tokens=32, max_tokens=96)


def with_gate(tmp_path: Path, model: Path, doc) -> Path:
    """A copy of ``model`` (its files linked) with ``doc`` as its irminsul.json."""
    root = tmp_path / "model"
    root.mkdir()
    for f in Path(model).iterdir():
        if f.name != GATE_FILE:
            (root / f.name).symlink_to(f)
    (root / GATE_FILE).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return root


def make(model_dir, **kw) -> Engine:
    return Engine(EngineConfig(model_dir=str(model_dir), device="cpu", dtype="float32",
                               chunker=CHUNKER, **kw))


# ---- the file -------------------------------------------------------------------------------


@pytest.mark.parametrize("doc,needle", [
    ("{not json", "not readable JSON"),
    ([1, 2], "must hold a JSON object"),
    ({"gates": {}}, "unknown key(s) 'gates'"),
    ({"gate": [0.1]}, "gate must be an object"),
    ({"gate": {"max_kll": 0.1}}, "gate.max_kll"),
    ({"gate": {"max_kl": -0.5}}, "gate.max_kl must be a number >= 0"),
    ({"gate": {"max_kl": "0.1"}}, "gate.max_kl must be a number"),
    ({"gate": {"min_agreement": 1.5}}, "gate.min_agreement must be <= 1"),
    ({"gate": {"audit_min_agreement": True}}, "gate.audit_min_agreement"),
    ({"gate": {"tokens": 0}}, "gate.tokens must be an integer >= 1"),
    ({"gate": {"tokens": 2.5}}, "gate.tokens"),
    ({"gate": {"dtypes": ["float16"]}}, "gate.dtypes"),
    ({"gate": {"dtypes": []}}, "gate.dtypes"),
])
def test_bad_files_name_the_file_and_the_key(tmp_path, doc, needle):
    path = tmp_path / GATE_FILE
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(GateFileError) as e:
        read_gate_file(tmp_path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_a_bad_file_stops_the_engine_before_loading(tmp_path, yarn_model):  # noqa: F811
    root = with_gate(tmp_path, yarn_model, {"gate": {"max_kl": -1}})
    with pytest.raises(ValueError, match=f"{GATE_FILE}: gate.max_kl"):
        make(root)


def test_no_file_keeps_the_built_in_thresholds(yarn_model):  # noqa: F811
    assert read_gate_file(yarn_model) is None
    eng = make(yarn_model, policy="pic")
    g = eng.gate
    assert (g.max_kl, g.min_agreement, g.tokens, g.audit_max_kl, g.audit_min_agreement) == \
        tuple(BUILTIN.values())
    assert g.source == "default" and g.file is None
    assert eng.check.ok  # a random-weight model passes, as before the gate existed
    assert eng.audits.gate is eng.gate


# ---- precedence and reporting ---------------------------------------------------------------


async def test_file_gate_applies_and_is_reported(tmp_path, yarn_model, aiohttp_server,  # noqa: F811
                                                 caplog):
    # A gate no reuse meets (KL exactly 0): the random model's probe fails it.
    root = with_gate(tmp_path, yarn_model, {"gate": {"max_kl": 0.0, "tokens": 3,
                                                     "audit_max_kl": 0.25},
                                            "measured": {"note": "test"}})
    with caplog.at_level(logging.INFO, logger=guard.__name__):
        eng = make(root, policy="pic")
    assert not eng.check.ok and eng.served_policy == "prefix"
    assert any("(file+default gate)" in r and "KL(full || pic)" in r for r in eng.check.reasons)
    assert f"from file {root / GATE_FILE}" in caplog.text  # the start-up log line
    g = eng.gate
    assert (g.max_kl, g.tokens, g.audit_max_kl) == (0.0, 3, 0.25)
    assert g.sources == {"max_kl": "file", "min_agreement": "default", "tokens": "file",
                         "audit_max_kl": "file", "audit_min_agreement": "default"}
    assert g.source == "file+default" and eng.check.gate_source == "file+default"
    assert eng.audits.gate.audit_max_kl == 0.25
    server = await aiohttp_server(create_engine_app(eng))
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as http:
        async with http.get("/health") as resp:
            health = await resp.json()
        async with http.get("/irminsul/stats") as resp:
            stats = await resp.json()
    for gate in (health["gate"], stats["gate"]):
        assert gate["source"] == "file+default" and gate["file"] == str(root / GATE_FILE)
        assert gate["max_kl"] == 0.0 and gate["sources"]["tokens"] == "file"
    assert stats["self_check"]["gate_source"] == "file+default"


def test_config_values_win_over_the_file(tmp_path, yarn_model):  # noqa: F811
    root = with_gate(tmp_path, yarn_model, {"gate": {"max_kl": 0.0, "min_agreement": 1.0}})
    eng = make(root, policy="pic", check_max_kl=100.0, check_min_agreement=0.0)
    assert eng.check.ok and eng.served_policy == "pic"
    assert eng.gate.sources["max_kl"] == "config" and eng.gate.max_kl == 100.0
    assert eng.gate.source == "config+default" and eng.gate.file is None
    cfg = EngineConfig(model_dir=str(root), audit_max_kl=0.5)
    gate = resolve_gate(cfg, "float32")
    assert (gate.max_kl, gate.audit_max_kl) == (0.0, 0.5)
    assert gate.sources["audit_max_kl"] == "config" and gate.sources["max_kl"] == "file"


def test_a_gate_measured_in_another_dtype_is_not_applied(tmp_path, yarn_model):  # noqa: F811
    root = with_gate(tmp_path, yarn_model, {"gate": {"max_kl": 0.0, "dtypes": ["bfloat16"]}})
    eng = make(root, policy="pic")
    assert eng.check.ok and eng.gate.max_kl == BUILTIN["max_kl"]
    assert eng.gate.source == "default"
    assert "measured in bfloat16, this engine runs float32" in eng.gate.note
    assert resolve_gate(EngineConfig(model_dir=str(root)), "bfloat16").max_kl == 0.0


# ---- the shipped model's gate -----------------------------------------------------------------


def test_shipped_gate_file_is_valid_and_strict():
    gate = read_gate_file(SHIPPED)
    assert gate is not None and gate["dtypes"] == ("float32",)
    # far stricter than the built-in limits, which a broken rotation passes
    assert gate["max_kl"] < BUILTIN["max_kl"] / 5
    assert gate["min_agreement"] > BUILTIN["min_agreement"]
    doc = json.loads((SHIPPED / GATE_FILE).read_text())
    assert doc["measured"]["commands"]  # how the values were chosen


@pytest.mark.parametrize("policy", ["pic", "clip"])
def test_shipped_model_passes_its_own_gate(policy):
    eng = Engine(EngineConfig(model_dir=str(SHIPPED), device="cpu", dtype="float32",
                              policy=policy))
    check = eng.check
    assert eng.gate.source == "file" and eng.gate.file == str(SHIPPED / GATE_FILE)
    assert check.ok and eng.served_policy == policy, check.reasons
    assert check.probe_reused > 0
    assert check.probe_kl <= eng.gate.max_kl and check.probe_agreement >= eng.gate.min_agreement


def test_shipped_model_with_a_broken_rotation_fails_its_gate(monkeypatch):
    """The placed k_pe kept at its stored positions (no δ-rotation): the prefill's rotation
    is broken while the self-check's own rope comparison (guard.delta_rotate) is not, so only
    the probe against full can catch it. The built-in limits let it through; the gate does
    not, and the engine serves prefix."""
    monkeypatch.setattr(rope, "delta_rotate", lambda k, src, dst, spec: k.clone())
    lax = Engine(EngineConfig(model_dir=str(SHIPPED), device="cpu", dtype="float32",
                              check_max_kl=BUILTIN["max_kl"],
                              check_min_agreement=BUILTIN["min_agreement"]))
    assert lax.check.ok  # why the built-in limits are not enough for a trained model
    eng = Engine(EngineConfig(model_dir=str(SHIPPED), device="cpu", dtype="float32"))
    check = eng.check
    assert check.rope_error <= 1e-5  # the rope check itself is untouched
    assert not check.ok and eng.served_policy == "prefix"
    assert check.probe_kl > eng.gate.max_kl
    assert any("(file gate)" in r for r in check.reasons)
    ids = eng.tokenizer.encode("def f(x):\n    return x + 1\n" * 20)
    eng.prefill(ids)
    counts = eng.prefill(ids[3:], policy="pic").counts
    assert counts.policy == "prefix" and counts.reused_tokens == 0


def test_serve_reports_a_bad_file(tmp_path, yarn_model):  # noqa: F811
    from click.testing import CliRunner

    from irminsul.engine_adapter.embedded.command import serve_command

    root = with_gate(tmp_path, yarn_model, {"gate": {"min_agreement": 2}})
    result = CliRunner().invoke(serve_command, ["--model", str(root), "--device", "cpu",
                                                "--port", "0"])
    assert result.exit_code == 1
    assert f"{root / GATE_FILE}: gate.min_agreement must be <= 1" in result.output
    result = CliRunner().invoke(serve_command, ["--check-max-kl", "-1"])
    assert result.exit_code == 2 and "--check-max-kl" in result.output
