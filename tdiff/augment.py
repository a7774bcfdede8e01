"""Karras et al.'s non-leaking augmentation pipeline, as k-diffusion applies it (reference spec §4.4).

Each image gets a random affine warp; the draws that made it are returned as a 9-vector that the
network is conditioned on (zeros at sampling), so it learns to undo nothing and generate clean
images when told "no augmentation".

Draws a0..a7 (one 8-vector, `_draw`):
  a0 x-flip bit, Bernoulli(½), not gated by prob   a1 y-flip bit, Bernoulli(½), gated
  a2 isotropic scale exponent, N(0, 1), gated       a3 rotation angle, U(−π, π), gated
  a4 anisotropy axis angle, U(−π, π), gated (a4, a5 share a gate)
  a5 anisotropy exponent, N(0, 1)                    a6, a7 translation, N(0, 1) each, one shared gate
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

SCALE_BASE = 2**0.2  # isotropic scale 2^(0.2·a2)
ANISO_BASE = 2**0.2  # stretch 2^(0.2·a5) along the a4 axis, 2^(−0.2·a5) across it
TRANSLATE_FRACTION = 1 / 8  # shift = a·size/8 pixels


def _draw(prob: float, generator=None) -> tuple[torch.Tensor, bool]:
    """The draws a (8,) float64 and whether anything other than the x-flip fired."""
    # A fixed number of draws per image keeps the generator's stream aligned across images.
    flips = torch.randint(2, (2,), generator=generator).double()  # a0, a1 before gating
    fired = torch.rand(5, generator=generator).double() < prob  # y-flip, scale, rotate, aniso, translate
    normals = torch.randn(4, generator=generator).double()  # a2, a5, a6, a7
    angles = (torch.rand(2, generator=generator).double() * 2 - 1) * math.pi  # a3, a4
    a = torch.stack([
        flips[0], flips[1] * fired[0], normals[0] * fired[1], angles[0] * fired[2],
        angles[1] * fired[3], normals[1] * fired[3], normals[2] * fired[4], normals[3] * fired[4],
    ])
    return a, bool(fired.any())


def _scale(sx, sy) -> torch.Tensor:
    return torch.tensor([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=torch.float64)


def _rotate(theta) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)


def _translate(tx, ty) -> torch.Tensor:
    return torch.tensor([[1, 0, tx], [0, 1, ty], [0, 0, 1]], dtype=torch.float64)


def _matrix(a: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel-space 3×3 matrix mapping input (x=column, y=row, 1) to output points, in spec order."""
    a0, a1, a2, a3, a4, a5, a6, a7 = a.tolist()
    # Pixel centres are at integer coordinates, so the image centre is size/2 − 0.5.
    cx, cy = width / 2 - 0.5, height / 2 - 0.5
    mats = [
        _translate(cx, cy),
        _scale(1 - 2 * a0, 1),  # x-flip
        _scale(1, 1 - 2 * a1),  # y-flip
        _scale(SCALE_BASE**a2, SCALE_BASE**a2),
        _rotate(-a3),
        _rotate(a4), _scale(ANISO_BASE**a5, ANISO_BASE**-a5), _rotate(-a4),
        _translate(TRANSLATE_FRACTION * width * a6, TRANSLATE_FRACTION * height * a7),
        _translate(-cx, -cy),
    ]
    out = mats[0]
    for m in mats[1:]:
        out = out @ m
    return out


def _warp(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """out(p) = image(M⁻¹p) for a pixel-space M: bicubic, reflected borders, no clipping."""
    _, height, width = image.shape
    # grid_sample (align_corners=False) addresses pixel p at n = (2p + 1)/size − 1; S maps p -> n.
    S = torch.tensor([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]],
                     dtype=torch.float64)
    theta = S @ torch.linalg.inv(matrix) @ torch.linalg.inv(S)  # normalised output -> input
    theta = theta[None, :2].to(image.dtype)  # (1, 2, 3)
    grid = nnf.affine_grid(theta, [1, *image.shape], align_corners=False)  # (1, H, W, 2)
    out = nnf.grid_sample(image[None], grid, mode="bicubic", padding_mode="reflection", align_corners=False)
    return out[0]


def _conditioning(a: torch.Tensor) -> torch.Tensor:
    """The 9-vector the network sees: [a0, a1, a2, cos a3 − 1, sin a3, a5 cos a4, a5 sin a4, a6, a7]."""
    a0, a1, a2, a3, a4, a5, a6, a7 = a.tolist()
    # cos a3 − 1 and a5·(cos a4, sin a4) are 0 when the transform is off, and continuous in the angle.
    return torch.tensor([a0, a1, a2, math.cos(a3) - 1, math.sin(a3), a5 * math.cos(a4), a5 * math.sin(a4),
                         a6, a7], dtype=torch.float32)


def karras_augment(image: torch.Tensor, prob: float, generator=None, *, enabled: bool = True):
    """Augment one image (C, H, W); returns (augmented (C, H, W), aug_cond (9,) float32).

    The x-flip fires with probability ½ whatever `prob`; each other transform fires with
    probability `prob`. So prob = 0 still flips half the images (aug_cond zero except a0).
    The reference instead switches the whole pipeline off when augment_prob == 0; callers that
    want that pass `enabled=False` (e.g. enabled=prob > 0): image returned as is, aug_cond zeros.
    A flip alone is an exact index flip; anything else is one bicubic warp with reflected borders.
    Randomness comes only from `generator` (a CPU torch.Generator, or None for the global RNG).
    """
    if not enabled:
        return image, torch.zeros(9)
    a, warped = _draw(prob, generator)
    if warped:
        return _warp(image, _matrix(a, *image.shape[-2:])), _conditioning(a)
    return (torch.flip(image, [-1]) if a[0] else image), _conditioning(a)
