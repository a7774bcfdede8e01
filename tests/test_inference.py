"""Sampling at the speed of the hardware: device-side per-image noise, autocast precision, compiled
blocks and the default batch. Each keeps the property that image k depends on (weights, seed, k) only,
never on its batch. A tiny random model (every weight non-zero) on the CPU; about 40 s on two cores,
most of it torch.compile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tdiff import hardware
from tdiff import sample as sampling
from tdiff.acceleration import BlockCache, CachePlan
from tdiff.config import load_preset, with_values
from tdiff.diffusion import Denoiser
from tdiff.errors import UserError
from tdiff.model import build_model
from tdiff.samplers import SAMPLERS, ImageNoise
from tdiff.seeds import image_keys, image_normals

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    """(config, denoiser): the tiny preset at 16x16 with every weight drawn at random (no zero init)."""
    config = with_values(load_preset("tiny"), model__image_size=16, sample__steps=4)
    net = build_model(config.model, config.sharing)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return config, Denoiser(net, config.diffusion.sigma_data).eval().requires_grad_(False)


def images(denoiser, config, seeds, *, sampler="dpmpp_2m_sde", **net_kwargs) -> torch.Tensor:
    """Images of `seeds` (labels 0, 1, ...) by `sampler`, 4 steps: a stochastic one by default."""
    plan = sampling.SamplingPlan.from_config(with_values(config, sample__sampler=sampler, sample__eta=1.0))
    m = config.model
    labels = torch.tensor(seeds) % m.num_classes
    return sampling.sample_batch(
        denoiser, plan, list(seeds), labels, (m.channels, m.image_size, m.image_size), m.num_classes, CPU, **net_kwargs
    )


# --------------------------------------------------------------------------------------------
# Device-side noise


def test_image_normals_are_standard_normal_and_independent():
    z = image_normals(image_keys(range(400)), 0, 1000)  # (400, 1000)
    assert z.dtype == torch.float64
    flat = z.flatten()
    assert abs(flat.mean().item()) < 0.01 and abs(flat.std().item() - 1) < 0.01
    kurtosis = (flat**4).mean().item() / flat.var().item() ** 2
    assert abs(kurtosis - 3) < 0.05
    # P(z < t) at a few points against the normal CDF, within a few standard errors (n = 400,000).
    for t in (-2.0, -0.5, 0.0, 1.0, 2.5):
        assert abs((flat < t).double().mean().item() - 0.5 * math.erfc(-t / math.sqrt(2))) < 0.003
    # No correlation between images, between draws, or between the cos and sin halves of Box–Muller.
    later = image_normals(image_keys(range(400)), 1, 1000)
    for a, b in ((z[:-1], z[1:]), (z, later), (z[:, :500], z[:, 500:])):
        assert abs(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]) < 0.01


def test_image_normals_are_a_function_of_seed_draw_and_element():
    keys = image_keys([5, 6, 7, 8])
    whole = image_normals(keys, 3, 12)
    torch.testing.assert_close(image_normals(keys[2:3], 3, 12), whole[2:3], rtol=0, atol=0)
    assert not torch.equal(image_normals(keys, 4, 12), whole)  # another draw
    assert not torch.equal(whole[0], whole[1])  # another image
    # Pinned: the generator is part of what an image is; changing it must be deliberate (a new
    # samples format in tdiff.sample.SAMPLES_FORMAT).
    expected = [0.7559821938, -0.1208547859, 1.7424372144]
    assert image_normals(image_keys([0]), 0, 3)[0].tolist() == pytest.approx(expected, abs=1e-9)


def test_image_noise_draws_in_order_on_the_requested_device():
    noise = ImageNoise([1, 2], CPU)
    first, second = noise.randn((2, 3, 4, 4)), noise.randn((2, 3, 4, 4))
    assert first.shape == (2, 3, 4, 4) and first.dtype == torch.float32
    keys = image_keys([1, 2])
    torch.testing.assert_close(first, image_normals(keys, 0, 48).float().reshape(2, 3, 4, 4), rtol=0, atol=0)
    torch.testing.assert_close(second, image_normals(keys, 1, 48).float().reshape(2, 3, 4, 4), rtol=0, atol=0)


# The noise is exactly batch-invariant; the arithmetic is up to the BLAS: a matrix product of 4 rows may
# round differently from one of 2 (a few 1e-7 here), far below one uint8 level (1/127.5).
ROUND_OFF = 1e-5


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_is_batch_invariant(tiny, sampler):
    config, denoiser = tiny
    whole = images(denoiser, config, [10, 11, 12, 13], sampler=sampler)
    part = images(denoiser, config, [12, 13], sampler=sampler)
    torch.testing.assert_close(whole[2:], part, rtol=0, atol=ROUND_OFF)
    assert not torch.allclose(whole[0], whole[1], atol=0.1)


# --------------------------------------------------------------------------------------------
# Precision


def test_the_default_precision_follows_the_device(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert sampling.resolve_precision(None, CPU) == ("no", None)
    precision, warning = sampling.resolve_precision("bf16", CPU)
    assert precision == "bf16" and "no native bf16" in warning
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert sampling.resolve_precision(None, CPU) == ("bf16", None)
    assert sampling.resolve_precision("no", CPU) == ("no", None)
    with pytest.raises(UserError):
        sampling.resolve_precision("fp8", CPU)


def test_autocast_runs_the_network_only(tiny):
    config, denoiser = tiny
    assert sampling.inference_denoiser(denoiser, "no") is denoiser
    fast = sampling.inference_denoiser(denoiser, "bf16")
    assert fast.inner.net is denoiser.inner  # the same weights, not a copy
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.5, 2.0, 20.0])
    labels = torch.tensor([0, 1, 2])
    exact, rounded = denoiser(x, sigma, class_cond=labels), fast(x, sigma, class_cond=labels)
    assert rounded.dtype == torch.float32  # the preconditioning and the sampler stay in float32
    assert not torch.equal(exact, rounded)
    # bf16 keeps 8 bits of mantissa: the network output is a few parts in a thousand off.
    assert (rounded - exact).abs().max().item() < 0.05 * exact.abs().max().item()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_sampling_is_batch_invariant_and_close(tiny, precision):
    config, denoiser = tiny
    fast = sampling.inference_denoiser(denoiser, precision)
    whole = images(fast, config, [20, 21, 22], sampler="dpmpp_2m")
    torch.testing.assert_close(images(fast, config, [22], sampler="dpmpp_2m"), whole[2:], rtol=0, atol=ROUND_OFF)
    exact = images(denoiser, config, [20, 21, 22], sampler="dpmpp_2m")
    mse = (whole - exact).pow(2).mean().item()
    assert 10 * math.log10(4 / mse) > 30  # PSNR over the [-1, 1] range


# --------------------------------------------------------------------------------------------
# Compiled blocks


def test_compiled_sampling_with_the_cache_is_batch_invariant_and_equal(tiny):
    config, denoiser = tiny
    net = build_model(config.model, config.sharing)
    net.load_state_dict(denoiser.inner.state_dict())
    compiled = Denoiser(net, config.diffusion.sigma_data).eval().requires_grad_(False)
    assert sampling.compile_for_sampling(compiled) == config.sharing.depth
    for kwargs in ({}, {"block_cache": BlockCache(CachePlan(span=2, boundary=2, interval=2))}):
        whole = images(compiled, config, [30, 31, 32], **kwargs)
        torch.testing.assert_close(images(compiled, config, [32], **kwargs), whole[2:], rtol=0, atol=ROUND_OFF)
        torch.testing.assert_close(whole, images(denoiser, config, [30, 31, 32], **kwargs), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Batch size


def test_the_batch_that_fits():
    assert sampling.fitting_batch(1e12, 1e6, 100) == 100  # never more than n
    assert sampling.fitting_batch(1e12, 1e6, 10**6) == sampling.MAX_BATCH
    assert sampling.fitting_batch(100e6, 1e6, 10**6) == 64  # 80 fit: a multiple of 64
    assert sampling.fitting_batch(20e6, 1e6, 10**6) == 16  # 16 fit: a power of two below 64
    assert sampling.fitting_batch(5e6, 1e6, 10**6) == 4
    assert sampling.fitting_batch(0, 1e6, 10**6) == 1  # one image is always tried


def test_the_cpu_default_batch_and_the_prepared_inference(tiny, monkeypatch):
    config, denoiser = tiny
    plan = sampling.SamplingPlan.from_config(config)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    inference = sampling.prepare_inference(denoiser, config, plan, CPU, 1000)
    assert (inference.precision, inference.compiled, inference.batch_size) == ("no", False, sampling.CPU_BATCH)
    assert inference.denoiser is denoiser and inference.warning is None
    inference = sampling.prepare_inference(denoiser, config, plan, CPU, 10, precision="bf16", batch_size=3)
    assert inference.batch_size == 3 and "no native bf16" in inference.warning
    assert isinstance(inference.denoiser.inner, sampling.AutocastNetwork)
