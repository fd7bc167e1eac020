"""Every replic subcommand answers --help (the CLI contract users rely on)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from replic.cli import build_parser


def _subcommand_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:  # argparse exposes no public walker
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = prefix + (name,)
                yield path
                yield from _subcommand_paths(sub, path)


ALL_PATHS = list(_subcommand_paths(build_parser()))


def test_expected_commands_registered():
    top = {p[0] for p in ALL_PATHS}
    for command in ("data", "score", "train", "eval", "convert", "viz"):
        assert command in top, f"'replic {command}' is not registered"
    assert ("data", "synth") in ALL_PATHS and ("data", "subset") in ALL_PATHS


@pytest.mark.parametrize("path", ALL_PATHS, ids=lambda p: " ".join(p))
def test_help(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: replic " + " ".join(path))


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "replic", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "COMMAND" in result.stdout
