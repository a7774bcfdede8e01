"""`tdiff eval` and in-training evaluation without the Inception weights: a small feature extractor is
injected by monkeypatching `tdiff.evaluate.load_inception` in this process (conftest.py's
`fake_inception`: no CLI flag, no code named by an environment variable). Also: the real extractor is
what runs by default, and offline it fails with the one-line message, before any sampling. CPU, tiny
preset at 16x16 (a copy of the shared `tiny_run`), a few sampler steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nets import TINY_ARGS, copy_run, run_cli

from tdiff import evaluate
from tdiff.cli import main
from tdiff.sample import load_denoiser

FAST = ["--steps", "2", "--device", "cpu"]
TRAIN = ["train", *TINY_ARGS, "--batch-size", "4", "--json"]

pytestmark = pytest.mark.usefixtures("no_inception")  # offline, no weights anywhere, a fresh cache folder


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory) -> Path:
    """This module's copy of the shared 2-step tiny run: `tdiff eval RUN` appends to its metrics.jsonl."""
    return copy_run(tiny_run, tmp_path_factory.mktemp("eval") / "run")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------
# tdiff eval with the injected extractor


def test_eval_run_appends_a_record_and_caches_the_reference(run_dir, tiny_data, fake_inception, capsys):
    before = len(metrics(run_dir))
    code, out, err = run_cli(capsys, "eval", run_dir, "-n", "6", *FAST, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert fake_inception.loads == [{"path": None, "resize": "clean"}]  # the default protocol's resize
    assert fake_inception.images == 40 + 6  # the whole training set once, then the samples
    assert result["n_ref"] == 40 and result["n_fake"] == 6 and result["protocol"] == "clean"
    assert result["kid_x1e4"] == pytest.approx(result["kid"] * 1e4)
    assert "fid_float64" not in result and "kid_float64" not in result  # clean: float64 already
    assert set(fake_inception.dtypes) == {np.uint8}
    caches = list(evaluate.reference_cache_dir().glob("train.fid-ref-clean-40-*.npz"))
    # in the cache folder, not beside the data
    assert len(caches) == 1 and not list(tiny_data.parent.glob("*fid-ref*"))
    written = caches[0].stat().st_mtime_ns

    record = metrics(run_dir)[-1]
    assert record["kind"] == "eval" and record["step"] == 2 and record["protocol"] == "clean"
    assert record["n"] == 6 and record["fid"] == result["fid"] and record["kid"] == result["kid"]
    assert record["kid_x1e4"] == result["kid_x1e4"]

    # Second evaluation: the cache is read, not rewritten; only the samples go through the extractor.
    code, out, err = run_cli(capsys, "eval", run_dir, "-n", "6", *FAST, "--json")
    assert code == 0, err
    assert fake_inception.images == 40 + 6 + 6 and caches[0].stat().st_mtime_ns == written
    assert json.loads(out)["fid"] == result["fid"]  # same checkpoint, seed and reference
    assert [r.get("kind") for r in metrics(run_dir)[before:]] == ["eval", "eval"]


def test_eval_table_output(run_dir, fake_inception, capsys):
    code, out, err = run_cli(capsys, "eval", run_dir, "-n", "4", *FAST, "--fid")
    assert code == 0, err
    assert "FID" in out and "KID" not in out  # --fid alone: FID only
    assert "appended to" in err


def test_paper_protocol(run_dir, tiny_data, fake_inception, capsys):
    code, out, err = run_cli(capsys, "eval", run_dir, "--protocol", "paper", "-n", "8", "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert fake_inception.loads[-1]["resize"] == "kdiffusion"
    assert fake_inception.dtypes == [np.uint8, np.float32]  # the reals as stored, then the unrounded samples
    assert (result["sampler"], result["steps"], result["cfg_scale"]) == ("dpmpp_2m_sde", 50, 1.0)
    assert result["n_ref"] == 8 and result["n_fake"] == 8  # as many training images as samples
    # fid/kid: k-diffusion's float32 numbers; the float64 ones beside them
    assert {"fid", "fid_float64", "kid", "kid_float64", "kid_x1e4"} <= set(result)
    assert result["fid"] == pytest.approx(result["fid_float64"], rel=1e-3)
    assert result["kid_x1e4"] == pytest.approx(result["kid"] * 1e4)
    assert list(evaluate.reference_cache_dir().glob("train.fid-ref-paper-8-*.npz"))
    record = metrics(run_dir)[-1]
    assert record["protocol"] == "paper"
    assert {k: record[k] for k in ("fid", "fid_float64", "kid", "kid_float64")} == {
        k: result[k] for k in ("fid", "fid_float64", "kid", "kid_float64")
    }
    code, out, err = run_cli(capsys, "eval", run_dir, "--protocol", "paper", "-n", "8", "--device", "cpu")
    assert code == 0 and "FID, float64" in out and "KID, float64" in out and "float32" in out, err
    code, _, err = run_cli(capsys, "eval", run_dir, "--protocol", "paper", "--steps", "3")
    assert code == 2 and "fixes the sampler" in err


def test_images_score_like_the_checkpoint(run_dir, tiny_data, fake_inception, tmp_path, capsys):
    # `sample --class random` draws what `eval` draws: the same images, so the same FID
    assert run_cli(capsys, "sample", run_dir, "-n", "6", "--class", "random", *FAST, "--out", tmp_path)[0] == 0
    code, out, err = run_cli(capsys, "eval", "--images", tmp_path / "samples.npz", "--data", tiny_data, "--json")
    assert code == 0, err
    from_images = json.loads(out)
    code, out, err = run_cli(capsys, "eval", run_dir, "-n", "6", *FAST, "--json")
    assert from_images["fid"] == pytest.approx(json.loads(out)["fid"], rel=1e-9)
    assert from_images["metrics"] is None  # images are not a checkpoint of the run: nothing appended
    # --ref: the cached statistics file itself, and a folder of images
    stats = next(evaluate.reference_cache_dir().glob("train.fid-ref-clean-40-*.npz"))
    code, out, err = run_cli(capsys, "eval", "--images", tmp_path / "samples.npz", "--ref", stats, "--json")
    assert code == 0, err
    assert json.loads(out)["fid"] == pytest.approx(from_images["fid"], rel=1e-9)


def test_a_checkpoint_outside_a_run_needs_a_reference(run_dir, tiny_data, fake_inception, tmp_path, capsys):
    lone = tmp_path / "ema.safetensors"
    lone.write_bytes((run_dir / "checkpoints" / "00000002" / "ema.safetensors").read_bytes())
    code, _, err = run_cli(capsys, "eval", lone, "-n", "4", *FAST)
    assert code == 2 and "no reference" in err
    code, out, err = run_cli(capsys, "eval", lone, "-n", "4", *FAST, "--data", tiny_data, "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give either CKPT"),
        (["RUN", "--images", "x.npz"], "give either CKPT"),
        (["RUN", "--protocol", "paper", "-n", "1000"], "holds 40"),
        (["RUN", "--sampler", "heun", "--eta", "1"], "takes no eta"),
        (["--images", "TRAIN", "--compile"], "the sampling options go with CKPT"),
        (["--images", "TRAIN", "--mixed-precision", "bf16"], "the sampling options go with CKPT"),
        (["--images", "TRAIN", "--batch-size", "8"], "the sampling options go with CKPT"),
    ],
)
def test_bad_eval_input(args, message, run_dir, tiny_data, fake_inception, capsys):
    paths = {"RUN": run_dir, "TRAIN": tiny_data}
    code, _, err = run_cli(capsys, "eval", *[paths.get(a, a) for a in args], "--device", "cpu")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_evaluate_checkpoint_from_python(run_dir, tiny_data, fake_inception):
    from tdiff.data import open_dataset

    loaded = load_denoiser(run_dir)
    protocol = evaluate.PROTOCOLS["clean"]
    reference = evaluate.training_reference(
        open_dataset(str(tiny_data), tiny_data.parent, 16), fake_inception, protocol
    )
    stages = []
    result = evaluate.evaluate_checkpoint(
        loaded.denoiser,
        loaded.config,
        reference,
        fake_inception,
        protocol=protocol,
        n=4,
        plan=evaluate.protocol_plan(protocol, loaded.config, steps=2),
        progress=lambda stage, done, total: stages.append(stage),
    )
    assert {"fid", "kid", "kid_x1e4", "n", "n_ref"} <= set(result) and result["n"] == 4
    assert stages[0] == "sample" and stages[-1] == "features"


