"""`tdiff sample` on a checkpoint trained here (tiny preset, 16x16, 2 steps): determinism across batch
sizes, a lone checkpoint file, outputs and labels, the output folder (streamed, continued, never mixed
or overwritten), and one-line errors for checkpoints and options that do not fit. In-process through
`tdiff.cli.main`, CPU, a few sampler steps; about 30 s on two cores."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from tdiff import cli
from tdiff import sample as sampling
from tdiff.checkpoint import save_weights
from tdiff.cli import main
from tdiff.config import SamplerName, loads
from tdiff.sample import choose_labels, generate, load_denoiser, make_plan, random_labels
from tdiff.samplers import SAMPLERS

FAST = ["--steps", "3", "--device", "cpu"]  # a few sampler steps: these tests check plumbing, not images


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-step tiny run at 16x16 on 32 random class-labelled images."""
    root = tmp_path_factory.mktemp("sample")
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", images=rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8), labels=np.arange(32) % 10)
    code = main(
        [
            "train",
            "--preset",
            "tiny",
            "--cpu",
            "--num-workers",
            "0",
            "--set",
            "model.image_size=16",
            "--set",
            "train.demo_every=0",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--data",
            str(root / "data.npz"),
            "--out",
            str(root / "run"),
            "--json",
        ]
    )
    assert code == 0
    return root / "run"


def sample_npz(capsys, out: Path, *args) -> dict:
    code, stdout, err = run_cli(capsys, "sample", *args, "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)  # stdout holds exactly one JSON object
    with np.load(out / "samples.npz") as npz:
        summary["arrays"] = {k: npz[k] for k in npz.files}
    return summary


# ---------------------------------------------------------------------------------------------------
# Determinism and outputs


def test_images_do_not_depend_on_the_batch_size(run_dir, tmp_path, capsys):
    whole = sample_npz(capsys, tmp_path / "b6", run_dir, "-n", "6", "--batch-size", "6", *FAST)
    split = sample_npz(capsys, tmp_path / "b4", run_dir, "-n", "6", "--batch-size", "4", *FAST)
    assert whole["arrays"]["images"].shape == (6, 16, 16, 3) and whole["arrays"]["images"].dtype == np.uint8
    assert np.array_equal(whole["arrays"]["images"], split["arrays"]["images"])
    assert np.array_equal(whole["arrays"]["labels"], split["arrays"]["labels"])
    # image k depends on seed + k only: seed 2 starts where seed 0 was at image 2
    shifted = sample_npz(capsys, tmp_path / "s2", run_dir, "-n", "2", "--seed", "2", "--class", "2,3", *FAST)
    assert np.array_equal(shifted["arrays"]["images"], whole["arrays"]["images"][2:4])


def test_a_checkpoint_file_alone_is_enough(run_dir, tmp_path, capsys):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run_dir / "checkpoints" / "00000002" / "ema.safetensors", lone / "weights.safetensors")
    from_file = sample_npz(capsys, tmp_path / "a", lone / "weights.safetensors", "-n", "3", *FAST)
    from_run = sample_npz(capsys, tmp_path / "b", run_dir, "-n", "3", *FAST)  # run dir -> latest EMA weights
    assert np.array_equal(from_file["arrays"]["images"], from_run["arrays"]["images"])
    assert from_file["step"] == 2 and Path(from_run["checkpoint"]).name == "ema.safetensors"
    raw = sample_npz(capsys, tmp_path / "c", run_dir, "-n", "3", "--no-ema", *FAST)
    assert Path(raw["checkpoint"]).name == "model.safetensors"


def test_outputs_grid_pngs_and_summary(run_dir, tmp_path, capsys):
    summary = sample_npz(capsys, tmp_path / "o", run_dir, "-n", "5", "--png", "--class", "3", *FAST)
    assert summary["arrays"]["labels"].tolist() == [3] * 5
    with Image.open(summary["grid"]) as grid:
        assert grid.size == (3 * 16, 2 * 16)  # 5 images on a 3 x 2 grid
    files = sorted((tmp_path / "o" / "images").iterdir())
    assert [f.name for f in files] == [f"{k:06d}.png" for k in range(5)]
    with Image.open(files[4]) as last:
        assert np.array_equal(np.asarray(last), summary["arrays"]["images"][4])
    assert summary["images_per_second"] > 0 and summary["n"] == 5 and summary["steps"] == 3


