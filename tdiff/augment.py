"""Karras et al.'s non-leaking augmentation pipeline, as k-diffusion applies it (reference spec §4.4), batched.

Each image gets a random affine warp; the draws that made it are returned as a 9-vector that the
network is conditioned on (zeros at sampling), so it learns to undo nothing and generate clean
images when told "no augmentation".

Draws a0..a7 per item (`draw_parameters`), a pure function of (seed, stream position):
  a0 x-flip bit, Bernoulli(½), not gated by prob   a1 y-flip bit, Bernoulli(½), gated
  a2 isotropic scale exponent, N(0, 1), gated       a3 rotation angle, U(−π, π), gated
  a4 anisotropy axis angle, U(−π, π), gated (a4, a5 share a gate)
  a5 anisotropy exponent, N(0, 1)                    a6, a7 translation, N(0, 1) each, one shared gate

The host turns a batch's draws into a small plan (`plan_augmentation`: conditioning, flips, inverse
matrices); the device applies it (`augment_batch`): index flips for items that only flip, and one
batched `warp` for the rest. The warp is scikit-image's order-3 `warp` (what the reference calls):
Catmull-Rom cubic convolution with mirror borders, no clipping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf

from tdiff.hardware import to_device
from tdiff.seeds import counter_uniforms, mix_seed

SCALE_BASE = 2**0.2  # isotropic scale 2^(0.2·a2)
ANISO_BASE = 2**0.2  # stretch 2^(0.2·a5) along the a4 axis, 2^(−0.2·a5) across it
TRANSLATE_FRACTION = 1 / 8  # shift = a·size/8 pixels
AUGMENT_STREAM = 2  # mix_seed(seed, AUGMENT_STREAM) keys the augmentation draws
UNIFORMS_PER_ITEM = 13  # 2 flip bits, 5 gates, 4 uniforms -> 4 normals, 2 angles


def draw_parameters(seed: int, positions: np.ndarray, prob: float) -> np.ndarray:
    """(B, 8) float64 draws a0..a7 for the stream positions (B,); a pure function of (seed, position).

    Every item uses the same 13 counter-based uniforms whatever `prob`, so the draws of a position
    do not depend on the batch it is in, and a gate's threshold changes only which transforms fire.
    """
    u = counter_uniforms(mix_seed(seed, AUGMENT_STREAM), np.asarray(positions), UNIFORMS_PER_ITEM)
    flips = (u[:, 0:2] < 0.5).astype(np.float64)  # a0, a1 before gating
    fired = u[:, 2:7] < prob  # y-flip, scale, rotate, aniso, translate; prob 1 always fires (u < 1)
    # Box–Muller on two pairs, (a2, a6) and (a5, a7); 1 − u is in (0, 1], so the log is finite.
    radius = np.sqrt(-2.0 * np.log1p(-u[:, (7, 9)]))  # (B, 2)
    phase = 2.0 * np.pi * u[:, (8, 10)]
    normals = np.concatenate([radius * np.cos(phase), radius * np.sin(phase)], axis=1)  # a2, a5, a6, a7
    angles = (2.0 * u[:, 11:13] - 1.0) * np.pi  # a3, a4
    return np.stack(
        [
            flips[:, 0],
            flips[:, 1] * fired[:, 0],
            normals[:, 0] * fired[:, 1],
            angles[:, 0] * fired[:, 2],
            angles[:, 1] * fired[:, 3],
            normals[:, 1] * fired[:, 3],
            normals[:, 2] * fired[:, 4],
            normals[:, 3] * fired[:, 4],
        ],
        axis=1,
    )


def _scale(sx, sy) -> np.ndarray:
    """(B, 3, 3) diagonal matrices diag(sx, sy, 1); sx, sy (B,)."""
    m = np.zeros((len(sx), 3, 3))
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = sx, sy, 1.0
    return m


def _rotate(theta) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    m = _scale(c, c)
    m[:, 0, 1], m[:, 1, 0] = -s, s
    return m


def _translate(tx, ty) -> np.ndarray:
    m = _scale(np.ones_like(tx), np.ones_like(ty))
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def _matrix(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, 3, 3) pixel-space matrices mapping input (x=column, y=row, 1) to output points, in spec order."""
    a = np.asarray(a, dtype=np.float64)
    a0, a1, a2, a3, a4, a5, a6, a7 = a.T
    ones = np.ones(len(a))
    # Pixel centres are at integer coordinates, so the image centre is size/2 − 0.5.
    cx, cy = (width / 2 - 0.5) * ones, (height / 2 - 0.5) * ones
    mats = [
        _translate(cx, cy),
        _scale(1 - 2 * a0, ones),  # x-flip
        _scale(ones, 1 - 2 * a1),  # y-flip
        _scale(SCALE_BASE**a2, SCALE_BASE**a2),
        _rotate(-a3),
        _rotate(a4),
        _scale(ANISO_BASE**a5, ANISO_BASE**-a5),
        _rotate(-a4),
        _translate(TRANSLATE_FRACTION * width * a6, TRANSLATE_FRACTION * height * a7),
        _translate(-cx, -cy),
    ]
    out = mats[0]
    for m in mats[1:]:
        out = out @ m
    return out