def test_float_samples_are_the_generated_images_unrounded(run_dir):
    from tdiff.sample import SamplingPlan, generate, random_labels

    loaded = load_denoiser(run_dir)
    config = loaded.config
    plan = SamplingPlan(
        "dpmpp_2m_sde",
        2,
        config.diffusion.sigma_min,
        config.diffusion.sigma_max,
        7.0,
        1.0,
        {"eta": 0.0, "solver_type": "heun"},
    )
    labels = random_labels(5, config.model.num_classes, 3)
    kwargs = dict(seed=3, labels=labels, batch_size=2)
    floats = evaluate.float_samples(loaded.denoiser, config, plan, 5, **kwargs)
    assert floats.dtype == np.float32 and floats.shape == (5, 16, 16, config.model.channels)
    np.testing.assert_array_equal(
        evaluate.quantised(floats)[..., : config.model.channels], generate(loaded.denoiser, config, plan, 5, **kwargs)
    )
    assert not np.array_equal(floats, np.round(floats * 127.5) / 127.5)  # not on the uint8 grid
    # a sampler whose last step is not its denoised image cannot give them
    lms = SamplingPlan("lms", 2, plan.sigma_min, plan.sigma_max, 7.0, 1.0, {})
    with pytest.raises(ValueError, match="last denoised"):
        evaluate.float_samples(loaded.denoiser, config, lms, 2, **{**kwargs, "labels": labels[:2]})


