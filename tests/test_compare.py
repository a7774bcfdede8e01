"""`tdiff compare`: two short tiny runs made here, their eval records (one through `tdiff eval` with an
injected feature extractor, the rest written directly), the Table 1 layout as a table, JSON and
Markdown, the Figure 1 PNG drawn with PIL, and the static comparison of presets. CPU, ~15 s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tdiff import evaluate
from tdiff.cli import main
from tdiff.plot import PALETTE, Series, line_plot, nice_ticks, short_number

CURVES = {"interleaved": [(1, 40.0), (2, 31.5)], "blocked": [(1, 45.0), (2, 36.0)]}  # step -> FID written here


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


class TinyExtractor:
    key = "tiny-compare-test"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        return images.reshape(n, 4, -1, 4, images.shape[2] // 4, 3).mean(axis=(2, 4)).reshape(n, -1) / 255


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """D2S2I (tiny) and D2S2UI (not interleaved), 2 steps each, with eval records at steps 1 and 2."""
    root = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(2)
    np.savez(root / "data.npz", images=rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8),
             labels=np.arange(24) % 10)
    made = []
    for name, extra in (("interleaved", []), ("blocked", ["--set", "sharing.interleaved=false"])):
        out = root / name
        assert main(["train", "--preset", "tiny", "--cpu", "--num-workers", "0", "--set", "model.image_size=16",
                     "--set", "train.demo_every=0", "--steps", "2", "--batch-size", "4", "--json", *extra,
                     "--data", str(root / "data.npz"), "--out", str(out)]) == 0
        with open(out / "metrics.jsonl", "a") as f:
            for step, fid in CURVES[name]:
                f.write(json.dumps({"kind": "eval", "step": step, "protocol": "paper", "fid": fid,
                                    "kid": fid / 1e4, "kid_x1e4": fid, "n": 2000}) + "\n")
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
    for text in ("interleaved", "blocked", "D2S2I", "Steps (x10^-6)", "FID", "KID (x10^4)", "31.50", "36.00",
                 "effective depth", "parameters"):
        assert text in out, text
    code, out, _ = run_cli(capsys, "compare", *runs, "--markdown")
    assert code == 0
    lines = out.strip().splitlines()
    assert "| | interleaved | blocked |" in lines and "| FID | 31.50 | 36.00 |" in lines


def test_plot_is_an_image_of_the_curves(runs, tmp_path, capsys):
    path = tmp_path / "fid.png"
    code, _, err = run_cli(capsys, "compare", *runs, "--plot", path)
    assert code == 0, err
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (900, 560)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 50  # not blank: text, grid, curves, antialiasing
    for colour in PALETTE[:2]:  # one curve per run, in the palette's first colours
        close = np.abs(pixels - np.array(colour)).max(axis=1) <= 12
        assert close.sum() > 200, colour
    assert not (np.abs(pixels - np.array(PALETTE[2])).max(axis=1) <= 12).any()  # and no third curve


def test_eval_records_from_tdiff_eval_are_read(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_inception", lambda path=None, *, device="cpu", resize="clean": TinyExtractor())
    code, _, err = run_cli(capsys, "eval", runs[0], "-n", "4", "--steps", "2", "--device", "cpu",
                           "--protocol", "clean")
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


@pytest.mark.parametrize("args, message", [
    ([], "give run directories"),
    (["NOT_A_RUN"], "not a tdiff run directory"),
    (["--presets", "tiny", "RUN"], "one or the other"),
    (["RUN", "--measure"], "--measure goes with --presets"),
    (["RUN", "--json", "--markdown"], "choose one"),
])
def test_bad_compare_input(args, message, runs, tmp_path, capsys):
    mapped = [runs[0] if a == "RUN" else tmp_path if a == "NOT_A_RUN" else a for a in args]
    code, _, err = run_cli(capsys, "compare", *mapped)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_plot_without_evaluations(tmp_path, runs, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.toml").write_text((runs[0] / "config.toml").read_text())
    code, _, err = run_cli(capsys, "compare", bare, "--plot", tmp_path / "x.png")
    assert code == 2 and "no FID evaluations" in err


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

def test_nice_ticks_and_labels():
    assert nice_ticks(0, 2_000_000) == [0, 500_000, 1_000_000, 1_500_000, 2_000_000]
    assert nice_ticks(31.2, 45.7) == [30, 35, 40, 45, 50]
    ticks = nice_ticks(5, 5)  # one value: a range around it
    assert ticks[0] < 5 < ticks[-1]
    assert (short_number(1_500_000), short_number(20_000), short_number(2.5)) == ("1.5M", "20k", "2.5")


def test_line_plot_single_points(tmp_path):
    path = line_plot([Series("a", [10], [3.0]), Series("b", [10], [3.0])], tmp_path / "p.png", title="t")
    with Image.open(path) as image:
        assert image.size == (900, 560)
    with pytest.raises(ValueError):
        line_plot([Series("empty", [], [])], tmp_path / "q.png")
