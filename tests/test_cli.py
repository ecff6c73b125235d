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
    assert "M, the number of concepts (default: 200)" in " ".join(out.stdout.split())   # from IISConfig


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


def test_scoring_options_are_the_config_fields_with_its_defaults():
    """Every IISConfig field marked for the CLI is an option of score, demo and sweep; an option left out is not
    passed on (the config's default applies), one given reaches the config as the right type."""
    import dataclasses

    from iis_fast.cli import build_parser, score_options
    from iis_fast.config import SWEEP_EXTRACT_BATCH_SIZE, IISConfig
    fields = [f for f in dataclasses.fields(IISConfig) if f.metadata.get("cli")]
    assert {f.name for f in fields} >= {"library", "num_concepts", "sparsities", "epochs", "backend", "extract_dtype"}
    parser = build_parser()
    for argv in (["score", "m", "--data", "d"], ["demo"], ["sweep", "ckpts"]):
        args = parser.parse_args(argv)
        assert all(hasattr(args, f.name) for f in fields), argv
        expected = {"extract_batch_size": SWEEP_EXTRACT_BATCH_SIZE} if argv[0] == "sweep" else {}
        assert score_options(args) == expected
    args = parser.parse_args(["score", "m", "--data", "d", "--num-concepts", "50", "--sparsities", "0,0.5",
                              "--no-channels-last", "--library", "cluster", "--official"])
    cfg = IISConfig.from_options(**score_options(args))
    assert (cfg.num_concepts, cfg.sparsities, cfg.channels_last, cfg.library, cfg.elements) == \
        (50, (0.0, 0.5), False, "cluster", "segments")
    assert IISConfig.from_options(**score_options(parser.parse_args(["demo"]))) == IISConfig()


def test_every_long_command_takes_no_progress():
    from iis_fast.cli import build_parser
    parser = build_parser()
    for argv in (["demo"], ["score", "m", "--data", "d"], ["sweep", "c"], ["make-checkpoints", "o"],
                 ["probe"]):
        assert parser.parse_args(argv + ["--no-progress"]).no_progress is True
