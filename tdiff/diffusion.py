"""EDM maths: preconditioning, the training loss, training σ densities, label dropout, guidance.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM) as
k-diffusion trains it (reference spec §4). The network F never sees raw pixels or raw σ: it gets
c_in·x and c_noise = ln(σ)/4, and the denoiser is D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise).
Everything here is a pure function of its arguments or a thin module around the network; the
training loop and the samplers only call in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

LOSS_WEIGHTINGS = ("karras", "soft-min-snr", "snr")
SIGMA_DENSITIES = ("cosine-interpolated", "lognormal", "loguniform")


# ------------------------------------------------------------------------------------------------
# Preconditioning (EDM Table 1, "Ours" column)


def edm_scalings(sigma: torch.Tensor, sigma_data: float = 0.5):
    """Return (c_skip, c_out, c_in, c_noise) for noise levels σ (any shape, same shape out)."""
    sigma = torch.as_tensor(sigma)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def _per_example(sigma, x: torch.Tensor) -> torch.Tensor:
    """σ as a (B,) tensor on x's device; a float or 0-d tensor is shared by the whole batch."""
    # Scalings in at least float32, so a bfloat16 x does not round c_skip and c_out.
    dtype = torch.promote_types(x.dtype, torch.float32)
    sigma = torch.as_tensor(sigma, device=x.device, dtype=dtype)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) so it broadcasts against x."""
    return v.view(-1, *([1] * (x.ndim - 1)))


def loss_weight(weighting: str, sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Weight of the F-space squared error at each σ (spec §4.2); unknown names raise ValueError."""
    if weighting == "karras":
        # Unit weight in F-space is EDM's λ(σ) = 1/c_out² in D-space.
        return torch.ones_like(sigma)
    if weighting == "soft-min-snr":
        # Equals a D-space weight 1/(σ² + σ_d²): a smooth min(SNR, 1), see docs/diffusion.md.
        return (sigma * sigma_data) ** 2 / (sigma**2 + sigma_data**2) ** 2
    if weighting == "snr":
        return sigma_data**2 / (sigma**2 + sigma_data**2)
    raise ValueError(f"unknown loss weighting {weighting!r} (known: {', '.join(LOSS_WEIGHTINGS)})")


