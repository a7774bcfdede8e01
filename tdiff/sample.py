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

from tdiff.config import Config
from tdiff.diffusion import guided_denoiser
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
    """Write a PNG through a temporary name so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
