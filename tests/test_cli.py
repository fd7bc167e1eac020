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


def test_version_prints_the_package_version():
    from importlib.metadata import version

    import replic

    result = subprocess.run(
        [sys.executable, "-m", "replic", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"replic {version('replic')}"
    assert version("replic") == replic.__version__


def test_version_falls_back_to_the_module_attribute(monkeypatch, capsys):
    import importlib.metadata

    from replic.cli import main

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.setattr("replic.__version__", "9.9.9-test")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == "replic 9.9.9-test"


@pytest.mark.parametrize("command", ["train", "eval"])
def test_scale_help_lists_every_scale_and_the_overlay_path(command, capsys):
    from replic.engine.config import SCALE_NAMES

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    # The option's own entry (not the usage line), unwrapped.
    entry = out[out.index("\n  --scale SCALE"):]
    scale_help = " ".join(entry[: entry.index("\n  --set")].split())
    assert set(SCALE_NAMES) == {"smoke", "mini", "paper"}
    for name in SCALE_NAMES:
        assert name in scale_help, f"--scale help of replic {command} lacks {name!r}: {scale_help}"
    assert "path to an overlay YAML" in scale_help
