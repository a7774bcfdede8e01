"""`tdiff compare`: two short tiny runs (a copy of the shared `tiny_run`, and one trained here), their eval
records (one through `tdiff eval` with an injected feature extractor, the rest written directly), the
Table 1 layout as a table, JSON and Markdown, the --plot figure (FID and loss panels, by matplotlib; PNG,
SVG or PDF), and the static comparison of presets. CPU, ~20 s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from nets import TINY_RUN_ARGS, copy_run, run_cli
from PIL import Image

from tdiff.cli import main
from tdiff.plot import DPI, PANEL_SIZE, RunCurves, comparison_figure, figure_format, time_unit

CURVES = {"interleaved": [(1, 40.0), (2, 31.5)], "blocked": [(1, 45.0), (2, 36.0)]}  # step -> FID written here


@pytest.fixture(scope="module")
def runs(tiny_run, tiny_data, tmp_path_factory) -> list[Path]:
    """D2S2I (tiny: a copy of the shared tiny run) and D2S2UI (not interleaved, trained here alike), 2 steps
    each, with eval records at steps 1 and 2."""
    root = tmp_path_factory.mktemp("compare")
    copy_run(tiny_run, root / "interleaved")
    assert (
        main(
            [
                "train",
                *TINY_RUN_ARGS,
                "--set",
                "sharing.interleaved=false",
                "--data",
                str(tiny_data),
                "--out",
                str(root / "blocked"),
            ]
        )
        == 0
    )
    made = []
    for name in ("interleaved", "blocked"):
        out = root / name
        with open(out / "metrics.jsonl", "a") as f:
            for step, fid in CURVES[name]:
                f.write(
                    json.dumps(
                        {
                            "kind": "eval",
                            "step": step,
                            "protocol": "paper",
                            "fid": fid,
                            "kid": fid / 1e4,
                            "kid_x1e4": fid,
                            "n": 2000,
                        }
                    )
                    + "\n"
                )
        made.append(out)
    return made


# ---------------------------------------------------------------------------------------------------
# Runs


def test_table1_json(runs, capsys):
    code, out, err = run_cli(capsys, "compare", *runs, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["protocol"] == "paper"
    first, second = report["runs"]
    assert (first["name"], first["table1_name"], second["table1_name"]) == ("interleaved", "D2S2I", "D2S2UI")
    assert first["effective_depth"] == second["effective_depth"] == 4
    assert first["params_total"] == second["params_total"] > 0
    assert first["best"] == {"step": 2, "fid": 31.5, "kid": 31.5e-4, "kid_x1e4": 31.5, "n": 2000, "protocol": "paper"}
    assert second["best"]["fid"] == 36.0 and first["evaluations"] == 2
    assert [p["step"] for p in first["curve"]] == [1, 2]


def test_table_and_markdown(runs, capsys):
    code, out, _ = run_cli(capsys, "compare", *runs)
    assert code == 0
    for text in (
        "interleaved",
        "blocked",
        "D2S2I",
        "Steps (x10^-6)",
        "FID",
        "KID (x10^4)",
        "31.50",
        "36.00",
        "effective depth",
        "parameters",
    ):
        assert text in out, text
    code, out, _ = run_cli(capsys, "compare", *runs, "--markdown")
    assert code == 0
    lines = out.strip().splitlines()
    assert "| | interleaved | blocked |" in lines and "| FID | 31.50 | 36.00 |" in lines


def figure_pixels(path: Path, panels: int) -> np.ndarray:
    """The PNG's RGB pixels, one row per pixel, after checking its format and size."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (round(PANEL_SIZE[0] * panels * DPI), round((PANEL_SIZE[1] + 0.5) * DPI))
        return np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)


def coloured(pixels: np.ndarray, colour: str) -> int:
    """How many pixels are (nearly) matplotlib's `colour`, e.g. "C0"."""
    rgb = np.array(to_rgb(colour)) * 255
    return int((np.abs(pixels - rgb).max(axis=1) <= 12).sum())


def test_plot_draws_fid_and_loss_panels(runs, tmp_path, capsys):
    path = tmp_path / "curves.png"
    code, _, err = run_cli(capsys, "compare", *runs, "--plot", path)
    assert code == 0, err
    pixels = figure_pixels(path, panels=3)  # FID against steps; loss against steps and against time
    assert len(np.unique(pixels, axis=0)) > 50  # not blank: text, grid, curves, antialiasing
    assert coloured(pixels, "C0") > 200 and coloured(pixels, "C1") > 200  # one colour per run
    assert coloured(pixels, "C2") == 0  # and no third


def loss_only_run(run: Path, root: Path) -> Path:
    """A copy of `run` without its eval records: a training log and no FID."""
    copy = root / f"{run.name}-no-fid"
    copy.mkdir()
    (copy / "config.toml").write_text((run / "config.toml").read_text())
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (copy / "metrics.jsonl").write_text("".join(line for line in lines if '"kind": "eval"' not in line))
    return copy