def test_no_ema_takes_the_trained_weights_or_refuses(run_dir, tmp_path, capsys):
    step_dir = run_dir / "checkpoints" / "00000002"
    from_file = sample_npz(capsys, tmp_path / "a", step_dir / "ema.safetensors", "-n", "2", "--no-ema", *FAST)
    from_run = sample_npz(capsys, tmp_path / "b", run_dir, "-n", "2", "--no-ema", *FAST)
    assert Path(from_file["checkpoint"]) == step_dir / "model.safetensors"
    assert np.array_equal(from_file["arrays"]["images"], from_run["arrays"]["images"])
    lone = tmp_path / "lone.safetensors"
    shutil.copy(step_dir / "ema.safetensors", lone)
    code, out, err = run_cli(capsys, "sample", lone, "-n", "1", "--no-ema", "--out", tmp_path / "c", *FAST)
    assert code == 2 and out == "" and "--no-ema" in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------------
# The output folder: written batch by batch, continued, never mixed, never someone else's


def stop_after_batches(monkeypatch, batches: int) -> None:
    """Ctrl-C in the sampler once `batches` batches are done."""
    real, calls = sampling.sample_batch, []

    def sample_batch(*args, **kwargs):
        if len(calls) == batches:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_batch", sample_batch)


def test_an_interrupted_call_keeps_its_batches_and_the_rerun_completes_it(run_dir, tmp_path, capsys, monkeypatch):
    args = [run_dir, "-n", "7", "--png", "--class", "random", *FAST]
    whole = sample_npz(capsys, tmp_path / "whole", *args, "--batch-size", "2")
    out = tmp_path / "stopped"
    stop_after_batches(monkeypatch, 2)
    code, _, err = run_cli(capsys, "sample", *args, "--batch-size", "2", "--out", out, "--json")
    assert code == 130 and "4 of 7 images are kept" in err and not (out / "samples.npz").exists()
    assert len(list((out / "parts").glob("*.npy"))) == 2 and len(list((out / "images").glob("*.png"))) == 4
    monkeypatch.undo()
    again = sample_npz(capsys, out, *args, "--batch-size", "3")  # the batch size does not change the images
    assert again["generated"] == 3 and whole["generated"] == 7
    for name in ("images", "labels"):
        assert np.array_equal(again["arrays"][name], whole["arrays"][name])
        assert again["arrays"][name].dtype == whole["arrays"][name].dtype
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "manifest.json", "samples.npz"]
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))
    done = sample_npz(capsys, out, *args, "--batch-size", "2")  # a finished folder: nothing to do
    assert done["generated"] == 0 and np.array_equal(done["arrays"]["images"], whole["arrays"]["images"])


def test_other_settings_are_refused_and_overwrite_clears_the_old_outputs(run_dir, tmp_path, capsys):
    out = tmp_path / "o"
    sample_npz(capsys, out, run_dir, "-n", "5", "--png", *FAST)
    code, _, err = run_cli(capsys, "sample", run_dir, "-n", "3", "--png", "--seed", "1", "--out", out, *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "other settings" in err and "n 5 -> 3" in err and "seed 0 -> 1" in err and "--overwrite" in err
    assert len(list((out / "images").iterdir())) == 5  # refused: untouched
    sample_npz(capsys, out, run_dir, "-n", "3", "--png", "--seed", "1", "--overwrite", *FAST)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_with_other_files_is_refused(overwrite, run_dir, tmp_path, capsys):
    project = tmp_path / "project"
    (project / "images").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    (project / "images" / "cat.png").write_bytes(b"not tdiff's")
    code, _, err = run_cli(capsys, "sample", run_dir, "-n", "1", "--out", project, *FAST, *overwrite)
    assert code == 2 and "did not write" in err and "notes.txt" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in project.rglob("*")) == ["cat.png", "images", "notes.txt"]
    assert (project / "notes.txt").read_text() == "mine"


