"""`tdiff sample` on a checkpoint trained here (tiny preset, 16x16, 2 steps): determinism across batch
sizes, a lone checkpoint file, outputs and labels, and one-line errors for checkpoints that are not
tdiff's. In-process through `tdiff.cli.main`, CPU, a few sampler steps; about 20 s on two cores."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from tdiff import cli
from tdiff.cli import main
from tdiff.config import SamplerName
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
    np.savez(root / "data.npz", images=rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8),
             labels=np.arange(32) % 10)
    code = main(["train", "--preset", "tiny", "--cpu", "--num-workers", "0", "--set", "model.image_size=16",
                 "--set", "train.demo_every=0", "--steps", "2", "--batch-size", "4",
                 "--data", str(root / "data.npz"), "--out", str(root / "run"), "--json"])
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


def test_sampler_defaults_come_from_the_checkpoint(run_dir, tmp_path, capsys):
    summary = sample_npz(capsys, tmp_path / "d", run_dir, "-n", "1", "--device", "cpu")
    config = load_denoiser(run_dir).config.sample
    assert (summary["sampler"], summary["steps"], summary["eta"], summary["cfg_scale"]) == \
        (config.sampler, config.steps, config.eta, config.cfg_scale)
    heun = sample_npz(capsys, tmp_path / "h", run_dir, "-n", "1", "--sampler", "heun", "--steps", "2",
                      "--cfg-scale", "2", "--device", "cpu")
    assert (heun["sampler"], heun["steps"], heun["cfg_scale"]) == ("heun", 2, 2.0)


def test_sampler_choices_are_the_cores():
    assert set(SamplerName.__args__) == set(SAMPLERS)
    assert {c.value for c in cli.SamplerChoice} == set(SAMPLERS)


def test_help_lists_the_samplers(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per option, so the choices are not wrapped
    code, out, _ = run_cli(capsys, "sample", "--help")
    assert code == 0 and "Examples" in out
    assert "<" + "|".join(SamplerName.__args__) + ">" in out


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
    images = generate(loaded.denoiser, loaded.config, plan, 5, labels=choose_labels(None, 5, 10), batch_size=2,
                      progress=lambda done, total: calls.append((done, total)))
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
        save_file(tensors, str(path), meta)
    elif kind == "config_mismatch":
        tensors, meta = _tensors_and_metadata(ema)
        save_file(tensors, str(path), {**meta, "config": meta["config"].replace("width = 64", "width = 128")})
    elif kind == "state":
        path = run_dir / "checkpoints" / "00000002" / "state.safetensors"
    return path


@pytest.mark.parametrize("kind, message", [
    ("corrupt", "not a readable safetensors checkpoint"),
    ("pickle", "not a readable safetensors checkpoint"),
    ("foreign", "not a tdiff checkpoint"),
    ("truncated", "not a readable safetensors checkpoint"),
    ("wrong_shape", "does not fit its configuration"),
    ("config_mismatch", "does not fit its configuration"),
    ("state", "optimiser state"),
])
def test_bad_checkpoint_is_one_line(kind, message, run_dir, tmp_path, capsys, no_unpickling):
    code, out, err = run_cli(capsys, "sample", make_bad(kind, run_dir, tmp_path), "-n", "1", "--out",
                             tmp_path / "out", *FAST)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--class", "12"], "outside 0..9"),
    (["--class", "cat"], "expected a label"),
    (["--sampler", "heun", "--eta", "0.5"], "takes no eta"),
    (["--sigma-min", "90"], "sigma-min"),
    (["--sampler", "nope"], "Invalid value for '--sampler'"),
])
def test_bad_options_are_one_line(args, message, run_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", run_dir, "-n", "1", "--out", tmp_path / "out", *FAST, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", tmp_path / "nothing.safetensors", "-n", "1")
    assert code == 2 and "not a checkpoint file, step directory or run directory" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu(run_dir, capsys):
    code, _, err = run_cli(capsys, "sample", run_dir, "-n", "1", "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err
