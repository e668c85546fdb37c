"""The command-line layer of the collection shell, the feature pages and the report: their
dataclass commands, positional arguments, list flags, --help and one-sentence errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from saesweep.configtools import parse_command
from saesweep.errors import UserError
from saesweep.evaluate.features import FeaturesCommand
from saesweep.evaluate.features import main as features_main
from saesweep.evaluate.report import ReportCommand
from saesweep.evaluate.report import main as report_main
from saesweep.shell import ShellCommand
from saesweep.shell import main as shell_main

ROOT = Path(__file__).resolve().parents[1]


def shell(*args: str) -> ShellCommand:
    return parse_command(list(args), ShellCommand, "shell", "usage: shell")


def features(*args: str) -> FeaturesCommand:
    return parse_command(list(args), FeaturesCommand, "features", "usage: features")


def test_shell_flags_before_the_uri_and_the_command_after_it():
    assert shell("data/demo") == ShellCommand("data/demo")
    assert shell("--anonymous", "s3://b/p", "verify") == ShellCommand(
        "s3://b/p", ("verify",), anonymous=True
    )
    assert shell("--download", "d", "cd x; inspect 0") == ShellCommand(
        "d", ("cd x; inspect 0",), download=True
    )
    assert shell("d", "--download", "ls") == ShellCommand("d", ("ls",), download=True)


def test_every_word_after_the_shell_command_is_the_command():
    assert shell("d", "ls", "--download", "x").command == ("ls", "--download", "x")
    assert shell("d", "--", "--odd-name").command == ("--odd-name",)


def test_feature_flags_take_several_values_or_commas():
    args = features("runs/r", "--data", "s3://b/c", "--latents", "0", "5", "--top", "4")
    assert args == FeaturesCommand("runs/r", "s3://b/c", latents=(0, 5), top=4)
    assert features("r", "--latents=1,2", "--data", "d").latents == (1, 2)
    assert features("r", "--data", "d", "--shards", "-1:", "--out", "p.html") == (
        FeaturesCommand("r", "d", shards="-1:", out="p.html")
    )
    assert features("--data", "d", "r").latents is None


def test_report_takes_every_sweep_directory():
    args = parse_command(["a", "b"], ReportCommand, "report", "usage: report")
    assert args == ReportCommand(("a", "b"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "needs RUN_DIR"),
        (["r"], "needs --data"),
        (["r", "--data", "d", "--latents", "1", "x"], "flag --latents has value 'x', expected int"),
        (["r", "--data", "d", "--top", "0"], "--top 0 must be at least 1"),
        (["r", "s", "--data", "d"], "unexpected argument 's'"),
        (["r", "--data", "d", "--lates", "1"], "unknown flag --lates (did you mean --latents?)"),
        (["r", "--data"], "flag --data needs a value"),
    ],
)
def test_bad_feature_arguments_are_one_sentence(args, message):
    with pytest.raises(UserError) as err:
        features(*args)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("main", "args", "message"),
    [
        (shell_main, [], "python -m saesweep.shell needs URI"),
        (shell_main, ["--verbose", "d"], "unknown flag --verbose"),
        (features_main, ["r", "--n-latents", "0", "--data", "d"], "--n-latents 0 must be"),
        (report_main, [], "python -m saesweep.evaluate.report needs SWEEP_DIR"),
    ],
)
def test_each_entry_point_exits_2_with_one_line(main, args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_report_of_a_directory_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "runs" / "nothing"
    with pytest.raises(SystemExit) as stop:
        report_main([str(tmp_path), str(missing)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {missing} is not a directory; give sweep " + (
        "directories (runs/NAME-TIME)\n"
    )


@pytest.mark.parametrize(
    ("module", "usage", "field"),
    [
        ("saesweep.shell", "[--download] [--anonymous] URI [COMMAND ...]", "--anonymous"),
        ("saesweep.evaluate.features", "RUN_DIR --data URI", "--n-latents"),
        ("saesweep.evaluate.report", "SWEEP_DIR [SWEEP_DIR ...]", "SWEEP_DIR"),
    ],
)
def test_help_renders_the_field_docstrings(module, usage, field):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python -m {module} {usage}")
    assert out.stdout.count("usage:") == 1 and field in out.stdout


def test_export_names_its_formats_and_refuses_an_unknown_one(capsys):
    from saesweep.export.cli import main as export_main

    with pytest.raises(SystemExit) as stop:
        export_main(["circuit-tracr", "runs/x", "--out", "o"])
    assert stop.value.code == 2
    assert "unknown export format 'circuit-tracr'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        export_main([])
    assert stop.value.code == 2 and "needs a FORMAT" in capsys.readouterr().err


def test_train_help_lists_the_other_spellings_of_a_flag(capsys):
    from saesweep.train.cli import main as train_main

    with pytest.raises(SystemExit) as stop:
        train_main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: train.py") and out.count("usage:") == 1
    spellings = out.partition("other spellings:")[2].split()
    i = spellings.index("--sae.n-experts")
    assert spellings[i + 1] == "--sae.switch.n-experts"
