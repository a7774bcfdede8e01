"""`tdiff train` end to end on the CPU: the `tiny` preset at 16x16 on digits the tests write themselves.

Most runs go through `tdiff.cli.main([...])` in this process (a few seconds each); only the
signal tests and the two-process `accelerate launch` test start subprocesses. No network.
About a minute on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nets import TINY_ARGS, copy_run
from PIL import Image

from tdiff import checkpoint as ckpt
from tdiff.cli import main
from tdiff.config import loads, to_toml
from tdiff.pipeline import StepBatches, group_positions
from tdiff.step import lr_multiplier, step_noise
from tdiff.train import TrainSummary, weights_digest

STEP = "00000001"  # checkpoint directory names are zero-padded steps
SMALL = [*TINY_ARGS, "--seed", "3"]

pytestmark = pytest.mark.usefixtures("no_dataset_download")  # every dataset download fails at once, as offline


def train(digits: Path, out: Path, *args: str) -> int:
    return main(["train", *SMALL, "--data", str(digits), "--out", str(out), *args])


def checkpoint_tensors(step_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {kind: ckpt.load_weights(step_dir / f"{kind}.safetensors").tensors for kind in ("model", "ema", "state")}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_step_run(digits, tmp_path_factory) -> Path:
    """A 1-step run of batch 2, trained once for this module; the tests that damage it take copies."""
    run = tmp_path_factory.mktemp("one-step") / "run"
    assert train(digits, run, "--steps", "1", "--batch-size", "2") == 0
    return run


# ---------------------------------------------------------------------------------------------------
# Training works, and what it writes


def test_loss_falls_when_overfitting(digits, tmp_path):
    assert train(digits, tmp_path / "run", "--steps", "16", "--batch-size", "8", "--set", "train.log_every=1") == 0
    losses = [record["loss"] for record in metrics(tmp_path / "run")]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.75 * np.mean(losses[:4]), losses


def test_run_directory_layout_metrics_and_warmup(digits, tmp_path):
    run = tmp_path / "run"
    assert (
        train(
            digits,
            run,
            "--steps",
            "5",
            "--batch-size",
            "4",
            "--set",
            "train.log_every=1",
            "--set",
            "train.warmup_steps=4",
            "--set",
            "train.save_every=1",
            "--set",
            "train.keep_last=2",
        )
        == 0
    )
    # keep_last=2 prunes older steps; `latest` names the newest; no temporary directories are left
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["00000004", "00000005", "latest"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "00000005"
    assert ckpt.latest_step_dir(run) == run / "checkpoints" / "00000005"
    assert json.loads((run / "run.json").read_text())["seed"] == 3

    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        assert set(r) == {"step", "loss", "ema_loss", "lr", "images_per_second", "elapsed_seconds"}
        assert r["images_per_second"] > 0 and r["elapsed_seconds"] > 0
    assert records[0]["ema_loss"] == records[0]["loss"]  # EMA decay 0 at the first update
    # Linear warm-up over 4 steps of the preset's lr 0.002, then constant
    assert [r["lr"] for r in records] == pytest.approx([0.0005, 0.001, 0.0015, 0.002, 0.002])


def test_lr_multiplier():
    assert [lr_multiplier(step, 4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(0, 0) == 1.0


def test_checkpoints_are_safetensors_that_carry_the_resolved_config(digits, tmp_path):
    run = tmp_path / "run"
    assert train(digits, run, "--steps", "1", "--batch-size", "4", "--set", "train.lr=0.001") == 0
    config_toml = (run / "config.toml").read_text()
    assert loads(config_toml, "config.toml", complete=True).train.lr == 0.001
    for kind in ("model", "ema", "state"):
        path = run / "checkpoints" / STEP / f"{kind}.safetensors"
        assert path.read_bytes()[8:9] == b"{"  # safetensors: u64 header length, then a JSON header
        weights = ckpt.load_weights(path)
        assert weights.metadata["kind"] == kind and weights.metadata["step"] == "1"
        assert weights.metadata["config"] == config_toml
        assert weights.config.model.image_size == 16
    assert ckpt.resolve(run) == run / "checkpoints" / STEP / "ema.safetensors"  # what `tdiff sample RUN` opens


def test_demo_grid_is_a_png_of_the_right_size(digits, tmp_path):
    run = tmp_path / "run"
    assert (
        train(
            digits, run, "--steps", "2", "--batch-size", "4", "--set", "train.demo_every=2", "--set", "sample.steps=2"
        )
        == 0
    )
    with Image.open(run / "samples" / "demo-00000002.png") as grid:
        assert grid.format == "PNG"
        assert (grid.size, grid.mode) == ((8 * 16, 8 * 16), "RGB")  # 64 demo images, 8 x 8 of 16 x 16


def test_dry_run_prints_the_resolved_toml(digits, tmp_path, capsys):
    assert train(digits, tmp_path / "run", "--set", "train.lr=3e-4", "--steps", "7", "--dry-run") == 0
    config = loads(capsys.readouterr().out, "stdout", complete=True)
    assert (config.train.lr, config.train.steps, config.model.image_size) == (3e-4, 7, 16)
    assert (config.sharing.depth, config.sharing.substeps, config.sharing.interleaved) == (2, 2, True)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# Determinism: resume, gradient accumulation, processes


def test_resume_is_bit_identical_to_training_straight_through(digits, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(digits, straight, "--steps", "6", "--batch-size", "4") == 0
    assert train(digits, resumed, "--steps", "3", "--batch-size", "4") == 0
    assert main(["train", "--resume", str(resumed), "--steps", "6", "--num-workers", "0", "--cpu"]) == 0
    a = checkpoint_tensors(straight / "checkpoints" / "00000006")
    b = checkpoint_tensors(resumed / "checkpoints" / "00000006")
    for kind in ("model", "ema", "state"):  # weights, EMA weights, AdamW moments
        assert a[kind].keys() == b[kind].keys()
        assert all(torch.equal(a[kind][k], b[kind][k]) for k in a[kind]), kind
    meta_a, meta_b = (
        ckpt.load_weights(run / "checkpoints" / "00000006" / "state.safetensors").metadata
        for run in (straight, resumed)
    )
    assert meta_a["optimizer"] == meta_b["optimizer"]  # step counts and hyper-parameters
    assert [r["step"] for r in metrics(resumed)] == [3, 6]


def test_resume_reuses_the_run_options_unless_given(tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(tiny_config))
    (run / "run.json").write_text(
        json.dumps({"format": "tdiff-run-1", "data": "x.npz", "data_dir": "d", "seed": 5, "mixed_precision": "bf16"})
    )
    seen = []

    def fake_train(config, options, on_event=None):
        seen.append((config, options))
        return TrainSummary(options.out, 1, 0.1, 0.1, 1.0, 1.0, None)

    monkeypatch.setattr("tdiff.train.train", fake_train)
    assert main(["train", "--resume", str(run), "--steps", "9", "--set", "train.lr=1e-4"]) == 0
    assert main(["train", "--resume", str(run), "--mixed-precision", "fp16", "--seed", "6"]) == 0
    (config, first), (_, second) = seen
    assert (first.data, first.data_dir, first.seed, first.mixed_precision) == ("x.npz", Path("d"), 5, "bf16")
    assert (config.train.steps, config.train.lr) == (9, 1e-4)
    assert (second.seed, second.mixed_precision) == (6, "fp16")


def test_gradient_accumulation_matches_one_big_batch(digits, tmp_path):
    assert train(digits, tmp_path / "big", "--steps", "3", "--batch-size", "8") == 0
    assert train(digits, tmp_path / "accum", "--steps", "3", "--batch-size", "4", "--set", "train.grad_accum=2") == 0
    big = checkpoint_tensors(tmp_path / "big" / "checkpoints" / "00000003")
    accum = checkpoint_tensors(tmp_path / "accum" / "checkpoints" / "00000003")
    assert max_difference(big["model"], accum["model"]) < 1e-5
    assert max_difference(big["ema"], accum["ema"]) < 1e-5
    assert metrics(tmp_path / "big")[-1]["loss"] == pytest.approx(metrics(tmp_path / "accum")[-1]["loss"], rel=1e-5)


def test_each_process_gets_a_disjoint_share_of_the_global_batch_and_its_sigma_strata():
    batch, world, accum, step = 3, 2, 2, 5
    n_groups = world * accum
    global_batch = batch * n_groups
    first = step * global_batch  # stream position of the step's first example
    draws = step_noise(seed=7, step=step, global_batch=global_batch, shape=(1, 2, 2))
    shares = []
    for rank in range(world):
        batches = list(StepBatches(step, step + 1, batch, rank, world, accum))
        assert len(batches) == accum
        share = []
        for micro, positions in enumerate(batches):
            group = rank * accum + micro
            assert positions == group_positions(step, group, batch, n_groups).tolist()
            u, noise, keep = draws.group(group, n_groups)
            # Position k of the global batch gets stratum k of the stratified draw: u in [k, k+1)/(B·G)
            k = torch.tensor(positions) - first
            assert torch.equal(torch.floor(u * global_batch).long(), k)
            assert torch.equal(noise, draws.noise[k]) and torch.equal(keep, draws.keep_label[k])
            share += positions
        shares.append(set(share))
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(range(first, first + global_batch))
    # The draws are a pure function of (seed, step)
    again = step_noise(seed=7, step=step, global_batch=global_batch, shape=(1, 2, 2))
    assert torch.equal(again.u, draws.u) and torch.equal(again.noise, draws.noise)
    assert not torch.equal(step_noise(7, step + 1, global_batch, (1, 2, 2)).u, draws.u)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(digits, tmp_path):
    # `accelerate launch --cpu` alone starts one process unless MPI is set up; --multi_gpu makes it
    # use torchrun, and tdiff's own --cpu puts both processes on the CPU (gloo).
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    two = tmp_path / "two"
    command = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "tdiff",
        "train",
        *SMALL,
        "--data",
        str(digits),
        "--out",
        str(two),
        "--steps",
        "3",
        "--batch-size",
        "4",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    starts = [line for line in result.stderr.splitlines() if line.startswith("training ")]
    assert len(starts) == 1 and "x2, global batch 8" in starts[0]  # only rank 0 reports

    assert train(digits, tmp_path / "one", "--steps", "3", "--batch-size", "8") == 0
    step_dir = two / "checkpoints" / "00000003"
    one = checkpoint_tensors(tmp_path / "one" / "checkpoints" / "00000003")
    both = checkpoint_tensors(step_dir)
    assert max_difference(one["model"], both["model"]) < 1e-5
    assert max_difference(one["ema"], both["ema"]) < 1e-5
    # Each rank's digest of its own model + EMA weights, recorded at the save: all equal to rank 0's
    digests = json.loads(ckpt.load_weights(step_dir / "state.safetensors").metadata["extra"])["weights_sha256"]
    assert digests == [weights_digest(both["model"], both["ema"])] * 2


def test_processes_with_different_weights_stop_the_run_unsaved(digits, tmp_path, monkeypatch, capsys):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda digests: digests + ["0" * 64])  # a "rank 1"
    run = tmp_path / "run"
    assert train(digits, run, "--steps", "1", "--batch-size", "2") == 1
    assert "failed: the 2 processes hold different weights at step 1" in capsys.readouterr().err
    assert ckpt.latest_step_dir(run) is None


# ---------------------------------------------------------------------------------------------------
# Faults: signals, non-finite loss


def _interrupt(digits: Path, run: Path, signum: int) -> subprocess.CompletedProcess:
    """Start a long run, wait for its first step, send `signum`, wait for it to exit."""
    command = [
        sys.executable,
        "-m",
        "tdiff",
        "train",
        *SMALL,
        "--data",
        str(digits),
        "--out",
        str(run),
        "--steps",
        "100000",
        "--batch-size",
        "4",
        "--set",
        "train.log_every=1",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in process.stderr:  # plain status lines: stderr is not a terminal
            lines.append(line)
            if line.startswith("step "):
                process.send_signal(signum)
                break
        lines += process.stderr.readlines()
        process.wait(timeout=60)
    finally:
        process.kill()
    return subprocess.CompletedProcess(command, process.returncode, "", "".join(lines))


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_leaves_a_loadable_checkpoint_and_the_run_resumes(digits, tmp_path, signum, code):
    run = tmp_path / "run"
    result = _interrupt(digits, run, signum)
    assert result.returncode == code, result.stderr
    assert f"stopped by {signal.Signals(signum).name}; resume with: tdiff train --resume {run}" in result.stderr
    step_dir = ckpt.latest_step_dir(run)
    state = ckpt.load_checkpoint(step_dir)
    assert state.step >= 1 and step_dir.name == ckpt.step_name(state.step)
    assert main(["train", "--resume", str(run), "--steps", str(state.step + 1), "--num-workers", "0", "--cpu"]) == 0
    assert ckpt.load_checkpoint(ckpt.latest_step_dir(run)).step == state.step + 1


@pytest.fixture(scope="session")
def digit_folder(digits, tmp_path_factory) -> Path:
    """The same digits as PNG files in one folder per class: decoded by DataLoader workers."""
    folder = tmp_path_factory.mktemp("folder")
    with np.load(digits) as npz:
        for i, (image, label) in enumerate(zip(npz["images"], npz["labels"])):
            (folder / str(label)).mkdir(exist_ok=True)
            Image.fromarray(image).save(folder / str(label) / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize(
    ("signum", "code", "source", "workers"),
    [
        (signal.SIGTERM, 143, "folder", 2),  # scancel: workers and main process get it at once
        (signal.SIGHUP, 129, "folder", 2),  # the terminal closed
        (signal.SIGINT, 130, "npz", 0),  # Ctrl-C reaches the group; in-memory data has no workers
    ],
)
def test_a_signal_to_the_whole_process_group_still_saves(digits, digit_folder, tmp_path, signum, code, source, workers):
    run = tmp_path / "run"
    data = digit_folder if source == "folder" else digits
    small = [a for a in SMALL if a not in ("--num-workers", "0")]
    command = [
        sys.executable,
        "-m",
        "tdiff",
        "train",
        *small,
        "--num-workers",
        str(workers),
        "--data",
        str(data),
        "--out",
        str(run),
        "--steps",
        "100000",
        "--batch-size",
        "4",
        "--set",
        "train.log_every=1",
    ]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True
    )  # its own process group, as under a scheduler
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            if line.startswith("step 2/"):
                os.killpg(process.pid, signum)
                break
        lines += process.stderr.readlines()
        process.wait(timeout=60)
    finally:
        process.kill()
    err = "".join(lines)
    assert process.returncode == code, err
    assert "Traceback" not in err and f"stopped by {signal.Signals(signum).name}" in err
    state = ckpt.load_checkpoint(ckpt.latest_step_dir(run))
    assert state.step >= 2


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(digits, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(digits, run, "--steps", "2", "--batch-size", "4") == 0
    good = checkpoint_tensors(run / "checkpoints" / "00000002")
    capsys.readouterr()
    # lr 1e30 makes the weights enormous after one step, so the next loss overflows
    assert (
        main(["train", "--resume", str(run), "--steps", "8", "--set", "train.lr=1e30", "--num-workers", "0", "--cpu"])
        == 1
    )
    err = capsys.readouterr().err
    assert "failed: non-finite loss" in err and f"Last good checkpoint: {run / 'checkpoints' / '00000002'}" in err
    assert (run / "checkpoints" / "latest").read_text().strip() == "00000002"
    kept = checkpoint_tensors(ckpt.latest_step_dir(run))
    assert all(torch.equal(good["model"][k], kept["model"][k]) for k in good["model"])


# ---------------------------------------------------------------------------------------------------
# Bad input: exit 2 with one line


def test_cifar10_missing_offline_is_one_line_exit_2(tmp_path, capsys):
    code = main(
        [
            "train",
            "--preset",
            "d2s8i",
            "--data",
            "cifar10",
            "--data-dir",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "run"),
            "--cpu",
        ]
    )
    assert code == 2
    err = error_line(capsys)
    assert err.startswith("error: CIFAR-10 not found") and "cifar-10-python.tar.gz" in err and "--data PATH" in err
    assert not (tmp_path / "run").exists()


def test_channel_and_class_mismatch_names_the_set_fix(tmp_path, capsys):
    grey = np.random.default_rng(0).integers(0, 256, (6, 16, 16), dtype=np.uint8)
    data = tmp_path / "grey.npz"
    np.savez(data, images=grey, labels=np.array([0, 1, 2, 0, 1, 2]))
    assert main(["train", *SMALL, "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    assert "add --set model.channels=1 --set model.num_classes=3" in error_line(capsys)
    # ...and the suggested fix trains
    assert (
        main(
            [
                "train",
                *SMALL,
                "--data",
                str(data),
                "--out",
                str(tmp_path / "run"),
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--set",
                "model.channels=1",
                "--set",
                "model.num_classes=3",
            ]
        )
        == 0
    )


def test_unwritable_output_directory(digits, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")  # works as root too, unlike chmod
    assert train(digits, blocker / "run", "--steps", "1") == 2
    assert error_line(capsys).startswith(f"error: cannot create the run directory {blocker / 'run'}")


def test_starting_a_run_in_an_existing_run_directory(digits, one_step_run, tmp_path, capsys):
    run = copy_run(one_step_run, tmp_path / "run")
    assert train(digits, run, "--steps", "2", "--batch-size", "2") == 2
    assert "already holds a run; add --resume" in error_line(capsys)


def test_resume_needs_a_checkpoint(one_step_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--resume", str(empty)]) == 2
    assert "not a tdiff run directory" in error_line(capsys)
    # A run directory whose checkpoints are gone
    run = copy_run(one_step_run, tmp_path / "run")
    for path in sorted((run / "checkpoints").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    assert main(["train", "--resume", str(run), "--steps", "2", "--cpu"]) == 2
    assert "holds no finished checkpoint" in error_line(capsys)


@pytest.mark.parametrize("kind", ["model", "state"])
def test_corrupt_checkpoint_on_resume_is_one_line_exit_2(one_step_run, tmp_path, capsys, kind):
    run = copy_run(one_step_run, tmp_path / "run")
    path = run / "checkpoints" / STEP / f"{kind}.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # truncated, as after a full disk
    assert main(["train", "--resume", str(run), "--steps", "2", "--num-workers", "0", "--cpu"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: --resume: {run} holds no finished checkpoint that loads")
    assert f"{path} is damaged or not a safetensors file" in line