def test_plot_without_evaluations_draws_the_loss(runs, tmp_path, capsys):
    bare = loss_only_run(runs[0], tmp_path)
    code, _, err = run_cli(capsys, "compare", bare, "--plot", tmp_path / "loss.png")
    assert code == 0, err
    pixels = figure_pixels(tmp_path / "loss.png", panels=2)  # loss against steps and against time
    assert coloured(pixels, "C0") > 100


@pytest.mark.parametrize("name, start", [("loss.svg", b"<?xml"), ("loss.pdf", b"%PDF"), ("LOSS.PNG", b"\x89PNG")])
def test_plot_format_follows_the_extension(name, start, runs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compare", loss_only_run(runs[0], tmp_path), "--plot", tmp_path / name)
    assert code == 0, err
    assert (tmp_path / name).read_bytes().startswith(start)


def test_eval_records_from_tdiff_eval_are_read(runs, tmp_path, capsys, fake_inception):
    code, _, err = run_cli(capsys, "eval", runs[0], "-n", "4", "--steps", "2", "--device", "cpu", "--protocol", "clean")
    assert code == 0, err
    # the runs now hold two protocols: compare asks which, and reads only that one
    code, _, err = run_cli(capsys, "compare", *runs)
    assert code == 2 and "several protocols" in err
    code, out, err = run_cli(capsys, "compare", *runs, "--protocol", "clean", "--json")
    assert code == 0, err
    first, second = json.loads(out)["runs"]
    assert first["evaluations"] == 1 and first["best"]["step"] == 2 and first["best"]["protocol"] == "clean"
    assert second["best"] is None
    code, out, _ = run_cli(capsys, "compare", *runs, "--protocol", "paper", "--json")
    assert json.loads(out)["runs"][0]["best"]["fid"] == 31.5


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give run directories"),
        (["NOT_A_RUN"], "not a tdiff run directory"),
        (["--presets", "tiny", "RUN"], "one or the other"),
        (["RUN", "--measure"], "--measure goes with --presets"),
        (["RUN", "--json", "--markdown"], "choose one"),
    ],
)
def test_bad_compare_input(args, message, runs, tmp_path, capsys):
    mapped = [runs[0] if a == "RUN" else tmp_path if a == "NOT_A_RUN" else a for a in args]
    code, _, err = run_cli(capsys, "compare", *mapped)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_plot_with_nothing_to_draw(tmp_path, runs, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.toml").write_text((runs[0] / "config.toml").read_text())
    code, _, err = run_cli(capsys, "compare", bare, "--plot", tmp_path / "x.png")
    assert code == 2 and "neither training log records nor FID evaluations" in err
    assert not (tmp_path / "x.png").exists()


def test_plot_refuses_an_unknown_extension_first(runs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compare", runs[0], "--plot", tmp_path / "x.jpg")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "x.jpg: the extension picks the format, one of .png, .svg, .pdf" in err


# ---------------------------------------------------------------------------------------------------
# Presets, statically and measured


def test_presets_static(capsys):
    code, out, err = run_cli(capsys, "compare", "--presets", "d16,d2s8i", "--json")
    assert code == 0, err
    d16, d2s8i = json.loads(out)["presets"]
    assert d2s8i["params_total"] == 12_378_640 and d16["effective_depth"] == d2s8i["effective_depth"] == 16
    assert d16["gflops_per_image"] == pytest.approx(d2s8i["gflops_per_image"])
    code, out, _ = run_cli(capsys, "compare", "--presets", "d16,d2s8i")
    assert code == 0 and "D2S8I" in out and "12.38M" in out and "GFLOP/image" in out


def test_presets_measured(capsys):
    code, out, err = run_cli(capsys, "compare", "--presets", "tiny", "--measure", "--device", "cpu", "--json")
    assert code == 0, err
    tiny = json.loads(out)["presets"][0]
    assert tiny["train_images_per_second"] > 0 and tiny["sample_images_per_second"] > 0
    assert tiny["device"] == "cpu" and tiny["sample_nfe"] == 20  # tiny samples 20 DPM++(2M) SDE steps


# ---------------------------------------------------------------------------------------------------
# The plot function itself


def test_figure_format_and_time_unit():
    assert [figure_format(f"a.{ext}") for ext in ("png", "SVG", "pdf")] == ["png", "svg", "pdf"]
    with pytest.raises(ValueError, match="extension"):
        figure_format("a")
    assert time_unit(90) == (1.0, "seconds") and time_unit(600) == (60.0, "minutes")
    assert time_unit(3 * 3600) == (3600.0, "hours")


def test_comparison_figure_single_points_and_nothing(tmp_path):
    lone = RunCurves("a", fid_steps=[10], fid=[3.0], steps=[10], seconds=[1.0], loss=[0.2], ema_loss=[0.2])
    comparison_figure([lone, lone], tmp_path / "p.png")
    assert figure_pixels(tmp_path / "p.png", panels=3).size
    empty = RunCurves("empty", [], [], [], [], [], [])
    with pytest.raises(ValueError, match="nothing to plot"):
        comparison_figure([empty], tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()