def _conditioning(a: np.ndarray) -> np.ndarray:
    """(B, 9) float32, what the network sees: [a0, a1, a2, cos a3 − 1, sin a3, a5 cos a4, a5 sin a4, a6, a7]."""
    a0, a1, a2, a3, a4, a5, a6, a7 = np.asarray(a, dtype=np.float64).T
    # cos a3 − 1 and a5·(cos a4, sin a4) are 0 when the transform is off, and continuous in the angle.
    return np.stack([a0, a1, a2, np.cos(a3) - 1, np.sin(a3), a5 * np.cos(a4), a5 * np.sin(a4), a6, a7], axis=1).astype(
        np.float32
    )


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class AugmentPlan:
    """A batch's augmentation, decided on the host: small arrays, no images."""

    aug_cond: np.ndarray  # (B, 9) float32
    flip_x: np.ndarray  # (B,) bool: index flips for items that are not warped (False for warped ones)
    flip_y: np.ndarray  # (B,) bool
    warp_index: np.ndarray  # (K,) int64: items that need a real warp (scale/rotation/aniso/translation fired)
    inverse: np.ndarray  # (K, 2, 3) float64: pixel-space output -> input, the top rows of M⁻¹


def plan_augmentation(a: np.ndarray, height: int, width: int) -> AugmentPlan:
    """The plan for draws a (B, 8) on height × width images (vectorised, float64)."""
    a = np.asarray(a, dtype=np.float64)
    warped = (a[:, 2:] != 0).any(axis=1)
    warp_index = np.flatnonzero(warped).astype(np.int64)
    # Items with a2..a7 = 0 have M = a flip about the centre, which maps pixel centres to pixel
    # centres; Catmull-Rom at integer coordinates has weights (0, 1, 0, 0), the identity, so an index
    # flip equals the reference's warp exactly. Only the remaining items are warped.
    inverse = np.linalg.inv(_matrix(a[warp_index], height, width))[:, :2]
    return AugmentPlan(
        aug_cond=_conditioning(a),
        flip_x=(a[:, 0] != 0) & ~warped,
        flip_y=(a[:, 1] != 0) & ~warped,
        warp_index=warp_index,
        inverse=np.ascontiguousarray(inverse),
    )


def _laplacian(source: torch.Tensor, out: torch.Tensor, dim: int) -> None:
    """out = f[m − 1] − 2f[m] + f[m + 1] along dim (−1 or −2) of the mirrored `source` (no edge repeat)."""
    n = source.shape[dim]
    if n == 1:  # a 1-pixel axis mirrors to a constant
        out.zero_()
        return
    torch.add(source.narrow(dim, 0, n - 2), source.narrow(dim, 2, n - 2), out=out.narrow(dim, 1, n - 2))
    # Mirrored, both neighbours of pixel 0 are pixel 1, and both of pixel n − 1 are pixel n − 2.
    torch.mul(source.select(dim, 1), 2, out=out.select(dim, 0))
    torch.mul(source.select(dim, n - 2), 2, out=out.select(dim, n - 1))
    out.sub_(source, alpha=2)