def test_the_grid_shows_the_first_256_images(run_dir, tmp_path, capsys):
    summary = sample_npz(
        capsys, tmp_path / "g", run_dir, "-n", "300", "--batch-size", "150", "--steps", "1", "--device", "cpu"
    )
    assert summary["arrays"]["images"].shape == (300, 16, 16, 3)
    with Image.open(summary["grid"]) as grid:
        assert grid.size == (16 * 16, 16 * 16)
        assert np.array_equal(np.asarray(grid)[-16:, -16:], summary["arrays"]["images"][255])


def test_too_many_images_for_the_disk_are_refused_before_sampling(run_dir, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100e9, 60e9, 40e9))
    monkeypatch.setattr(sampling, "sample_batch", lambda *a, **k: pytest.fail("sampling started"))
    code, _, err = run_cli(capsys, "sample", run_dir, "-n", "100000000", "--out", tmp_path / "big", *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "-n 100000000: samples.npz would need 78 GB (100,000,000 x 16x16x3 bytes + 8-byte labels)" in err
    assert "40 GB free" in err and not (tmp_path / "big").exists()


@pytest.mark.parametrize(
    "error, code, message",
    [
        (OSError(errno.ENOSPC, "No space left on device"), 1, "No space left on device"),
        (PermissionError(errno.EACCES, "Permission denied"), 2, "choose another --out"),
    ],
)
def test_a_failed_write_is_one_line_and_keeps_the_finished_batches(
    error, code, message, run_dir, tmp_path, capsys, monkeypatch
):
    real, parts = sampling.atomic_write, []

    def fail_halfway(file):
        file.write(b"half a batch")
        raise error

    def atomic_write(path, write):  # the second batch file meets a full disk (or a read-only folder)
        if path.parent.name == "parts":
            parts.append(path)
        return real(path, fail_halfway if len(parts) == 2 and path == parts[-1] else write)

    monkeypatch.setattr(sampling, "atomic_write", atomic_write)
    out = tmp_path / "full"
    got, _, err = run_cli(capsys, "sample", run_dir, "-n", "5", "--batch-size", "2", "--out", out, "--json", *FAST)
    assert got == code and message in err and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in (out / "parts").iterdir()] == [parts[0].name]  # no temporary file left
    if code == 1:
        assert "the 2 images finished before are kept" in err


def test_sampler_defaults_come_from_the_checkpoint(run_dir, tmp_path, capsys):
    summary = sample_npz(capsys, tmp_path / "d", run_dir, "-n", "1", "--device", "cpu")
    config = load_denoiser(run_dir).config.sample
    assert (summary["sampler"], summary["steps"], summary["eta"], summary["cfg_scale"]) == (
        config.sampler,
        config.steps,
        config.eta,
        config.cfg_scale,
    )
    heun = sample_npz(
        capsys,
        tmp_path / "h",
        run_dir,
        "-n",
        "1",
        "--sampler",
        "heun",
        "--steps",
        "2",
        "--cfg-scale",
        "2",
        "--device",
        "cpu",
    )
    assert (heun["sampler"], heun["steps"], heun["cfg_scale"]) == ("heun", 2, 2.0)


def test_sampler_choices_are_the_cores():
    assert set(SamplerName.__args__) == set(SAMPLERS)
    assert {c.value for c in cli.SamplerChoice} == set(SAMPLERS)


