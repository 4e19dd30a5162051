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
