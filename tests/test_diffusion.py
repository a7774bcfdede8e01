"""EDM preconditioning, loss weightings, training σ densities, label dropout and guidance."""

import math

import pytest
import torch
from torch import nn

from tdiff import diffusion as D


class RandomNet(nn.Module):
    """A fixed random stand-in for F: depends on x_in, c_noise and the class label."""

    def __init__(self, channels=2, num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.noise = nn.Parameter(torch.randn(channels))
        self.classes = nn.Embedding(num_classes + 1, channels)
        self.calls = []

    def forward(self, x_in, c_noise, aug_cond=None, class_cond=None, **net_kwargs):
        self.calls.append({"x_in": x_in, "c_noise": c_noise, "class_cond": class_cond, **net_kwargs})
        out = self.conv(x_in) + torch.sin(c_noise)[:, None, None, None] * self.noise[:, None, None]
        if class_cond is not None:
            out = out + self.classes(class_cond)[:, :, None, None]
        return out


class ZeroNet(nn.Module):
    def forward(self, x_in, c_noise, aug_cond=None, class_cond=None):
        return torch.zeros_like(x_in)


def test_scalings_at_sigma_data():
    c_skip, c_out, c_in, c_noise = D.edm_scalings(torch.tensor(0.5), 0.5)
    assert c_skip.item() == pytest.approx(0.5)
    assert c_out.item() == pytest.approx(0.5 / math.sqrt(2))
    assert c_in.item() == pytest.approx(1 / (0.5 * math.sqrt(2)))
    assert c_noise.item() == pytest.approx(math.log(0.5) / 4)


def test_denoiser_feeds_scaled_input_and_c_noise():
    torch.manual_seed(0)
    net = RandomNet()
    denoiser = D.Denoiser(net, sigma_data=0.5)
    x, sigma = torch.randn(3, 2, 4, 4), torch.tensor([0.1, 1.0, 20.0])
    out = denoiser(x, sigma, route=True)
    seen = net.calls[-1]
    c_skip, c_out, c_in, c_noise = D.edm_scalings(sigma, 0.5)
    torch.testing.assert_close(seen["x_in"], c_in.view(-1, 1, 1, 1) * x)
    torch.testing.assert_close(seen["c_noise"], sigma.log() / 4)
    assert seen["route"] is True  # extra keyword arguments reach the network
    F = net(seen["x_in"], seen["c_noise"])
    torch.testing.assert_close(out, c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * F)


def test_denoiser_broadcasts_scalar_sigma():
    torch.manual_seed(0)
    denoiser = D.Denoiser(RandomNet())
    x = torch.randn(3, 2, 4, 4)
    expected = denoiser(x, torch.full((3,), 2.0))
    torch.testing.assert_close(denoiser(x, 2.0), expected)
    torch.testing.assert_close(denoiser(x, torch.tensor(2.0)), expected)


def test_zero_network_gives_c_skip_x():
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(D.Denoiser(ZeroNet())(x, 1.0), x / 5)  # c_skip(1) = 0.25/1.25


def test_loss_hand_computed():
    # σ = 1: c_skip 0.2, c_out 0.5/√1.25; x0 = n = 1 -> x_noisy 2, T = 0.6/c_out, T² = 1.8.
    # σ = 0.5: c_skip 0.5, c_out 0.25/√0.5; x_noisy 1.5, T = 0.25/c_out, T² = 0.5.
    denoiser = D.Denoiser(ZeroNet())
    x0, noise, sigma = torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2), torch.tensor([1.0, 0.5])
    expected = {"karras": [1.8, 0.5], "soft-min-snr": [1.8 * 0.16, 0.5 * 0.25], "snr": [1.8 * 0.2, 0.5 * 0.5]}
    for weighting, values in expected.items():
        torch.testing.assert_close(denoiser.loss(x0, noise, sigma, weighting), torch.tensor(values))
    assert D.LOSS_WEIGHTINGS == tuple(expected)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        denoiser.loss(x0, noise, sigma, "min-snr")


def test_loss_weightings_match_their_d_space_forms():
    torch.manual_seed(0)
    denoiser = D.Denoiser(RandomNet()).double()
    x0, noise = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randn(5, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 200.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4])
    d_error = denoiser(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, class_cond=labels) - x0
    d_error = d_error.pow(2).flatten(1).mean(1)  # mean (D − x0)² per example
    _, c_out, _, _ = D.edm_scalings(sigma, 0.5)
    # soft-min-SNR in F-space is a D-space weight 1/(σ² + σ_d²); karras is EDM's λ = 1/c_out².
    torch.testing.assert_close(
        denoiser.loss(x0, noise, sigma, "soft-min-snr", class_cond=labels), d_error / (sigma**2 + 0.25)
    )
    torch.testing.assert_close(denoiser.loss(x0, noise, sigma, "karras", class_cond=labels), d_error / c_out**2)


def test_stratified_uniform_one_per_stratum():
    u = D.stratified_uniform(16, generator=torch.Generator().manual_seed(0))
    assert torch.equal((u * 16).floor().long(), torch.arange(16))
    # G groups (ranks x micro-steps) together cover each of the B·G strata once.
    groups = 6
    parts = [D.stratified_uniform(8, g, groups, torch.Generator().manual_seed(g)) for g in range(groups)]
    for g, u in enumerate(parts):  # group g holds strata g, g + G, g + 2G, ...: it spans all of [0, 1)
        assert torch.equal((u * 8 * groups).floor().long(), g + groups * torch.arange(8))
    u = torch.cat(parts)
    assert torch.equal((u * 8 * groups).floor().long().sort().values, torch.arange(8 * groups))
    assert ((u >= 0) & (u < 1)).all()


