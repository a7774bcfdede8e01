"""Plain helpers shared by the tests; conftest.py turns the ones that make files into fixtures.

- Small float64 models and inputs (routing, caching and model tests): `perturbed_net`, `perturb_`, `net_inputs`.
- The tiny configuration every end-to-end test trains: `TINY_ARGS` on the command line, `tiny()` in Python.
- `TinyExtractor`, a cheap stand-in for the Inception network, and `run_cli` / `copy_run` for CLI tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from tdiff.config import Config, ModelConfig, SharingConfig, load_preset, with_values
from tdiff.model import build_model


def perturb_(net, seed):
    """Fill the zero-initialised weights of `net` with small noise drawn from a generator seeded `seed`.

    Zero-initialised branches would make every block an identity and hide every difference.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return net


def perturbed_net(depth=2, substeps=2, interleaved=True, seed=0, dtype=torch.float64):
    """A width-64, 16×16 model whose zero-initialised weights are filled with small noise."""
    torch.manual_seed(seed)
    model = ModelConfig(image_size=16, width=64, head_dim=32, dropout=0.0, num_classes=10)
    net = build_model(model, SharingConfig(depth=depth, substeps=substeps, interleaved=interleaved)).to(dtype)
    return perturb_(net, seed + 1)


def net_inputs(n, seed=0):
    """(x (n, 3, 16, 16), c_noise (n,), labels (n,)) in float64."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64),
        torch.randn(n, generator=g, dtype=torch.float64),
        torch.randint(0, 10, (n,), generator=g),
    )


# ---------------------------------------------------------------------------------------------------
# The tiny configuration: the `tiny` preset at 16x16 on the CPU, no demo grids

TINY_ARGS = "--preset tiny --cpu --num-workers 0 --set model.image_size=16 --set train.demo_every=0".split()
"""`tdiff train` options for the tiny configuration; add --data, --out, --steps and what a test needs."""

TINY_RUN_ARGS = [*TINY_ARGS, "--set", "train.log_every=1", "--steps", "2", "--batch-size", "4", "--json"]
"""The shared `tiny_run` fixture's options: 2 steps of batch 4, every step logged."""


def tiny(**values) -> Config:
    """The configuration TINY_ARGS give, with `with_values` overrides (`train__steps=4`, ...)."""
    return with_values(load_preset("tiny"), model__image_size=16, train__demo_every=0, **values)


def write_random_npz(path: Path, n: int = 40, size: int = 16, seed: int = 1) -> Path:
    """`n` random size x size RGB uint8 images with labels 0..9 in turn, as an .npz at `path`."""
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), labels=np.arange(n) % 10)
    return path


def write_digits_npz(path: Path, n: int = 64) -> Path:
    """The first `n` of scikit-learn's 8x8 digits as 16x16 RGB uint8 with their 10 labels, as an .npz."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images[:n] * 16).clip(0, 255).astype(np.uint8)  # (n, 8, 8), 0..16 -> 0..255
    images = images.repeat(2, axis=1).repeat(2, axis=2)  # (n, 16, 16) nearest upscale
    np.savez(path, images=np.repeat(images[..., None], 3, axis=3), labels=d.target[:n])
    return path


# ---------------------------------------------------------------------------------------------------
# Evaluation without the Inception weights, and the CLI


class TinyExtractor:
    """A stand-in for the Inception feature extractor: cheap, deterministic, sensitive to content.

    Average-pools (N, H, W, 3) images to grid x grid cells (H and W divisible by `grid`), as values in
    [0, 1], and projects them by a fixed random (grid*grid*3, dim) matrix times `scale` (dim None: the
    pooled values themselves). Takes uint8 images and, as the paper protocol's fakes, float32 images in
    [-1, 1]; `accepts` narrows that, and any other input fails an assertion. `key` names the grid,
    dimension and seed, as tdiff's reference cache requires of an extractor.

    Records what it is given: `calls`, `images` (how many), `dtypes` (one per call), `seen` (the arrays
    themselves, with keep=True); the `fake_inception` fixture adds `loads`.
    """

    def __init__(self, grid=4, dim=8, seed=0, scale=1.0, accepts=(np.uint8, np.float32), keep=False):
        self.grid = grid
        rng = np.random.default_rng(seed)
        self.projection = None if dim is None else rng.standard_normal((grid * grid * 3, dim)) * scale
        self.key = f"tiny-{grid}x{grid}-{dim}-{seed}-{scale:g}"
        self.accepts = tuple(np.dtype(t) for t in accepts)
        self.keep = keep
        self.calls, self.images, self.dtypes, self.seen, self.loads = 0, 0, [], [], []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        assert isinstance(images, np.ndarray), type(images)
        assert images.dtype in self.accepts and images.shape[-1] == 3, (images.dtype, images.shape)
        n, h, w, c = images.shape
        self.calls += 1
        self.images += n
        self.dtypes.append(images.dtype.type)
        if self.keep:
            self.seen.append(images)
        g = self.grid
        pooled = images.reshape(n, g, h // g, g, w // g, c).mean(axis=(2, 4)).reshape(n, -1)
        unit = pooled / 255 if images.dtype == np.uint8 else (pooled + 1) / 2
        return unit if self.projection is None else unit @ self.projection


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`tdiff ARGS` in this process (paths and numbers may be given as they are): (exit code, stdout, stderr)."""
    from tdiff.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def copy_run(source: Path, target: Path) -> Path:
    """A copy of the run directory `source` at `target`, for a test that changes a run made once."""
    shutil.copytree(source, target)
    return target
