"""The command line explains itself and reports what it can run."""
import subprocess
import sys

import pytest

from iis_fast.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "iis_fast.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("demo", "score", "backends"):
        assert cmd in out.stdout
    assert "Inherent" in out.stdout


def test_subcommand_help_explains_options():
    out = run("score", "--help")
    assert out.returncode == 0 and "--checkpoint" in out.stdout and "docs/spec.md" in out.stdout


def test_backends_lists_reference_and_torch(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "reference  available" in out and "torch      available" in out and "auto -> " in out


def test_bad_input_exits_2_with_a_named_error(tmp_path, capsys):
    missing = tmp_path / "nope.beton"
    with pytest.raises(SystemExit) as e:
        main(["score", "mobilenetv2_100", "--sparsities", "0,1.5", "--data", str(missing)])
    assert e.value.code == 2
    assert "outside [0, 1)" in capsys.readouterr().err
