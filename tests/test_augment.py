"""Karras augmentation: gating, the conditioning vector, and the warp geometry."""

import math

import torch

from tdiff import augment as A


def pattern(channels=3, height=32, width=32):
    return torch.randn(channels, height, width, generator=torch.Generator().manual_seed(0))


def draws(**values):
    """The 8 draws a0..a7, all zero unless given."""
    a = torch.zeros(8, dtype=torch.float64)
    for name, value in values.items():
        a[int(name[1:])] = value
    return a


def test_prob_zero_only_flips():
    image = pattern()
    flips = 0
    for seed in range(20):
        out, cond = A.karras_augment(image, 0.0, torch.Generator().manual_seed(seed))
        assert cond.shape == (9,) and cond.dtype == torch.float32
        assert (cond[1:] == 0).all() and cond[0] in (0, 1)
        # Bit-exact: a flip alone is an index flip, never a warp.
        assert torch.equal(out, torch.flip(image, [-1]) if cond[0] else image)
        flips += int(cond[0])
    assert 0 < flips < 20


def test_disabled_pipeline_is_identity():
    image = pattern()
    out, cond = A.karras_augment(image, 0.5, torch.Generator().manual_seed(0), enabled=False)
    assert out is image and torch.equal(cond, torch.zeros(9))


def test_conditioning_vector():
    a = draws(a0=1, a1=1, a2=0.3, a3=0.5, a4=-1.0, a5=2.0, a6=0.1, a7=-0.2)
    expected = [1, 1, 0.3, math.cos(0.5) - 1, math.sin(0.5), 2 * math.cos(-1.0), 2 * math.sin(-1.0), 0.1, -0.2]
    torch.testing.assert_close(A._conditioning(a), torch.tensor(expected, dtype=torch.float32))


def test_integer_translation_moves_the_pattern():
    image = pattern()
    # a6 = 1 shifts right by W/8 = 4 px, a7 = −0.5 shifts up by H/16 = 2 px.
    out = A._warp(image, A._matrix(draws(a6=1.0, a7=-0.5), 32, 32))
    torch.testing.assert_close(out[:, :30, 4:], image[:, 2:, :28], atol=1e-5, rtol=0)


def test_flip_and_quarter_turn_through_the_warp():
    image = pattern(height=16, width=16)
    flipped = A._warp(image, A._matrix(draws(a0=1), 16, 16))
    torch.testing.assert_close(flipped, torch.flip(image, [-1]), atol=1e-5, rtol=0)
    # rotate(−a3) with a3 = π/2 about the centre (7.5, 7.5) is a quarter turn of the pixel grid.
    turned = A._warp(image, A._matrix(draws(a3=math.pi / 2), 16, 16))
    torch.testing.assert_close(turned, torch.rot90(image, 1, [-2, -1]), atol=1e-5, rtol=0)


def test_full_pipeline_is_reproducible_and_warps():
    image = pattern()
    out, cond = A.karras_augment(image, 1.0, torch.Generator().manual_seed(3))
    again, cond_again = A.karras_augment(image, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and torch.equal(cond, cond_again)
    assert out.shape == image.shape and torch.isfinite(out).all()
    assert (cond[2:] != 0).all()  # with prob 1 every gated transform fired
