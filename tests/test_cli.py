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
    assert {
        "params_total",
        "params_blocks",
        "params_mapping",
        "params_other",
        "effective_depth",
        "gflops_per_image",
    } <= set(summary)
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
    assert [p["table1_name"] for p in presets] == ["D16", "D1S16", "D1S8", "D2S4UI", "D2S4I", "D2S8UI", "D2S8I", "D8"]
    assert [p["params_total"] for p in presets] == [
        64_680_064,
        8_642_824,
        8_642_824,
        12_378_640,
        12_378_640,
        12_378_640,
        12_378_640,
        34_793_536,
    ]
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


# The examples name runs, checkpoints and data that a test builds in a temporary working directory
# from one tiny trained run; cheap overrides are appended (click takes the last value of an option).
# eval scores with a small injected feature extractor (nets.TinyExtractor), not Inception.

EXAMPLE_RUN_NAMES = ("d16-cifar10", "d2s8i-cifar10")  # what `runs/*` expands to


@pytest.fixture(scope="module")
def example_data(tmp_path_factory):
    """An .npz of 40 32x32 RGB uint8 images in 10 classes."""
    import numpy as np

    path = tmp_path_factory.mktemp("example-data") / "train.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), labels=np.arange(40) % 10)
    return path


@pytest.fixture(scope="module")
def example_run(example_data):
    """The tiny preset trained for 2 steps on example_data."""
    out = example_data.parent / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--data",
                str(example_data),
                "--steps",
                "2",
                "--out",
                str(out),
                "--num-workers",
                "0",
                "--set",
                "train.demo_every=0",
            ]
        )
        == 0
    )
    return out


def _example_argv(command, line, request, monkeypatch, tmp_path) -> list[str]:
    """Build what `line` names under tmp_path (the working directory) and return its argv with overrides."""
    import glob

    import numpy as np

    args = shlex.split(line)[1:]
    if command == "train" and "cifar10" in args and "--dry-run" not in args:
        return [*args, "--dry-run"]  # cifar10 cannot be downloaded in tests: the configuration only
    needs_run = any(a.startswith("runs/") or a.endswith(".safetensors") for a in args)
    if not needs_run and command != "eval":
        if command == "train":  # --data digits.npz
            shutil.copy(request.getfixturevalue("example_data"), tmp_path / "digits.npz")
            return [*args, "--steps", "2"]
        return [*args, "--device", "cpu"] if "--measure" in args else args
    run = request.getfixturevalue("example_run")
    data = request.getfixturevalue("example_data")
    weights = run / "checkpoints" / "00000002"
    for a in args:
        if a.startswith("runs/") and "*" not in a:
            shutil.copytree(run, tmp_path / a)
        elif a.endswith(".safetensors"):
            shutil.copy(weights / a, tmp_path / a)
    if command == "compare":
        if "runs/*" in args:
            for name in EXAMPLE_RUN_NAMES:
                shutil.copytree(run, tmp_path / "runs" / name)
        for k, run_dir in enumerate(sorted((tmp_path / "runs").iterdir())):
            with open(run_dir / "metrics.jsonl", "a") as f:
                for step, fid in ((1, 80.0 + k), (2, 60.0 + k)):
                    f.write(
                        json.dumps(
                            {
                                "kind": "eval",
                                "step": step,
                                "protocol": "clean",
                                "fid": fid,
                                "kid": 0.01,
                                "kid_x1e4": 100.0,
                                "n": 6,
                                "n_ref": 40,
                            }
                        )
                        + "\n"
                    )
        return [a for arg in args for a in (sorted(glob.glob(arg)) if "*" in arg else [arg])]
    if command == "train":  # --resume: one step further than the copied run
        return [*args, "--steps", "3"]
    if command == "sample":
        return [*args, "-n", "2", "--steps", "2", "--device", "cpu"]

    from nets import TinyExtractor

    from tdiff import evaluate

    tiny = TinyExtractor()
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None, *, device="cpu", resize="clean": tiny)
    monkeypatch.setattr(evaluate, "CLEANFID_CACHE_DIR", tmp_path / "cleanfid-cache")
    if "--images" in args:
        path = tmp_path / args[args.index("--images") + 1]
        path.parent.mkdir(parents=True)
        with np.load(data) as npz:
            np.savez(path, images=npz["images"][:6], labels=npz["labels"][:6])
    if "--ref" in args:  # statistics of the training data, with features for KID
        reference = evaluate.reference_from_path(data, tiny)
        path = tmp_path / args[args.index("--ref") + 1]
        path.parent.mkdir(parents=True)
        np.savez(path, mu=reference.mu, sigma=reference.sigma, feats=reference.feats)
    overrides = ["--data", str(data)] if "cifar10" in args else []
    if "--images" not in args:
        overrides += ["-n", "4", "--device", "cpu", *([] if "paper" in args else ["--steps", "2"])]
    return [*args, *overrides]


@pytest.mark.parametrize("command, line", help_examples(), ids=[line for _, line in help_examples()])
def test_help_example_runs(capsys, monkeypatch, request, tmp_path, command, line):
    monkeypatch.chdir(tmp_path)
    argv = _example_argv(command, line, request, monkeypatch, tmp_path)
    capsys.readouterr()
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    if command == "train" and "--dry-run" not in argv:  # training reports on stderr; it writes checkpoints
        assert list(tmp_path.glob(f"runs/*/checkpoints/{int(argv[-1]):08d}/ema.safetensors")), err
    else:
        assert out.strip(), err


# ------------------------------------------------------------------------------------------------
# Real processes


def test_python_m_tdiff_version():
    result = subprocess.run([sys.executable, "-m", "tdiff", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"tdiff {__version__}"


def test_installed_script_params_json():
    script = shutil.which("tdiff")
    if script is None:
        pytest.skip("the tdiff console script is not installed (pip install -e .)")
    result = subprocess.run(
        [script, "params", "--preset", "d2s8i", "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["params_total"] == 12_378_640
