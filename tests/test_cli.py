"""The `tdiff` command line, run in-process through `tdiff.cli.main(argv) -> exit code`.

Two tests start a real process: `python -m tdiff --version` and the installed `tdiff` script.
"""

import json
import shlex
import shutil
import subprocess
import sys

import pytest
import typer

from tdiff import __version__
from tdiff.cli import app, main
from tdiff.config import TABLE1_PRESETS


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of `tdiff ARGS`."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *args) -> dict:
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)  # stdout holds exactly one JSON object and nothing else


# ------------------------------------------------------------------------------------------------
# Help


def test_root_help_shows_commands_and_examples(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # no wrapping inside the lines we look for
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert "params" in out and "--version" in out and "d2s8i" in out
    assert "Examples" in out and "tdiff params --all" in out


def test_params_help_shows_examples(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = run_cli(capsys, "params", "--help")
    assert code == 0
    assert "Examples" in out and "tdiff params --preset d2s8i" in out
    for option in ("--preset", "--set", "--depth", "--substeps", "--no-interleaved", "--all", "--json"):
        assert option in out


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"tdiff {__version__}"


# ------------------------------------------------------------------------------------------------
# tdiff params


def test_params_preset_json(capsys):
    summary = run_json(capsys, "params", "--preset", "d2s8i")
    assert {"params_total", "params_blocks", "params_mapping", "params_other", "effective_depth",
            "gflops_per_image"} <= set(summary)
    assert summary["params_total"] == 12_378_640
    assert summary["params_blocks"] == 7_471_632
    assert summary["params_mapping"] == 4_327_424
    assert summary["params_other"] == 579_584
    assert summary["effective_depth"] == 16
    assert summary["gflops_per_image"] == pytest.approx(6.609, rel=0.01)
    assert summary["order"] == "12" * 8 and summary["table1_name"] == "D2S8I"


def test_params_without_preset(capsys):
    summary = run_json(capsys, "params", "--depth", "2", "--substeps", "8")
    assert summary["params_total"] == 12_378_640 and summary["effective_depth"] == 16
    assert summary["order"] == "12" * 8  # interleaved by default


def test_no_interleaved_changes_the_order(capsys):
    summary = run_json(capsys, "params", "--depth", "2", "--substeps", "8", "--no-interleaved")
    assert summary["order"] == "1" * 8 + "2" * 8 and summary["table1_name"] == "D2S8UI"
    assert summary["params_total"] == 12_378_640


def test_params_width_1024(capsys):
    summary = run_json(capsys, "params", "--preset", "d2s8i", "--set", "model.width=1024")
    assert summary["params_total"] == 49_398_816


def test_flags_beat_set_beat_preset(capsys):
    assert run_json(capsys, "params", "--preset", "d2s8i", "--set", "sharing.depth=4")["depth"] == 4
    summary = run_json(capsys, "params", "--preset", "d2s8i", "--set", "sharing.depth=4", "--depth", "3")
    assert summary["depth"] == 3 and summary["substeps"] == 8


def test_params_all_lists_table1_in_order(capsys):
    presets = run_json(capsys, "params", "--all")["presets"]
    assert [p["name"] for p in presets] == list(TABLE1_PRESETS)
    assert [p["table1_name"] for p in presets] == ["D16", "D1S16", "D1S8", "D2S4UI", "D2S4I",
                                                   "D2S8UI", "D2S8I", "D8"]
    assert [p["params_total"] for p in presets] == [64_680_064, 8_642_824, 8_642_824, 12_378_640,
                                                    12_378_640, 12_378_640, 12_378_640, 34_793_536]
    assert [p["effective_depth"] for p in presets] == [16, 16, 8, 8, 8, 16, 16, 8]


def test_params_table_output(capsys):
    code, out, err = run_cli(capsys, "params", "--preset", "d2s8i")
    assert code == 0 and err == ""
    assert "12,378,640" in out and "D2S8I" in out


# ------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr, no traceback


def assert_user_error(capsys, *args) -> str:
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (code, err)
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_preset(capsys):
    line = assert_user_error(capsys, "params", "--preset", "d2s8x")
    assert "unknown preset 'd2s8x'" in line and "d2s8i" in line


def test_set_unknown_key(capsys):
    line = assert_user_error(capsys, "params", "--set", "model.widht=3")
    assert "did you mean model.width?" in line


def test_set_width_not_multiple_of_head_dim(capsys):
    line = assert_user_error(capsys, "params", "--set", "model.width=100")
    assert "model.width = 100" in line and "head_dim" in line


def test_preset_file_with_unknown_key(capsys, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[sharing]\ndepht = 2\n")
    line = assert_user_error(capsys, "params", "--preset", str(path))
    assert "sharing.depht" in line and str(path) in line and "sharing.depth" in line


def test_malformed_toml(capsys, tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[model\nwidth = 512\n")
    line = assert_user_error(capsys, "params", "--preset", str(path))
    assert "not valid TOML" in line and str(path) in line


@pytest.mark.parametrize("args", [("--depth", "0"), ("--depth", "two"), ("--bogus",)])
def test_click_usage_errors(capsys, args):
    line = assert_user_error(capsys, "params", *args)
    assert args[0] in line


def test_all_with_preset(capsys):
    assert "--all" in assert_user_error(capsys, "params", "--all", "--preset", "d8")


def test_debug_env_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv("TDIFF_DEBUG", "1")
    from tdiff.errors import UserError
    with pytest.raises(UserError):
        main(["params", "--preset", "d2s8x"])


# ------------------------------------------------------------------------------------------------
# Every Examples line of every command's help runs


def help_examples():
    """(command name, example line) for each `tdiff ...` line in the root's and each command's epilog."""
    group = typer.main.get_command(app)
    found = []
    for name, command in [("", group), *sorted(group.commands.items())]:
        for line in (command.epilog or "").splitlines():
            line = line.strip()
            if line.startswith("tdiff "):
                found.append((name, line))
    return found


def test_every_command_has_examples():
    group = typer.main.get_command(app)
    with_examples = {name for name, _ in help_examples()}
    assert with_examples == {"", *group.commands}, "each command needs an Examples epilog"


@pytest.mark.parametrize("command, line", help_examples(), ids=[line for _, line in help_examples()])
def test_help_example_runs(capsys, command, line):
    # Cheap examples run for real; anything that would train, sample or download runs only
    # when it carries --dry-run.
    if not line.startswith("tdiff params ") and "--dry-run" not in line:
        pytest.skip(f"`{line.split()[1]}` example without --dry-run would do real work")
    code, out, err = run_cli(capsys, *shlex.split(line)[1:])
    assert code == 0, err
    assert out.strip()


# ------------------------------------------------------------------------------------------------
# Real processes


def test_python_m_tdiff_version():
    result = subprocess.run([sys.executable, "-m", "tdiff", "--version"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"tdiff {__version__}"


def test_installed_script_params_json():
    script = shutil.which("tdiff")
    if script is None:
        pytest.skip("the tdiff console script is not installed (pip install -e .)")
    result = subprocess.run([script, "params", "--preset", "d2s8i", "--json"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["params_total"] == 12_378_640
