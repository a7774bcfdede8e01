"""The run directory (`tdiff.run.RunDir`) and what clusters and people do to runs: a second run into
the same folder, stale locks, full disks, flipped bytes and truncated files, torn metrics lines,
`--out .`, runs started from Python, explicit values on --resume (issue 11's findings 2, 3, 5-9, 12).

Runs are the `tiny` preset at 16x16 on 64 of scikit-learn's digits, in this process through
`tdiff.cli.main`; a few seconds each. About a minute on two cores.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from nets import TINY_ARGS, copy_run
from safetensors import SafetensorError

from tdiff import checkpoint as ckpt
from tdiff.cli import main
from tdiff.config import with_values
from tdiff.errors import UserError
from tdiff.run import RunDir
from tdiff.train import RunOptions, train

SMALL = [
    *TINY_ARGS,
    "--seed",
    "3",
    "--batch-size",
    "4",
    "--json",
    "--set",
    "train.log_every=1",
    "--set",
    "train.save_every=2",
    "--set",
    "train.keep_last=0",
]


def start(digits: Path, out: Path, *args: str) -> int:
    return main(["train", *SMALL, "--data", str(digits), "--out", str(out), *args])


def resume(run: Path, *args: str) -> int:
    return main(["train", "--resume", str(run), "--cpu", "--num-workers", "0", "--json", *args])


def lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def tensors(step_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {kind: ckpt.load_weights(step_dir / f"{kind}.safetensors").tensors for kind in ckpt.FILES}


def assert_same_tensors(a: Path, b: Path) -> None:
    left, right = tensors(a), tensors(b)
    for kind in ckpt.FILES:
        assert left[kind].keys() == right[kind].keys()
        for name in left[kind]:
            assert torch.equal(left[kind][name], right[kind][name]), (kind, name)


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run with checkpoints at 2, 4, 6."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert start(digits, run, "--steps", "6") == 0
    return run


# --------------------------------------------------------------------------------------------------
# Finding 2: one run per folder; default names never collide


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(digits, tmp_path, capsys):
    run = RunDir.create(tmp_path / "run")
    run.lock()  # as a first `tdiff train` does for its whole life
    try:
        assert start(digits, run.path, "--steps", "2") == 2
        (line,) = lines(capsys)
        assert line.startswith(f"error: {run.path} is in use by PID {os.getpid()} on {socket.gethostname()}")
        assert not (run.path / "checkpoints").exists()
        assert resume(run.path) == 2  # --resume is refused just the same
    finally:
        run.unlock()
    assert start(digits, run.path, "--steps", "2") == 0  # free again


def test_a_dead_process_lock_is_taken_over_with_a_message(digits, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 999999, "host": "node7", "since": "yesterday"}))  # no flock held
    assert start(digits, run, "--steps", "2") == 0
    assert any("took over the lock" in line and "PID 999999 on node7" in line for line in lines(capsys))
    assert (run / ".lock").read_text() == ""  # released at the end


def test_default_run_names_started_in_the_same_second_differ(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20260101-120000")
    for _ in range(2):
        assert main(["train", *SMALL, "--data", str(digits), "--steps", "2"]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["tiny-digits-20260101-120000", "tiny-digits-20260101-120000-2"]


# --------------------------------------------------------------------------------------------------
# Finding 3: full disks


def test_disk_full_inside_safetensors_is_one_line_exit_1_and_nothing_left(digits, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert start(digits, run, "--steps", "2") == 0
    before = tensors(run / "checkpoints" / "00000002")

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(ckpt, "save_file", full)
    capsys.readouterr()
    assert resume(run, "--steps", "4") == 1
    (line,) = lines(capsys)
    assert line.startswith("failed: could not write checkpoint") and "No space left on device" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["00000002", "latest"]  # no temporary
    after = tensors(run / "checkpoints" / "00000002")
    assert all(torch.equal(before[k][n], after[k][n]) for k in before for n in before[k])


def test_disk_full_at_fsync_leaves_no_temporary_file(digits, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert start(digits, run, "--steps", "2") == 0
    real_fsync = os.fsync

    def fsync(fd):
        if "checkpoints" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    capsys.readouterr()
    assert resume(run, "--steps", "4") == 1
    assert "No space left on device" in lines(capsys)[-1]
    leftovers = [p for p in run.rglob("*") if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers == [] and ckpt.latest_step_dir(run).name == "00000002"


def test_a_failed_demo_grid_is_a_warning_and_training_goes_on(digits, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tdiff.train.save_png", full)
    assert start(digits, tmp_path / "run", "--steps", "2", "--set", "train.demo_every=1") == 0
    warnings = [line for line in lines(capsys) if line.startswith("warning: demo grid")]
    assert len(warnings) == 2 and "No space left on device" in warnings[0] and "training goes on" in warnings[0]


# --------------------------------------------------------------------------------------------------
# Findings 5-7: every load verifies; resume falls back to the newest checkpoint that does


def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ckpt.FILES)
def test_a_flipped_byte_is_found_on_load(reference, tmp_path, kind):
    path = copy_run(reference, tmp_path / "run") / "checkpoints" / "00000006" / f"{kind}.safetensors"
    flip_byte(path)
    with pytest.raises(UserError, match=f"{path} is damaged: its contents do not match the SHA-256"):
        ckpt.load_weights(path)


def test_sampling_a_flipped_ema_file_is_one_line_exit_2(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "run")
    flip_byte(run / "checkpoints" / "00000006" / "ema.safetensors")
    assert main(["sample", str(run), "-n", "2", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "s")]) == 2
    (line,) = lines(capsys)
    assert line.startswith("error: ") and "ema.safetensors is damaged" in line


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(digits, reference, tmp_path, capsys, damage):
    run = copy_run(reference, tmp_path / "run")
    import shutil

    shutil.rmtree(run / "checkpoints" / "00000006")  # as if killed at step 5: newest is step 4
    newest = run / "checkpoints" / "00000004" / "state.safetensors"
    flip_byte(newest) if damage == "flip" else newest.write_bytes(newest.read_bytes()[:1000])
    assert resume(run, "--steps", "6") == 0
    warnings = [line for line in lines(capsys) if line.startswith("warning:")]
    assert "skipped checkpoint 00000004" in warnings[0] and "state.safetensors" in warnings[0]
    assert "resuming from 00000002" in warnings[1]
    assert (run / "checkpoints" / "00000004.damaged").is_dir()  # kept for inspection, out of the way
    assert_same_tensors(run / "checkpoints" / "00000006", reference / "checkpoints" / "00000006")
    steps = [r["step"] for r in RunDir(run).read_metrics()[0]]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_weights_file_in_place_of_the_state_file_is_named(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "run")
    for step in ("00000002", "00000004", "00000006"):
        folder = run / "checkpoints" / step
        (folder / "state.safetensors").write_bytes((folder / "ema.safetensors").read_bytes())
    assert resume(run, "--steps", "8") == 2
    (line,) = lines(capsys)
    assert "state.safetensors holds ema tensors, not the state file" in line


# --------------------------------------------------------------------------------------------------
# Finding 6: damaged small files are one line, never a traceback or silent defaults


def test_a_malformed_run_json_is_one_line(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "run")
    (run / "run.json").write_text('{"data": "x.npz", "se')
    assert resume(run) == 2
    (line,) = lines(capsys)
    assert line.startswith(f"error: {run / 'run.json'} is damaged")


def test_a_truncated_config_is_refused_not_filled_with_defaults(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "run")
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text[: text.index("\n", text.index("[train]") + 40) + 1])  # cut in [train]
    assert resume(run, "--steps", "8") == 2
    (line,) = lines(capsys)
    assert f"{run / 'config.toml'} is incomplete" in line and "train." in line
    (run / "config.toml").unlink()  # the way out the message gives: the checkpoint's own copy
    assert resume(run, "--steps", "7") == 0


def test_compare_skips_torn_and_undecodable_metrics_lines_with_a_warning(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "run")
    record = {"kind": "eval", "step": 6, "fid": 12.5, "kid": 0.001, "kid_x1e4": 10.0, "n": 10, "protocol": "clean"}
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe not utf-8\n" + json.dumps(record).encode() + b"\n" + b'{"step": 7, "lo')
    assert main(["compare", str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["runs"][0]["best"]["fid"] == 12.5
    assert "skipped 2 torn or undecodable line(s)" in err


# --------------------------------------------------------------------------------------------------
# Finding 8: a resumed run never logs a step twice and never glues a torn line


def test_resume_drops_replayed_steps_and_torn_lines_from_the_metrics(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "run")
    import shutil

    shutil.rmtree(run / "checkpoints" / "00000006")  # killed after logging step 6, before saving it
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.')  # and a torn line
    assert resume(run, "--steps", "7") == 0
    assert any("line 7 was torn or not JSON" in line for line in lines(capsys))
    text = (run / "metrics.jsonl").read_text()
    steps = [json.loads(line)["step"] for line in text.splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]


# --------------------------------------------------------------------------------------------------
# Finding 9: `--out .` never overwrites a user's files


def test_out_dot_in_a_project_folder_is_refused_untouched(digits, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text("# my project's own config\n")
    (tmp_path / "run.json").write_text('{"mine": true}\n')
    assert main(["train", *SMALL, "--data", str(digits), "--out", ".", "--steps", "1"]) == 2
    (line,) = lines(capsys)
    assert line.startswith("error: --out .: the folder holds other files") and "not a tdiff run" in line
    assert (tmp_path / "config.toml").read_text() == "# my project's own config\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "run.json"]


# --------------------------------------------------------------------------------------------------
# Finding 12: the library owns run.json; explicit values on --resume are honoured


def test_a_run_started_from_python_resumes_from_the_cli(digits, reference, tiny_config, tmp_path):
    config = with_values(
        tiny_config, train__log_every=1, train__save_every=2, train__keep_last=0, train__batch_size=4, train__steps=4
    )
    run = tmp_path / "run"
    summary = train(config, RunOptions(data=str(digits), out=run, seed=3, cpu=True, num_workers=0))
    assert summary.step == 4 and json.loads((run / "run.json").read_text())["seed"] == 3
    assert resume(run, "--steps", "6") == 0
    assert_same_tensors(run / "checkpoints" / "00000006", reference / "checkpoints" / "00000006")


def test_values_given_again_on_resume_are_used_even_when_they_equal_the_old_defaults(digits, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert start(digits, run, "--steps", "2", "--data-dir", str(tmp_path / "elsewhere")) == 0
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "mixed_precision": "bf16"}))
    seen = {}

    def capture(config, options, on_event=None):
        seen.update(seed=options.seed, data_dir=options.data_dir, mixed_precision=options.mixed_precision)
        raise UserError("captured")

    monkeypatch.setattr("tdiff.train.train", capture)
    assert resume(run, "--seed", "0", "--data-dir", "data", "--mixed-precision", "no") == 2
    assert seen == {"seed": 0, "data_dir": Path("data"), "mixed_precision": "no"}
    assert resume(run) == 2  # nothing given: the run's own
    assert seen == {"seed": 3, "data_dir": tmp_path / "elsewhere", "mixed_precision": "bf16"}
