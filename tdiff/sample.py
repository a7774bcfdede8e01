"""Generating images from a denoiser: per-image seeds, batching, grids.

Image k is drawn from its own generator seeded with `seed + k` (starting noise and any sampler
noise), so it depends on (weights, seed, k) only, never on the batch it was generated in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from tdiff import checkpoint as ckpt
from tdiff.config import Config
from tdiff.diffusion import Denoiser, guided_denoiser
from tdiff.errors import UserError
from tdiff.files import atomic_write
from tdiff.hardware import configure_matmul_precision
from tdiff.model import build_model
from tdiff.samplers import SAMPLERS, ImageNoise, karras_sigmas, randn


@dataclass(frozen=True)
class SamplingPlan:
    """What to run for every batch: sampler, its options and the σ schedule."""

    sampler: str
    steps: int
    sigma_min: float
    sigma_max: float
    rho: float
    cfg_scale: float
    options: dict  # sampler keyword options (eta, solver_type, ...)

    @classmethod
    def from_config(cls, config: Config, **changes) -> "SamplingPlan":
        s, d = config.sample, config.diffusion
        plan = cls(s.sampler, s.steps, d.sigma_min, d.sigma_max, s.rho, s.cfg_scale,
                   sampler_options(s.sampler, s.eta, s.solver_type))
        values = {k: v for k, v in changes.items() if v is not None}
        return plan.__class__(**{**plan.__dict__, **values})


def sampler_options(sampler: str, eta: float, solver_type: str) -> dict:
    """The subset of (eta, solver_type) that a sampler takes."""
    if sampler == "dpmpp_2m_sde":
        return {"eta": eta, "solver_type": solver_type}
    if sampler in ("euler_ancestral", "dpmpp_3m_sde"):
        return {"eta": eta}
    return {}


def spread_labels(n: int, num_classes: int, start: int = 0) -> torch.Tensor:
    """Labels 0, 1, ..., C-1, 0, 1, ... for images start..start+n-1 (evenly spread classes)."""
    return (torch.arange(start, start + n) % max(num_classes, 1)).long()


@torch.no_grad()
def sample_batch(denoiser: Callable, plan: SamplingPlan, seeds: list[int], labels: torch.Tensor | None,
                 shape: tuple[int, int, int], num_classes: int, device: torch.device,
                 callback: Callable | None = None, **net_kwargs) -> torch.Tensor:
    """One batch of images in [-1, 1], (len(seeds), C, H, W), on `device`."""
    noise = ImageNoise(seeds)
    sigmas = karras_sigmas(plan.steps, plan.sigma_min, plan.sigma_max, plan.rho, device=device)
    x = randn((len(seeds), *shape), noise, device=device) * sigmas[0]
    if num_classes:
        denoise = guided_denoiser(denoiser, labels.to(device), num_classes, plan.cfg_scale)
    else:
        denoise = denoiser
    if net_kwargs.get("block_cache") is not None:
        net_kwargs["block_cache"].new_run()  # Δ-DiT deltas belong to one batch: its first evaluation is full
    if net_kwargs:
        base = denoise
        denoise = lambda x, sigma: base(x, sigma, **net_kwargs)  # noqa: E731
    x = SAMPLERS[plan.sampler](denoise, x, sigmas, generator=noise, callback=callback, **plan.options)
    return x.clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), rounding to the nearest level."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, columns: int | None = None) -> Image.Image:
    """Tile uint8 (N, H, W, C) images into one square-ish PIL image, no padding."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (`tdiff.files.atomic_write`): a reader never sees half a file."""
    atomic_write(path, lambda file: image.save(file, format="PNG"))


# --------------------------------------------------------------------------------------------
# From a checkpoint to files: what `tdiff sample` and `tdiff eval` run