# ---------------------------------------------------------------------------------------------------
# The real extractor by default, offline


def test_default_extractor_is_inception_and_offline_is_one_line(run_dir, capsys, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the weights")

    monkeypatch.setattr(evaluate, "generate", no_sampling)
    code, out, err = run_cli(capsys, "eval", run_dir, "-n", "4", *FAST)
    assert code == 2 and out == ""
    assert err.startswith("error: Inception weights inception-2015-12-05.pt") and "--inception PATH" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = run_cli(capsys, "eval", run_dir, "--inception", run_dir / "missing.pt", *FAST)
    assert code == 2 and "missing.pt not found" in err


# ---------------------------------------------------------------------------------------------------
# In-training evaluation


def test_training_evaluates_by_the_paper_protocol(tiny_data, fake_inception, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            *TRAIN,
            "--steps",
            "2",
            "--data",
            str(tiny_data),
            "--out",
            str(out),
            "--eval-every",
            "1",
            "--set",
            "train.eval_n=6",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert fake_inception.loads == [{"path": None, "resize": "kdiffusion"}]  # loaded once, at the start
    evals = [r for r in metrics(out) if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(r["protocol"] == "paper" and r["n"] == 6 and r["steps"] == 50 for r in evals)
    assert all({"fid", "fid_float64", "kid", "kid_float64"} <= set(r) for r in evals)
    assert fake_inception.dtypes == [np.uint8, np.float32, np.float32]  # reals once; unrounded samples each time
    assert fake_inception.images == 6 + 6 + 6  # reference once, then 6 samples per evaluation


def test_training_without_the_weights_fails_at_the_start(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*TRAIN, "--steps", "2", "--data", str(tiny_data), "--out", str(out), "--eval-every", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Inception weights" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # failed before the run directory was made


def test_eval_every_default_is_off_on_the_cpu(tiny_data, tmp_path, capsys):
    from tdiff.config import loads

    def dry_run(*args):
        code = main(["train", "--preset", "d8", "--data", str(tiny_data), "--cpu", "--dry-run", *args])
        assert code == 0
        return loads(capsys.readouterr().out, "stdout").train.eval_every

    assert dry_run() == 0  # the preset says 10000, but this run is on the CPU
    assert dry_run("--eval-every", "500") == 500
    assert dry_run("--set", "train.eval_every=700", "--eval-every", "0") == 0
