"""The command line: every command loads, has help text, and is documented in README.md."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from irminsul.cli import COMMANDS, main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_group_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"], catch_exceptions=False)
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_has_help_and_is_in_readme(name):
    command = main.get_command(None, name)
    assert command is not None
    assert command.help and command.help.strip(), f"{name} has no help text"
    for param in command.params:
        if param.param_type_name == "option" and not param.hidden:
            assert param.help, f"{name} {param.opts} has no help text"
    assert f"irminsul {name}" in README, f"`irminsul {name}` is not documented in README.md"


def test_unknown_command_is_a_clear_error():
    result = CliRunner().invoke(main, ["frobnicate"])
    assert result.exit_code != 0
    assert "No such command" in result.output


@pytest.mark.parametrize("args,want", [([], True), (["--approx-trie"], True),
                                       (["--no-approx-trie"], False)])
def test_approx_trie_flag_reaches_the_engine_config(args, want, monkeypatch, tmp_path):
    """`serve` and the proxy's embedded mode hand --approx-trie/--no-approx-trie to
    EngineConfig.approx_trie (the servers themselves are replaced by recorders: loading a
    model is not what this checks)."""
    import irminsul.proxy.app as proxy_app
    from irminsul.engine_adapter.embedded import command as serve_mod
    from irminsul.engine_adapter.embedded.proxy_upstream import embedded_engine_config

    served, proxied = [], []

    async def record_serve(config, host, port):
        served.append(config)

    monkeypatch.setattr(serve_mod, "_serve", record_serve)
    monkeypatch.setattr(proxy_app, "run_proxy",
                        lambda config, upstream_ctx=None: proxied.append((config, upstream_ctx)))
    runner = CliRunner()
    result = runner.invoke(main, ["serve", "--device", "cpu", "--port", "0", *args])
    assert result.exit_code == 0, result.output
    assert [c.approx_trie for c in served] == [want]
    result = runner.invoke(main, ["proxy", "--port", "0", "--db", str(tmp_path / "s.db"), *args])
    assert result.exit_code == 0, result.output
    (config, upstream_ctx), = proxied
    assert config.approx_trie is want and upstream_ctx is not None  # embedded mode
    assert embedded_engine_config(config).approx_trie is want