def test_help_lists_the_samplers(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per option, so the choices are not wrapped
    code, out, _ = run_cli(capsys, "sample", "--help")
    assert code == 0 and "Examples" in out
    assert "Sampler: " + ", ".join(SamplerName.__args__) + " (docs/sampling.md)." in out


def test_labels():
    assert choose_labels(None, 5, 3).tolist() == [0, 1, 2, 0, 1]
    assert choose_labels("1,2", 5, 3).tolist() == [1, 2, 1, 2, 1]
    assert choose_labels("2", 2, 3).tolist() == [2, 2]
    assert choose_labels(None, 4, 0) is None
    rand = choose_labels("random", 1000, 10, seed=1)
    assert rand.min() >= 0 and rand.max() <= 9 and len(set(rand.tolist())) == 10
    assert torch.equal(random_labels(5, 10, 1, start=3), rand[3:8])  # label k depends on (seed, k) only
    assert not torch.equal(random_labels(20, 10, 1), random_labels(20, 10, 2))


def test_generate_reports_progress_per_batch(run_dir):
    loaded = load_denoiser(run_dir)
    plan = make_plan(loaded.config, steps=2)
    calls = []
    images = generate(
        loaded.denoiser,
        loaded.config,
        plan,
        5,
        labels=choose_labels(None, 5, 10),
        batch_size=2,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert images.shape == (5, 16, 16, 3) and calls == [(2, 5), (4, 5), (5, 5)]


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback, nothing unpickled


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)


def _tensors_and_metadata(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _resave(path: Path, tensors: dict, meta: dict, config_toml: str) -> None:
    """A well-formed checkpoint (valid checksum) whose tensors do not fit its configuration."""
    extra = {k: v for k, v in meta.items() if k in ("kind", "step")}
    save_weights(path, tensors, loads(config_toml, where="test"), **extra)


def make_bad(kind: str, run_dir: Path, folder: Path) -> Path:
    ema = run_dir / "checkpoints" / "00000002" / "ema.safetensors"
    path = folder / f"{kind}.safetensors"
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    elif kind == "foreign":
        save_file({"weight": torch.zeros(3)}, str(path))
    elif kind == "truncated":
        data = ema.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "wrong_shape":
        tensors, meta = _tensors_and_metadata(ema)
        name = next(k for k, v in tensors.items() if v.ndim == 2)
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
        _resave(path, tensors, meta, meta["config"])
    elif kind == "config_mismatch":
        tensors, meta = _tensors_and_metadata(ema)
        _resave(path, tensors, meta, meta["config"].replace("width = 64", "width = 128"))
    elif kind == "state":
        path = run_dir / "checkpoints" / "00000002" / "state.safetensors"
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("corrupt", "damaged or not a safetensors file"),
        ("pickle", "damaged or not a safetensors file"),
        ("foreign", "not a tdiff checkpoint"),
        ("truncated", "damaged or not a safetensors file"),
        ("wrong_shape", "does not fit its configuration"),
        ("config_mismatch", "does not fit its configuration"),
        ("state", "optimiser state"),
    ],
)
def test_bad_checkpoint_is_one_line(kind, message, run_dir, tmp_path, capsys, no_unpickling):
    code, out, err = run_cli(
        capsys, "sample", make_bad(kind, run_dir, tmp_path), "-n", "1", "--out", tmp_path / "out", *FAST
    )
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class", "12"], "outside 0..9"),
        (["--class", "cat"], "expected a label"),
        (["--sampler", "heun", "--eta", "0.5"], "takes no eta"),
        (["--sigma-min", "90"], "--sigma-min 90.0: must be below"),
        (["--rho", "0"], "--rho 0.0: must be"),
        (["--sigma-max", "inf"], "--sigma-max inf: must be finite"),
        (["--cfg-scale", "inf"], "--cfg-scale inf: must be finite"),
        (["--sampler", "nope"], "Invalid value for '--sampler'"),
    ],
)
def test_bad_options_are_one_line(args, message, run_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", run_dir, "-n", "1", "--out", tmp_path / "out", *FAST, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", tmp_path / "nothing.safetensors", "-n", "1")
    assert code == 2 and "not a checkpoint file, step directory or run directory" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu(run_dir, capsys):
    code, _, err = run_cli(capsys, "sample", run_dir, "-n", "1", "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err


def test_the_network_precision_is_recorded_and_a_folder_continues_only_with_it(run_dir, tmp_path, capsys, monkeypatch):
    from tdiff import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)  # the default is float32 here
    out = tmp_path / "bf16"
    summary = sample_npz(capsys, out, run_dir, "-n", "2", "--mixed-precision", "bf16", *FAST)
    assert summary["precision"] == "bf16" and summary["compile"] is False
    assert json.loads((out / "manifest.json").read_text())["precision"] == "bf16"
    code, _, err = run_cli(capsys, "sample", run_dir, "-n", "2", "--out", out, *FAST)
    assert code == 2 and 'precision "bf16" -> "no"' in err, err