class Denoiser(nn.Module):
    """D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise, ...) around an inner network F.

    `inner(x_in, c_noise, aug_cond=None, class_cond=None, **net_kwargs)` takes x_in (B, C, H, W),
    c_noise (B,), aug_cond (B, 9) or None, class_cond (B,) long or None and returns x's shape.
    """

    def __init__(self, inner: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.inner = inner
        self.sigma_data = sigma_data

    def forward(self, x, sigma, aug_cond=None, class_cond=None, **net_kwargs) -> torch.Tensor:
        sigma = _per_example(sigma, x)  # (B,)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        F = self.inner(_bcast(c_in, x) * x, c_noise, aug_cond=aug_cond, class_cond=class_cond, **net_kwargs)
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * F

    def loss(
        self, x0, noise, sigma, weighting="soft-min-snr", aug_cond=None, class_cond=None, **net_kwargs
    ) -> torch.Tensor:
        """Per-example loss (B,), unreduced: weight(σ)·mean_{C,H,W}(F − T)², T the ideal F output."""
        sigma = _per_example(sigma, x0)  # (B,)
        weight = loss_weight(weighting, sigma, self.sigma_data)  # first, so a bad name fails fast
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        x_noisy = x0 + _bcast(sigma, x0) * noise
        F = self.inner(_bcast(c_in, x0) * x_noisy, c_noise, aug_cond=aug_cond, class_cond=class_cond, **net_kwargs)
        # T is the F for which D(x_noisy) = x0 exactly; (F − T)² = (D − x0)²/c_out².
        target = (x0 - _bcast(c_skip, x0) * x_noisy) / _bcast(c_out, x0)
        return weight * (F - target).pow(2).flatten(1).mean(1)


# ------------------------------------------------------------------------------------------------
# Training σ densities. Each maps u ∈ [0, 1) to σ monotonically, so the stratified u of
# `stratified_uniform` stratifies σ whatever the density.


def stratified_uniform(batch_size: int, group: int = 0, n_groups: int = 1, generator=None, device=None) -> torch.Tensor:
    """u (B,) with exactly one draw per stratum: u_i = (g + i·G + U_i)/(B·G), U_i ~ U[0, 1).

    G = world_size·accum_steps groups, g = rank·accum_steps + accum_step (spec §4.3): over all G
    micro-batches of one optimiser step the B·G draws cover each of the B·G strata once.
    """
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    draw_device = generator.device if generator is not None else device
    U = torch.rand(batch_size, generator=generator, device=draw_device).to(device)
    i = torch.arange(batch_size, device=U.device)
    return (group + i * n_groups + U) / (batch_size * n_groups)


def _logsnr_cosine(u, logsnr_low: float, logsnr_high: float) -> torch.Tensor:
    """Cosine schedule from logsnr_low (u=0, most noise) to logsnr_high (u=1)."""
    # λ = −2 ln tan θ with θ uniform in u between the angles of the two bounds.
    theta_low = math.atan(math.exp(-logsnr_low / 2))
    theta_high = math.atan(math.exp(-logsnr_high / 2))
    return -2 * torch.tan(theta_low + u * (theta_high - theta_low)).log()


def _logsnr_cosine_shifted(u, image_d: float, noise_d: float, logsnr_low: float, logsnr_high: float):
    """The cosine schedule designed for resolution noise_d, moved to resolution image_d."""
    shift = 2 * math.log(noise_d / image_d)
    return _logsnr_cosine(u, logsnr_low - shift, logsnr_high - shift) + shift


def cosine_interpolated_sigma(
    u,
    image_d: float,
    sigma_data: float = 0.5,
    min_value: float = 1e-3,
    max_value: float = 1e3,
    noise_d_low: float = 32,
    noise_d_high: float | None = None,
) -> torch.Tensor:
    """k-diffusion's "cosine-interpolated" density (spec §4.3); u=0 -> max_value, u=1 -> min_value.

    log-SNR(u) = lerp(shifted_{noise_d_low}(u), shifted_{noise_d_high}(u), u), σ = σ_d·e^{−log-SNR/2}.
    At image_d = noise_d_low = noise_d_high both shifts vanish: σ = σ_d·tan(uniform angle).
    """
    noise_d_high = image_d if noise_d_high is None else noise_d_high
    # log-SNR bounds relative to σ_d: the smallest comes from max_value.
    logsnr_low = -2 * math.log(max_value / sigma_data)
    logsnr_high = -2 * math.log(min_value / sigma_data)
    # float64: near θ = π/2 a float32 tan is off by 1e-4 relative (999.92 for 1000).
    u64 = u.double()
    lo = _logsnr_cosine_shifted(u64, image_d, noise_d_low, logsnr_low, logsnr_high)
    hi = _logsnr_cosine_shifted(u64, image_d, noise_d_high, logsnr_low, logsnr_high)
    logsnr = torch.lerp(lo, hi, u64)
    return (sigma_data * (-logsnr / 2).exp()).to(u.dtype)


def lognormal_sigma(u, p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    """EDM's ln σ ~ N(P_mean, P_std²), through the inverse normal CDF so u maps monotonically."""
    # u = 0 exactly (probability 2^-24 per float32 draw) would give σ = 0 and ln σ = −inf.
    eps = torch.finfo(u.dtype).eps
    return (p_mean + p_std * torch.special.ndtri(u.clamp(eps, 1 - eps))).exp()


def loguniform_sigma(u, min_value: float, max_value: float) -> torch.Tensor:
    """ln σ uniform on [ln min_value, ln max_value]; u=0 -> max_value like the other densities."""
    return (math.log(max_value) + u * (math.log(min_value) - math.log(max_value))).exp()


def sample_sigmas(
    name: str,
    u: torch.Tensor,
    *,
    image_d: int,
    sigma_data: float,
    sigma_min: float,
    sigma_max: float,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> torch.Tensor:
    """σ (B,) from the density `name` (one of SIGMA_DENSITIES) and config values, at u (B,)."""
    if name == "cosine-interpolated":
        # The reference widens the training range to at least [1e-3, 1e3].
        return cosine_interpolated_sigma(u, image_d, sigma_data, min(sigma_min, 1e-3), max(sigma_max, 1e3))
    if name == "lognormal":
        return lognormal_sigma(u, p_mean, p_std)
    if name == "loguniform":
        return loguniform_sigma(u, sigma_min, sigma_max)
    raise ValueError(f"unknown sigma density {name!r} (known: {', '.join(SIGMA_DENSITIES)})")


# ------------------------------------------------------------------------------------------------
# Class conditioning: label dropout in training, classifier-free guidance in sampling


def drop_labels(
    labels: torch.Tensor, rate: float, null_class: int, generator=None, *, uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """Replace each label by null_class with probability `rate`, independently (spec §4.5).

    Label i is dropped where uniform[i] < rate, for draws uniform on [0, 1) shaped like `labels`: drawn
    here from `generator` (the global RNG if None), or given as `uniform` (the training step draws them
    for the whole global batch with its other draws, and hands each micro-batch its share).
    """
    if uniform is None:
        draw_device = generator.device if generator is not None else labels.device
        uniform = torch.rand(labels.shape, generator=generator, device=draw_device)
    elif generator is not None:
        raise ValueError("drop_labels: give a generator or the uniform draws, not both")
    elif uniform.shape != labels.shape:
        raise ValueError(
            f"drop_labels: uniform draws of shape {tuple(uniform.shape)} for labels of shape {tuple(labels.shape)}"
        )
    return labels.masked_fill(uniform.to(labels.device) < rate, null_class)


def conditioned(denoiser: Callable, class_cond: torch.Tensor) -> Callable:
    """(x, σ) -> D(x; σ, class_cond): the sampler's view of a class-conditional denoiser."""

    def denoise(x, sigma, **net_kwargs):
        return denoiser(x, sigma, class_cond=class_cond, **net_kwargs)

    return denoise


def guided_denoiser(denoiser: Callable, class_cond: torch.Tensor, null_class: int, scale: float) -> Callable:
    """Classifier-free guidance: (x, σ) -> D_u + s·(D_c − D_u), one network call per evaluation.

    Scale 1 is the conditional and scale 0 the unconditional denoiser, evaluated on the plain batch
    (half the work, and bit-equal to them); otherwise one call on the (2B, ...) batch [uncond, cond].
    """
    null = torch.full_like(class_cond, null_class)
    if scale == 1:
        return conditioned(denoiser, class_cond)
    if scale == 0:
        return conditioned(denoiser, null)
    labels = torch.cat([null, class_cond])  # (2B,)

    def denoise(x, sigma, **net_kwargs):
        sigma = _per_example(sigma, x)  # (B,), so it can be concatenated
        D = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), class_cond=labels, **net_kwargs)
        D_u, D_c = D.chunk(2)  # each (B, C, H, W)
        return D_u + scale * (D_c - D_u)

    return denoise