ETA_SAMPLERS = ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde")  # the samplers that take `eta`
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when present, else cpu; asking for cuda without one is a UserError.

    Also sets the float32 matmul precision exactly as `tdiff train` does (TF32 on CUDA)."""
    if name not in DEVICES:
        raise UserError(f"device {name!r}: must be one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    configure_matmul_precision()
    return torch.device(name)


@dataclass(frozen=True)
class LoadedModel:
    """A denoiser ready to sample, with the configuration its checkpoint carried."""

    denoiser: Denoiser  # eval mode, on the requested device
    config: Config
    path: Path  # the weights file actually read
    step: int | None  # the training step it was saved at, when the metadata says


def load_denoiser(checkpoint: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """A checkpoint file, step directory or run directory (its latest step; EMA weights unless
    `ema=False`) -> the denoiser. Anything that is not a fitting tdiff checkpoint is one UserError."""
    path = ckpt.resolve(checkpoint, ema=ema)
    weights = ckpt.load_weights(path)  # never unpickles: safetensors + TOML metadata
    if weights.metadata.get("kind") == "state":
        raise UserError(f"{path} holds the optimiser state, not weights; pass ema.safetensors, "
                        "model.safetensors, or the run directory")
    config = weights.config
    net = build_model(config.model, config.sharing)
    ckpt.load_into(net, weights)
    step = weights.metadata.get("step", "")
    denoiser = Denoiser(net, config.diffusion.sigma_data).eval().requires_grad_(False).to(device)
    return LoadedModel(denoiser, config, path, int(step) if step.isdigit() else None)


def make_plan(config: Config, *, sampler: str | None = None, steps: int | None = None,
              sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None,
              eta: float | None = None, cfg_scale: float | None = None) -> SamplingPlan:
    """The checkpoint's [sample] defaults with the given values changed, checked as one set."""
    s = config.sample
    sampler = sampler or s.sampler
    if sampler not in SAMPLERS:
        raise UserError(f"sampler {sampler!r}: must be one of {', '.join(SAMPLERS)}")
    if eta is not None and sampler not in ETA_SAMPLERS:
        raise UserError(f"--eta: the {sampler} sampler takes no eta (those that do: {', '.join(ETA_SAMPLERS)})")
    if cfg_scale is not None and cfg_scale != 1 and not config.model.num_classes:
        raise UserError("--cfg-scale: this model is unconditional (model.num_classes = 0); guidance needs classes")
    plan = SamplingPlan.from_config(config, sampler=sampler, steps=steps, sigma_min=sigma_min,
                                    sigma_max=sigma_max, rho=rho, cfg_scale=cfg_scale,
                                    options=sampler_options(sampler, s.eta if eta is None else eta, s.solver_type))
    if not 0 < plan.sigma_min < plan.sigma_max:
        raise UserError(f"--sigma-min {plan.sigma_min} / --sigma-max {plan.sigma_max}: need 0 < sigma-min < sigma-max")
    return plan


def random_labels(n: int, num_classes: int, seed: int, start: int = 0) -> torch.Tensor:
    """Uniform labels for images start..start+n-1; label k is a hash of (seed, k) alone (splitmix64)."""
    x = np.arange(start, start + n, dtype=np.uint64) + np.full(n, seed, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x % np.uint64(num_classes)).astype(np.int64))


def choose_labels(spec: str | None, n: int, num_classes: int, seed: int = 0) -> torch.Tensor | None:
    """Labels for n images from --class: None/"spread" (0, 1, ..., C-1, 0, ...), "random" (uniform,
    from the seed), one label ("3") or a comma list ("1,5,7", repeated over the images)."""
    if not num_classes:
        if spec not in (None, "spread"):
            raise UserError("--class: this model is unconditional (model.num_classes = 0); leave --class out")
        return None
    spec = (spec or "spread").strip()
    if spec == "spread":
        return spread_labels(n, num_classes)
    if spec == "random":
        return random_labels(n, num_classes, seed)
    try:
        chosen = [int(item) for item in spec.split(",")]
    except ValueError:
        raise UserError(f"--class {spec}: expected a label, a comma list of labels, 'spread' or 'random'") from None
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"--class {spec}: label {bad[0]} is outside 0..{num_classes - 1} (this model has "
                        f"{num_classes} classes)")
    return torch.tensor(chosen, dtype=torch.long).repeat(math.ceil(n / len(chosen)))[:n]


def generate(denoiser: Callable, config: Config, plan: SamplingPlan, n: int, *, seed: int = 0,
             labels: torch.Tensor | None = None, batch_size: int = 64, device: str | torch.device = "cpu",
             progress: Callable[[int, int], None] | None = None, **net_kwargs) -> np.ndarray:
    """n images as uint8 (n, H, W, C), `batch_size` at a time; image k from seed + k and labels[k].

    `progress(done, n)` is called after every batch; `net_kwargs` go to every network call.
    """
    m = config.model
    if m.num_classes and (labels is None or len(labels) != n):
        raise ValueError(f"a class-conditional model needs {n} labels")
    shape = (m.channels, m.image_size, m.image_size)
    images = np.empty((n, m.image_size, m.image_size, m.channels), dtype=np.uint8)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = sample_batch(denoiser, plan, list(range(seed + start, seed + stop)),
                             labels[start:stop] if labels is not None else None, shape, m.num_classes,
                             torch.device(device), **net_kwargs)
        images[start:stop] = to_uint8(batch)  # (B, H, W, C)
        if progress is not None:
            progress(stop, n)
    return images


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez atomically (`tdiff.files.atomic_write`)."""
    atomic_write(path, lambda file: np.savez(file, **arrays))


def write_samples(out: Path, images: np.ndarray, labels: torch.Tensor | None, *, grid: bool = True,
                  png: bool = False) -> dict[str, Path]:
    """samples.npz (images uint8 NHWC, labels when conditional), grid.png, and images/NNNNNN.png."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = {"npz": out / "samples.npz"}
        arrays = {"images": images} if labels is None else {"images": images, "labels": labels.numpy()}
        save_npz(written["npz"], **arrays)
        if grid:
            written["grid"] = out / "grid.png"
            save_png(image_grid(images), written["grid"])
        if png:
            written["png_dir"] = out / "images"
            written["png_dir"].mkdir(exist_ok=True)
            for k, image in enumerate(images):
                save_png(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image),
                         written["png_dir"] / f"{k:06d}.png")
    except OSError as e:
        raise UserError(f"cannot write samples to {out} ({e.strerror or e}); choose another --out") from None
    return written

