"""Fixtures shared by the tests (plain helpers behind them are in tests/nets.py).

- `private_cache` (autouse): nothing writes into the user's real cache folder.
- Read-only, made once per session: `tiny_config`, `tiny_data`, `digits`, `tiny_run`. A test that
  changes a run works on a copy: `tiny_run_copy`, or `nets.copy_run` for a module's own copy.
- Per test: `fake_inception` (the Inception network replaced by `nets.TinyExtractor`), `no_inception`
  (offline, no weights anywhere), `no_dataset_download` (every dataset download fails at once).
"""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import pytest
from nets import TINY_RUN_ARGS, TinyExtractor, copy_run, tiny, write_digits_npz, write_random_npz


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Inception weights and reference statistics go to a folder of this test session, not ~/.cache/tdiff."""
    monkeypatch.setenv("TDIFF_CACHE_DIR", str(session_cache(tmp_path_factory)))


def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "tdiff-cache"


# ---------------------------------------------------------------------------------------------------
# Made once per session, read-only


@pytest.fixture(scope="session")
def tiny_config():
    """The `tiny` preset at 16x16 with no demo grids: the Config that `nets.TINY_ARGS` give on the command
    line. Frozen; `tdiff.config.with_values(tiny_config, train__steps=4)` (or `nets.tiny(...)`) for variants."""
    return tiny()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """TRAIN/train.npz: 40 random 16x16 RGB uint8 images (seed 1) with labels 0..9 in turn; nothing else is
    in its folder. Read-only."""
    return write_random_npz(tmp_path_factory.mktemp("tiny-data") / "train.npz", n=40, size=16, seed=1)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """DATA/digits.npz: 64 of scikit-learn's 8x8 digits as 16x16 RGB uint8 with their 10 labels. Read-only."""
    return write_digits_npz(tmp_path_factory.mktemp("digits") / "digits.npz", n=64)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """A real `tdiff train` run, trained once per session: the tiny configuration, class-conditional
    (10 classes), on `tiny_data`, CPU, 2 steps of batch 4 with every step logged and the default seed
    (`nets.TINY_RUN_ARGS`); checkpoints/00000002 holds its weights.

    Read-only: sample from it, load it, copy it. A test that writes into it (`tdiff eval RUN` appends to
    metrics.jsonl, `--resume` trains on) takes `tiny_run_copy` or `nets.copy_run(tiny_run, ...)`;
    the session fails at its end if any file of the shared run changed.
    """
    from tdiff.cli import main

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    with pytest.MonkeyPatch.context() as patch:  # before any test's private_cache: set it here too
        patch.setenv("TDIFF_CACHE_DIR", str(session_cache(tmp_path_factory)))
        assert main(["train", *TINY_RUN_ARGS, "--data", str(tiny_data), "--out", str(out)]) == 0
    made = _digests(out)
    yield out
    changed = sorted(set(made.items()) ^ set(_digests(out).items()))
    assert not changed, f"a test wrote into the shared tiny_run (use tiny_run_copy): {sorted({k for k, _ in changed})}"


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path) -> Path:
    """TMP/run: this test's own copy of `tiny_run`, to change as it likes."""
    return copy_run(tiny_run, tmp_path / "run")


# ---------------------------------------------------------------------------------------------------
# Per test: no network, no Inception weights


@pytest.fixture
def fake_inception(monkeypatch) -> TinyExtractor:
    """Injects one `nets.TinyExtractor()` (4x4 pools projected to 8 dimensions; uint8 and float32 images)
    where the CLI and training look up the real network (`tdiff.evaluate.load_inception`), and returns it;
    its `loads` records each lookup's {"path", "resize"}. No CLI flag, no code named by the environment."""
    from tdiff import evaluate

    tiny_extractor = TinyExtractor()

    def load_inception(path=None, *, device="cpu", resize="clean"):
        tiny_extractor.loads.append({"path": path, "resize": resize})
        return tiny_extractor

    monkeypatch.setattr(evaluate, "load_inception", load_inception)
    return tiny_extractor


@pytest.fixture
def no_inception(monkeypatch, tmp_path) -> list[str]:
    """Offline with no Inception weights anywhere: a fresh tdiff cache folder TMP/tdiff-cache, no weights
    named in the environment or in clean-fid's old folder (TMP/cleanfid-cache), and every download fails at
    once. Returns the URLs downloads were tried from."""
    from tdiff import evaluate

    downloads = []

    def refuse(url, dest):
        downloads.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.delenv(evaluate.INCEPTION_ENV, raising=False)
    monkeypatch.setenv(evaluate.CACHE_ENV, str(tmp_path / "tdiff-cache"))
    monkeypatch.setattr(evaluate, "CLEANFID_CACHE_DIR", tmp_path / "cleanfid-cache")
    monkeypatch.setattr(evaluate, "_download", refuse)
    return downloads


@pytest.fixture
def no_dataset_download(monkeypatch):
    """Every dataset download (torchvision's CIFAR archives) fails at once, the way it does offline."""
    import torchvision.datasets.cifar

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", refuse)
