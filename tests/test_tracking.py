"""`tdiff train --log-with`: accelerate's experiment trackers mirror metrics.jsonl.

Short tiny runs on the CPU write TensorBoard event files into RUN/trackers/, read back with
TensorBoard's own reader; a resumed run continues them (and drops the events after its checkpoint,
as metrics.jsonl does). A tracker whose package is missing is one line before anything starts, and
a tracker that fails to close never hides the run's own error. ~30 s on two cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from accelerate import Accelerator
from nets import TINY_ARGS
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tdiff.tracking
import tdiff.train
from tdiff.cli import main
from tdiff.errors import RunError
from tdiff.tracking import tracker_values


def train(data: Path, out: Path, *args: str) -> int:
    return main(["train", *TINY_ARGS, "--data", str(data), "--out", str(out), *args])


def log_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "kind" not in record]


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar, as TensorBoard shows it (purged events left out)."""
    events = EventAccumulator(str(run / "trackers" / "tdiff"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_holds_the_logged_losses(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_data, run, "--steps", "3", "--set", "train.log_every=2", "--log-with", "tensorboard") == 0
    assert list((run / "trackers" / "tdiff").glob("events.out.tfevents.*"))
    logged = log_records(run)
    assert [r["step"] for r in logged] == [2, 3]  # every log_every steps and at the last
    for key in ("loss", "ema_loss", "lr"):
        assert scalars(run, f"train/{key}") == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in logged]
    assert json.loads((run / "run.json").read_text())["log_with"] == ["tensorboard"]


def test_resume_continues_the_trackers_from_run_json(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        train(
            tiny_data,
            run,
            "--steps",
            "4",
            "--set",
            "train.log_every=1",
            "--set",
            "train.save_every=2",
            "--set",
            "train.keep_last=0",
            "--log-with",
            "tensorboard",
        )
        == 0
    )
    shutil.rmtree(run / "checkpoints" / "00000004")  # as if killed after logging steps 3 and 4
    assert (
        main(
            ["train", "--resume", str(run), "--cpu", "--num-workers", "0", "--steps", "5", "--set", "train.log_every=5"]
        )
        == 0
    )
    logged = log_records(run)  # cut back to step 2, then step 5: TensorBoard must forget 3 and 4 too
    assert [r["step"] for r in logged] == [1, 2, 5]
    assert scalars(run, "train/loss") == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in logged]
    # --log-with none turns them off, and run.json remembers it
    assert (
        main(["train", "--resume", str(run), "--cpu", "--num-workers", "0", "--steps", "6", "--log-with", "none"]) == 0
    )
    assert json.loads((run / "run.json").read_text())["log_with"] == []
    assert scalars(run, "train/loss")[-1][0] == 5


def test_a_missing_tracker_package_is_one_line_before_anything(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tdiff.tracking, "tracker_installed", lambda name: name == "tensorboard")
    code = train(tiny_data, tmp_path / "run", "--steps", "1", "--log-with", "tensorboard,wandb")
    assert code == 2 and not (tmp_path / "run").exists()
    assert capsys.readouterr().err.strip() == (
        'error: --log-with wandb: the wandb package is not installed; pip install "tdiff[wandb]"'
    )
    assert train(tiny_data, tmp_path / "run", "--steps", "1", "--log-with", "tensorbored") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--log-with tensorbored: not a tracker accelerate knows; choose from" in line and "tensorboard" in line


def test_a_tracker_failing_to_close_does_not_hide_the_error(tiny_data, tmp_path, capsys, monkeypatch):
    def save(*args, **kwargs):
        raise RunError("cannot write the checkpoint (disk full)")

    closed = []

    def end_training(self):
        closed.append(True)
        raise OSError("tracker server gone")

    monkeypatch.setattr(tdiff.train, "save", save)
    monkeypatch.setattr(Accelerator, "end_training", end_training)
    assert train(tiny_data, tmp_path / "run", "--steps", "1", "--log-with", "tensorboard") == 1
    err = capsys.readouterr().err
    assert closed == [True]
    assert "closing the experiment trackers failed (OSError: tracker server gone)" in err
    assert err.strip().splitlines()[-1] == "failed: cannot write the checkpoint (disk full)"  # the run's own error


def test_tracker_values():
    log = {"step": 5, "loss": 0.2, "ema_loss": 0.25, "lr": 1e-4, "images_per_second": 90.0, "elapsed_seconds": 3.5}
    assert tracker_values(log) == {
        "train/loss": 0.2,
        "train/ema_loss": 0.25,
        "train/lr": 1e-4,
        "train/images_per_second": 90.0,
        "train/elapsed_seconds": 3.5,
    }
    evaluation = {
        "kind": "eval",
        "step": 5,
        "protocol": "paper",
        "fid": 31.5,
        "kid": 0.003,
        "kid_x1e4": 30.0,
        "n": 2000,
        "seed": 0,
        "sampler": "dpmpp_2m_sde",
        "cache": False,
    }
    assert tracker_values(evaluation) == {"eval/fid": 31.5, "eval/kid": 0.003, "eval/kid_x1e4": 30.0}