def test_cosine_interpolated_values_at_32():
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    sigma = D.cosine_interpolated_sigma(u, image_d=32)
    torch.testing.assert_close(sigma, torch.tensor([1000.0, 1.2075, 0.50075, 0.2079, 0.001]), rtol=2e-4, atol=0)


def test_cosine_interpolated_resolution_shift():
    u = torch.linspace(0, 1, 9, dtype=torch.float64)
    # A schedule designed for 32 px, moved to 64 px, is the 32 px schedule with σ_d doubled.
    shifted = D.cosine_interpolated_sigma(u, image_d=64, noise_d_low=32, noise_d_high=32)
    torch.testing.assert_close(shifted, D.cosine_interpolated_sigma(u, image_d=32, sigma_data=1.0))
    # The default noise_d_high = image_d interpolates from the shifted to the unshifted log-SNR.
    mixed = D.cosine_interpolated_sigma(u, image_d=64)
    plain = D.cosine_interpolated_sigma(u, image_d=64, noise_d_low=64)
    expected_logsnr = torch.lerp(-2 * (shifted / 0.5).log(), -2 * (plain / 0.5).log(), u)
    torch.testing.assert_close(mixed, 0.5 * (-expected_logsnr / 2).exp())


def test_lognormal_and_loguniform():
    u = torch.tensor([0.5, 0.8413447460685429], dtype=torch.float64)  # Φ(0), Φ(1)
    torch.testing.assert_close(D.lognormal_sigma(u), torch.tensor([math.exp(-1.2), 1.0], dtype=torch.float64))
    assert torch.isfinite(D.lognormal_sigma(torch.tensor([0.0, 1.0]))).all()
    sigma = D.loguniform_sigma(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), 0.01, 100.0)
    torch.testing.assert_close(sigma, torch.tensor([100.0, 1.0, 0.01], dtype=torch.float64))


def test_sample_sigmas_dispatch():
    u = torch.tensor([0.0, 0.3, 1.0])
    config = dict(image_d=32, sigma_data=0.5, sigma_min=0.01, sigma_max=80.0, p_mean=-1.2, p_std=1.2)
    # The cosine density widens the range to [1e-3, 1e3] whatever the sampling range.
    torch.testing.assert_close(
        D.sample_sigmas("cosine-interpolated", u, **config), D.cosine_interpolated_sigma(u, 32, 0.5, 1e-3, 1e3)
    )
    torch.testing.assert_close(D.sample_sigmas("lognormal", u, **config), D.lognormal_sigma(u, -1.2, 1.2))
    torch.testing.assert_close(D.sample_sigmas("loguniform", u, **config), D.loguniform_sigma(u, 0.01, 80.0))
    assert set(D.SIGMA_DENSITIES) == {"cosine-interpolated", "lognormal", "loguniform"}
    with pytest.raises(ValueError, match="unknown sigma density"):
        D.sample_sigmas("uniform", u, **config)


def test_drop_labels():
    labels = torch.arange(10).repeat(100)  # 1000 labels
    assert torch.equal(D.drop_labels(labels, 0.0, 10), labels)
    assert (D.drop_labels(labels, 1.0, 10) == 10).all()
    dropped = D.drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(0))
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    assert 60 < (~kept).sum() < 140  # 100 expected, std 9.5


def test_drop_labels_from_given_draws():
    """The training step hands over its own draws: label i is dropped where uniform[i] < rate."""
    labels = torch.tensor([3, 1, 4, 1, 5])
    uniform = torch.tensor([0.05, 0.5, 0.1, 0.099, 0.99])
    assert D.drop_labels(labels, 0.1, 10, uniform=uniform).tolist() == [10, 1, 4, 10, 5]
    generator = torch.Generator().manual_seed(0)
    draws = torch.rand(labels.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(D.drop_labels(labels, 0.5, 10, generator), D.drop_labels(labels, 0.5, 10, uniform=draws))
    with pytest.raises(ValueError, match="not both"):
        D.drop_labels(labels, 0.1, 10, generator, uniform=uniform)
    with pytest.raises(ValueError, match="shape"):
        D.drop_labels(labels, 0.1, 10, uniform=uniform[:4])


def test_guidance_scales_and_single_call():
    torch.manual_seed(0)
    net = RandomNet()
    denoiser = D.Denoiser(net)
    x, sigma = torch.randn(3, 2, 4, 4), torch.tensor([0.3, 1.0, 5.0])
    labels, null = torch.tensor([0, 2, 3]), 4
    cond = denoiser(x, sigma, class_cond=labels)
    uncond = denoiser(x, sigma, class_cond=torch.full_like(labels, null))
    assert torch.equal(D.guided_denoiser(denoiser, labels, null, 1.0)(x, sigma), cond)
    assert torch.equal(D.guided_denoiser(denoiser, labels, null, 0.0)(x, sigma), uncond)
    assert torch.equal(D.conditioned(denoiser, labels)(x, sigma), cond)
    net.calls.clear()
    guided = D.guided_denoiser(denoiser, labels, null, 3.0)(x, 2.0)  # scalar σ is broadcast too
    assert len(net.calls) == 1 and net.calls[0]["x_in"].shape[0] == 6
    cond, uncond = denoiser(x, 2.0, class_cond=labels), denoiser(x, 2.0, class_cond=torch.full_like(labels, null))
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))
