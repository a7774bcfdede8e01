"""Karras augmentation: counter-based draws, the host plan, and the batched warp against scikit-image."""

import math

import numpy as np
import pytest
import torch

from tdiff import augment as A


def pattern(batch=4, channels=3, height=32, width=32, seed=0, dtype=torch.float32):
    """Images uniform in [−1, 1], the training range."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, channels, height, width, generator=generator, dtype=torch.float64) * 2 - 1).to(dtype)


def draws(**values) -> np.ndarray:
    """One row (1, 8) of draws a0..a7, all zero unless given."""
    a = np.zeros((1, 8))
    for name, value in values.items():
        a[0, int(name[1:])] = value
    return a


def warp_draws(images: torch.Tensor, a: np.ndarray) -> torch.Tensor:
    """Warp every image by the matrix of its draws (flips included), through `warp`; the inverse in
    float64 for float64 images, else float32, as augment_batch sends it."""
    inverse = torch.from_numpy(np.linalg.inv(A._matrix(a, *images.shape[-2:]))[:, :2])
    return A.warp(images, inverse if images.dtype == torch.float64 else inverse.float())


def skimage_warp(images: torch.Tensor, a: np.ndarray) -> np.ndarray:
    """What the reference computes: skimage.transform.warp(image, tf.inverse, order=3, mode='reflect',
    clip=False, preserve_range=True) on each HWC image, tf the affine transform of the draws."""
    transform = pytest.importorskip("skimage.transform")
    inverse = np.linalg.inv(A._matrix(a, *images.shape[-2:]))
    return np.stack(
        [
            transform.warp(
                image.numpy().transpose(1, 2, 0), m, order=3, mode="reflect", cval=0.5, clip=False, preserve_range=True
            ).transpose(2, 0, 1)
            for image, m in zip(images, inverse)
        ]
    )


def extreme_draws() -> np.ndarray:
    """Random prob-1 draws plus cases that sample far outside the image (many mirror periods away)."""
    a = A.draw_parameters(11, np.arange(12), 1.0)
    a[0:3, 6:8] = [[6.0, -5.0], [-7.5, 4.0], [9.0, 9.0]]  # shifts of 24–36 px on a 20–24 px image
    a[3:6, 2] = [-10.0, -12.0, -9.0]  # zoom out 4–5.3×: the corners sample ±60 px away
    a[6, 2:] = [8.0, 0.3, 1.0, 4.0, 0.0, 0.0]  # zoom in 3×, strong anisotropy
    return a


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_warp_matches_scikit_image(dtype):
    height, width = 24, 20  # not square, so rows and columns cannot be swapped unnoticed
    a = extreme_draws()
    images = pattern(len(a), height=height, width=width, seed=1, dtype=dtype)
    # The extreme rows really sample more than a period (2(n − 1)) outside the image.
    inverse = np.linalg.inv(A._matrix(a, height, width))
    corners = inverse[:, :2, :2] @ np.array([[0, width - 1, 0, width - 1], [0, 0, height - 1, height - 1]])
    assert np.abs(corners + inverse[:, :2, 2:]).max() > 2 * 2 * (width - 1)
    expected = skimage_warp(images, a)
    out = warp_draws(images, a)
    assert out.dtype == dtype and out.shape == images.shape
    # Measured: about 4e-14 in float64 and 2e-5 in float32 (float32 coordinates, as skimage's).
    assert np.abs(out.numpy() - expected).max() <= 1e-4


def test_augment_batch_matches_scikit_image():
    images = pattern(24, height=16, width=20, seed=2)
    positions = np.arange(100, 124)
    out, aug_cond = A.augment_batch(images, 7, positions, 0.25)
    a = A.draw_parameters(7, positions, 0.25)
    plan = A.plan_augmentation(a, 16, 20)
    assert 0 < len(plan.warp_index) < 24 and plan.flip_x.any()  # both paths are exercised
    expected = skimage_warp(images, a)
    assert np.abs(out.numpy() - expected).max() <= 1e-4
    # Items that only flip are bit-exact: the reference's warp samples them at integer coordinates.
    unwarped = np.setdiff1d(np.arange(24), plan.warp_index)
    assert np.array_equal(out.numpy()[unwarped], expected[unwarped].astype(np.float32))
    assert aug_cond.dtype == torch.float32 and torch.equal(aug_cond, torch.from_numpy(A._conditioning(a)))


def test_draws_are_a_pure_function_of_seed_and_position():
    stream = A.draw_parameters(3, np.arange(1, 13), 0.5)
    assert stream.shape == (12, 8) and stream.dtype == np.float64
    np.testing.assert_array_equal(A.draw_parameters(3, np.array([5, 9]), 0.5), stream[[4, 8]])
    assert not np.array_equal(A.draw_parameters(4, np.arange(1, 13), 0.5), stream)
    # prob only decides which transforms fire: a fired draw has the same value at any prob.
    everything = A.draw_parameters(3, np.arange(1, 13), 1.0)
    fired = stream != 0
    np.testing.assert_array_equal(stream[fired], everything[fired])


def within(frequency, p, n, sigmas=5):
    return abs(frequency - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_draw_statistics():
    n, prob = 20_000, 0.3
    a = A.draw_parameters(0, np.arange(n), prob)
    assert within((a[:, 0] != 0).mean(), 0.5, n)  # the x-flip is not gated
    assert within((a[:, 1] != 0).mean(), prob / 2, n)  # gated flip bit
    for gated in (a[:, 2], a[:, 3], a[:, 4], a[:, 6]):  # scale, rotation, anisotropy, translation gates
        assert within((gated != 0).mean(), prob, n)
    np.testing.assert_array_equal(a[:, 4] != 0, a[:, 5] != 0)  # a4, a5 share a gate
    np.testing.assert_array_equal(a[:, 6] != 0, a[:, 7] != 0)  # a6, a7 share a gate
    for p in (0.0, 1.0):
        assert within((A.draw_parameters(0, np.arange(n), p)[:, 0] != 0).mean(), 0.5, n)
    full = A.draw_parameters(1, np.arange(n), 1.0)
    for normal in full[:, [2, 5, 6, 7]].T:
        assert abs(normal.mean()) < 5 / math.sqrt(n) and abs(normal.std() - 1) < 5 / math.sqrt(2 * n)
    for angle in full[:, [3, 4]].T:
        assert (angle >= -math.pi).all() and (angle < math.pi).all()
        counts = np.histogram(angle, bins=10, range=(-math.pi, math.pi))[0]
        assert all(within(c / n, 0.1, n) for c in counts)
    assert abs(np.corrcoef(full[:, 2], full[:, 6])[0, 1]) < 5 / math.sqrt(n)  # a Box–Muller pair: cos and sin


def test_conditioning_vector():
    a = draws(a0=1, a1=1, a2=0.3, a3=0.5, a4=-1.0, a5=2.0, a6=0.1, a7=-0.2)
    expected = [1, 1, 0.3, math.cos(0.5) - 1, math.sin(0.5), 2 * math.cos(-1.0), 2 * math.sin(-1.0), 0.1, -0.2]
    out = A._conditioning(a)
    assert out.dtype == np.float32 and out.shape == (1, 9)
    np.testing.assert_allclose(out[0], expected, rtol=1e-6, atol=1e-7)


def test_plan():
    a = np.concatenate([draws(), draws(a0=1), draws(a1=1), draws(a0=1, a1=1), draws(a0=1, a6=0.5)])
    plan = A.plan_augmentation(a, 16, 16)
    np.testing.assert_array_equal(plan.flip_x, [False, True, False, True, False])  # warped items: no index flip
    np.testing.assert_array_equal(plan.flip_y, [False, False, True, True, False])
    np.testing.assert_array_equal(plan.warp_index, [4])
    assert plan.warp_index.dtype == np.int64 and plan.inverse.shape == (1, 2, 3)
    # Spec order: shift right by W/8 · 0.5 = 1 px, then flip about 7.5, so output column c samples 14 − c.
    np.testing.assert_allclose(plan.inverse[0], [[-1, 0, 14], [0, 1, 0]], atol=1e-12)


def test_integer_translation_moves_the_pattern():
    # a6 = 1 shifts right by W/8 = 4 px, a7 = −0.5 shifts up by H/16 = 2 px.
    a = draws(a6=1.0, a7=-0.5)
    image = pattern(1, dtype=torch.float64)
    out = warp_draws(image, a)
    torch.testing.assert_close(out[..., :30, 4:], image[..., 2:, :28], atol=1e-12, rtol=0)
    out32 = warp_draws(image.float(), a)
    torch.testing.assert_close(out32[..., :30, 4:], image.float()[..., 2:, :28], atol=1e-5, rtol=0)


def test_flip_and_quarter_turn_through_the_warp():
    image = pattern(1, height=16, width=16, dtype=torch.float64)
    torch.testing.assert_close(warp_draws(image, draws(a0=1)), torch.flip(image, [-1]), atol=1e-12, rtol=0)
    torch.testing.assert_close(warp_draws(image, draws(a1=1)), torch.flip(image, [-2]), atol=1e-12, rtol=0)
    # rotate(−a3) with a3 = π/2 about the centre (7.5, 7.5) is a quarter turn of the pixel grid.
    turned = warp_draws(image, draws(a3=math.pi / 2))
    torch.testing.assert_close(turned, torch.rot90(image, 1, [-2, -1]), atol=1e-12, rtol=0)
    turned32 = warp_draws(image.float(), draws(a3=math.pi / 2))
    torch.testing.assert_close(turned32, torch.rot90(image.float(), 1, [-2, -1]), atol=1e-5, rtol=0)


def test_warp_keeps_low_precision_dtypes():
    images = pattern(2)
    a = A.draw_parameters(0, np.arange(2), 1.0)
    out = warp_draws(images.to(torch.bfloat16), a)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), warp_draws(images, a), atol=0.05, rtol=0)


def test_prob_zero_only_flips():
    a = A.draw_parameters(0, np.arange(200), 0.0)
    plan = A.plan_augmentation(a, 32, 32)
    assert len(plan.warp_index) == 0 and plan.inverse.shape == (0, 2, 3)
    assert (plan.aug_cond[:, 1:] == 0).all() and set(np.unique(plan.aug_cond[:, 0])) == {0.0, 1.0}
    np.testing.assert_array_equal(plan.flip_x, plan.aug_cond[:, 0] == 1)
    assert not plan.flip_y.any() and 0 < plan.flip_x.sum() < 200


def test_flips_alone_are_index_flips():
    images = pattern(64)
    positions = np.arange(64)
    # With a tiny prob no gate fires (at these positions): only flips, bit-exact.
    out, aug_cond = A.augment_batch(images, 1, positions, 1e-9)
    assert (aug_cond[:, 1:] == 0).all()
    flipped = aug_cond[:, 0] == 1
    assert 0 < flipped.sum() < 64
    assert torch.equal(out[flipped], torch.flip(images[flipped], [-1])) and torch.equal(out[~flipped], images[~flipped])


def test_disabled_pipeline_is_identity():
    images = pattern()
    out, aug_cond = A.augment_batch(images, 0, np.arange(4), 0.0)
    assert out is images and aug_cond.dtype == torch.float32 and torch.equal(aug_cond, torch.zeros(4, 9))


def test_augment_batch_is_reproducible_and_batch_invariant():
    images = pattern(33, seed=4)
    positions = np.arange(1000, 1033)
    out, aug_cond = A.augment_batch(images, 3, positions, 0.5)
    again, aug_cond_again = A.augment_batch(images, 3, positions, 0.5)
    assert torch.equal(out, again) and torch.equal(aug_cond, aug_cond_again)
    assert out.shape == images.shape and torch.isfinite(out).all() and not torch.equal(out, images)
    # An item's augmentation does not depend on the batch it is in: halves give the same bits.
    first, cond_first = A.augment_batch(images[:16], 3, positions[:16], 0.5)
    second, cond_second = A.augment_batch(images[16:], 3, positions[16:], 0.5)
    assert torch.equal(torch.cat([first, second]), out) and torch.equal(torch.cat([cond_first, cond_second]), aug_cond)
    with pytest.raises(ValueError, match="positions"):
        A.augment_batch(images, 3, positions[:5], 0.5)