def warp(images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """out[k, :, r, c] = images[k] sampled at (x, y) = inverse[k] · (c, r, 1): scikit-image's order-3 warp.

    images (K, C, H, W), any float dtype and device; inverse (K, 2, 3) on the same device, float64 with
    float64 images and float32 otherwise (not half: coordinates need the precision). Catmull-Rom
    cubic convolution (Keys, a = −0.5) on taps ⌊x⌋ − 1 .. ⌊x⌋ + 2, mirror borders without repeating the
    edge pixel (any distance out), no clipping. Computed in float64 for float64 images, else float32,
    elementwise only (no matmul or convolution that TF32 could round). The result has the images' dtype
    and may be a strided view of a work buffer. One batched bilinear `grid_sample` over 4 planes (16 taps),
    no loop over items.

    Along one axis, with t = x − ⌊x⌋, lin(f) linear interpolation at x and Δf[m] = f[m−1] − 2f[m] + f[m+1]:
        catmull_rom(f)(x) = lin(f)(x) + t(t − 1)/2 · lin(Δf)(x)
    (expand both sides on f[⌊x⌋−1 .. ⌊x⌋+2]: the weights are Keys' cubic's). The 2-D kernel is the product
    of the axes', so with B bilinear interpolation at (x, y) and s = t(t − 1)/2 per axis:
        out = B(I) + sx·B(Δx I) + sy·B(Δy I) + sx·sy·B(Δy Δx I).
    Δ of a mirrored image is mirrored, and grid_sample's reflection with align_corners=True is the same
    mirror about the edge pixels' centres, at any distance, so nothing needs padding.
    """
    k, channels, height, width = images.shape
    device = images.device
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    planes = torch.empty(k, 4, channels, height, width, device=device, dtype=dtype)
    planes[:, 0].copy_(images)
    _laplacian(planes[:, 0], planes[:, 1], -1)
    _laplacian(planes[:, 0:2], planes[:, 2:4], -2)  # Δy I and Δy Δx I at once
    # Pixel coordinates (K, 2, H, W) of every output pixel: (x, y) = inverse · (column, row, 1).
    m = inverse.to(dtype)[:, :, :, None, None]  # (K, 2, 3, 1, 1)
    cols = torch.arange(width, device=device, dtype=dtype)
    rows = torch.arange(height, device=device, dtype=dtype)[:, None]
    coords = (m[:, :, 0] * cols + m[:, :, 2]) + m[:, :, 1] * rows
    # grid_sample's align_corners=True coordinates: pixel p of an n-pixel axis is 2p/(n − 1) − 1.
    grid = torch.empty(k, height, width, 2, device=device, dtype=dtype)
    torch.mul(coords[:, 0], 2 / max(width - 1, 1), out=grid[..., 0])
    torch.mul(coords[:, 1], 2 / max(height - 1, 1), out=grid[..., 1])
    t = torch.floor(coords)
    torch.sub(coords, t, out=t)  # fractional parts
    s = torch.sub(t, 1, out=coords).mul_(t).mul_(0.5)  # t(t − 1)/2, in the coordinates' buffer
    b = nnf.grid_sample(
        planes.view(k, 4 * channels, height, width),
        grid.sub_(1),
        mode="bilinear",
        padding_mode="reflection",
        align_corners=True,
    ).view(k, 4, channels, height, width)
    sx, sy = s[:, 0:1], s[:, 1:2]  # (K, 1, H, W)
    b[:, 2].addcmul_(sx, b[:, 3])
    out = b[:, 0].addcmul_(sx, b[:, 1]).addcmul_(sy, b[:, 2])  # in place: no more image-sized buffers
    return out.to(images.dtype)


def augment_batch(
    images: torch.Tensor, seed: int, positions: np.ndarray, prob: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch (B, C, H, W) of the items at stream `positions` (B,); returns (augmented, aug_cond (B, 9)
    float32), both on images.device.

    The x-flip fires with probability ½ and each other transform with probability `prob`. prob == 0 is
    the reference's switched-off pipeline: images returned as they are, aug_cond zeros. Host work is
    draw_parameters + plan_augmentation; the plan reaches the device in two small copies, then
    unwarped items are flipped by index and the warped subset goes through one `warp`. No host sync.
    """
    batch, _, height, width = images.shape
    device = images.device
    if prob == 0:
        return images, torch.zeros(batch, 9, device=device, dtype=torch.float32)
    positions = np.asarray(positions)
    if positions.shape != (batch,):
        raise ValueError(f"positions has shape {positions.shape}, expected ({batch},)")
    plan = plan_augmentation(draw_parameters(seed, positions, prob), height, width)
    # Copy 1: inverse matrices and conditioning in the coordinate dtype (float32 unless float64 images).
    host_dtype = np.float64 if images.dtype == torch.float64 else np.float32
    floats = to_device(np.concatenate([plan.inverse.ravel(), plan.aug_cond.ravel()]).astype(host_dtype), device)
    n_warp = len(plan.warp_index)
    inverse = floats[: 6 * n_warp].view(n_warp, 2, 3)
    aug_cond = floats[6 * n_warp :].view(batch, 9).to(torch.float32)
    # Copy 2: the item indices of each group; their sizes are known on the host, so slicing needs no sync.
    groups = [
        plan.warp_index,
        np.flatnonzero(plan.flip_x & ~plan.flip_y),
        np.flatnonzero(plan.flip_y & ~plan.flip_x),
        np.flatnonzero(plan.flip_x & plan.flip_y),
    ]
    indices = to_device(np.concatenate(groups).astype(np.int64), device).split([len(g) for g in groups])
    out = images.clone()
    for index, dims in zip(indices[1:], [(-1,), (-2,), (-2, -1)]):
        if len(index):  # a shape, known without a sync
            out.index_copy_(0, index, images.index_select(0, index).flip(dims))
    if n_warp:
        out.index_copy_(0, indices[0], warp(images.index_select(0, indices[0]), inverse))
    return out, aug_cond
