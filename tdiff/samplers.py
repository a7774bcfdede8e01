"""Noise schedules and samplers for an EDM denoiser (reference spec §5).

A sampler is one function `name(denoise, x, sigmas, *, generator=None, callback=None, **options)`
that returns the final x. `denoise(x, sigma)` is D(x; σ) with σ a (B,) tensor; `sigmas` holds the
n noise levels followed by a trailing 0 (from `karras_sigmas`); x starts
as x_T = σ_0·N(0, I) (`randn(...) * sigmas[0]`). Step coefficients are computed in Python floats
(double precision) from σ, so the state x keeps whatever dtype the caller chose.

Notation: d = (x − D)/σ is the probability-flow ODE derivative dx/dσ, t = −ln σ, h = t_{i+1} − t_i.
"""

from __future__ import annotations

import math

import torch

from tdiff.sampler_registry import SAMPLER_NAMES
from tdiff.seeds import image_keys, image_normals

# ------------------------------------------------------------------------------------------------
# Schedules: n decreasing noise levels, then 0


def karras_sigmas(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device=None, dtype=torch.float32
) -> torch.Tensor:
    """EDM eq. 5: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, then 0; shape (n + 1,)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Randomness: None (global RNG), a torch.Generator, or ImageNoise (counter-based, per image)


class ImageNoise:
    """Noise per image from its seed, generated on the device: image k's draws depend on seeds[k] only.

    Draw d (0: the starting noise; then each stochastic step's fresh noise, in order) of image k is
    `tdiff.seeds.image_normals` of (seeds[k], d): a counter-based generator evaluated with integer
    arithmetic where the images are, so there is no host-side draw or copy per image or step, an image
    is the same whatever batch it is sampled in, and the same on every device of one kind.
    """

    def __init__(self, seeds, device=None):
        self.keys = image_keys(list(seeds), device)  # (B,) int64
        self.draws = 0

    def randn(self, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        """(B, *shape[1:]) normals, row k from image k's next draw; B must equal the number of seeds."""
        if shape[0] != len(self.keys):
            raise ValueError(f"batch of {shape[0]} images but {len(self.keys)} seeds")
        keys = self.keys if device is None else self.keys.to(device)
        normals = image_normals(keys, self.draws, math.prod(shape[1:]))  # (B, n) float64
        self.draws += 1
        return normals.to(dtype).reshape(shape)


def randn(shape, generator=None, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` from `generator` (None, a torch.Generator or ImageNoise)."""
    if isinstance(generator, ImageNoise):
        return generator.randn(shape, device=device, dtype=dtype)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    # Draw where the generator lives, then move: a CPU generator gives the same noise on any device.
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def randn_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like x, on x's device and dtype; every sampler draws through this."""
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


# ------------------------------------------------------------------------------------------------
# Shared steps


def _denoise(denoise, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """D(x; σ) with σ broadcast to the (B,) vector the denoiser expects."""
    # At least float32: a bfloat16 σ would be rounded by up to 0.4 %.
    dtype = torch.promote_types(x.dtype, torch.float32)
    return denoise(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=dtype))


def _churn(x, sigma: float, n_steps: int, generator, S_churn, S_tmin, S_tmax, S_noise):
    """EDM Alg. 2 lines 4-6: raise σ to σ̂ = σ(1 + γ) by adding fresh noise; returns (x̂, σ̂)."""
    gamma = min(S_churn / n_steps, math.sqrt(2) - 1) if S_tmin <= sigma <= S_tmax else 0.0
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + randn_like(x, generator) * S_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


def _ancestral_step(sigma: float, sigma_next: float, eta: float):
    """Split σ → σ_next into a deterministic step to σ_down plus fresh noise of std σ_up."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ, ℓ_j the Lagrange basis polynomial on σ_i, ..., σ_{i−order+1}."""

    def basis(tau):
        return math.prod((tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]) for k in range(order) if k != j)

    # ℓ_j has degree order − 1 ≤ 3 and 3-point Gauss–Legendre is exact up to degree 5.
    a, b = sigmas[i], sigmas[i + 1]
    mid, half = (a + b) / 2, (b - a) / 2
    nodes = ((-math.sqrt(3 / 5), 5 / 9), (0.0, 8 / 9), (math.sqrt(3 / 5), 5 / 9))
    return half * sum(w * basis(mid + half * z) for z, w in nodes)


# ------------------------------------------------------------------------------------------------
# Samplers


@torch.no_grad()
def euler(
    denoise, x, sigmas, *, generator=None, callback=None, S_churn=0.0, S_tmin=0.0, S_tmax=float("inf"), S_noise=1.0
):
    """Euler (1st order, n NFE); with S_churn > 0 EDM's stochastic churn (Alg. 2 without Heun)."""
    sigmas = sigmas.tolist()
    n = len(sigmas) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sigmas[i], n, generator, S_churn, S_tmin, S_tmax, S_noise)
        denoised = _denoise(denoise, x, sigma_hat)
        d = (x - denoised) / sigma_hat
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def euler_ancestral(denoise, x, sigmas, *, generator=None, callback=None, eta=1.0, S_noise=1.0):
    """Euler ancestral (1st order, n NFE, stochastic): Euler to σ_down, then noise of std σ_up."""
    sigmas = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoise, x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * S_noise * sigma_up
    return x


@torch.no_grad()
def heun(
    denoise, x, sigmas, *, generator=None, callback=None, S_churn=0.0, S_tmin=0.0, S_tmax=float("inf"), S_noise=1.0
):
    """Heun (2nd order, 2n − 1 NFE): EDM Alg. 2; deterministic unless S_churn > 0."""
    sigmas = sigmas.tolist()
    n = len(sigmas) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sigmas[i], n, generator, S_churn, S_tmin, S_tmax, S_noise)
        denoised = _denoise(denoise, x, sigma_hat)
        d = (x - denoised) / sigma_hat
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            # d is undefined at σ = 0, so the last step is plain Euler (it returns D).
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - _denoise(denoise, x_euler, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_next) / 2 * dt
    return x


def edm(denoise, x, sigmas, *, generator=None, callback=None, S_churn=40.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003):
    """EDM stochastic sampler (2nd order, 2n − 1 NFE): Heun with churn, EDM Table 5 ImageNet-64 values."""
    return heun(
        denoise,
        x,
        sigmas,
        generator=generator,
        callback=callback,
        S_churn=S_churn,
        S_tmin=S_tmin,
        S_tmax=S_tmax,
        S_noise=S_noise,
    )


@torch.no_grad()
def lms(denoise, x, sigmas, *, generator=None, callback=None, order=4):
    """Linear multistep in σ (order 4, n NFE): Adams–Bashforth on the last `order` derivatives."""
    sigmas = sigmas.tolist()
    ds = []  # derivatives d_i, d_{i−1}, ..., most recent first
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoise, x, sigmas[i])
        ds = [(x - denoised) / sigmas[i], *ds][:order]
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        # The order ramps up 1, 2, 3, 4 while the history fills.
        coeffs = [_lms_coefficient(sigmas, i, j, len(ds)) for j in range(len(ds))]
        x = x + sum(c * d for c, d in zip(coeffs, ds))
    return x


@torch.no_grad()
def dpmpp_2m(denoise, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(2M) (2nd order multistep, n NFE, deterministic); the last step returns D."""
    sigmas = sigmas.tolist()
    denoised_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoise, x, sigma)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised  # the exponential integrator's limit σ_next → 0
            continue
        h = math.log(sigma / sigma_next)
        D = denoised
        if denoised_prev is not None:
            # Linear extrapolation of D in t, ratio r = h_{i−1}/h_i of step sizes.
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * denoised_prev
        x = (sigma_next / sigma) * x - math.expm1(-h) * D
        denoised_prev, h_prev = denoised, h
    return x


@torch.no_grad()
def dpmpp_2m_sde(denoise, x, sigmas, *, generator=None, callback=None, eta=1.0, S_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (2nd order, n NFE); stochastic for eta > 0, eta = 0 is an ODE solver.

    solver_type "midpoint" or "heun" picks the second-order correction. The noise is a fresh
    N(0, I) per step; k-diffusion draws the same per-step distribution from a Brownian tree.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', not {solver_type!r}")
    sigmas = sigmas.tolist()
    denoised_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoise, x, sigma)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        phi = -math.expm1(-h * (1 + eta))  # 1 − e^{−h(1+η)}
        x = (sigma_next / sigma) * math.exp(-eta * h) * x + phi * denoised
        if denoised_prev is not None:
            r = h_prev / h
            weight = 1 - phi / (h * (1 + eta)) if solver_type == "heun" else phi / 2
            x = x + weight / r * (denoised - denoised_prev)
        if eta > 0:
            x = x + randn_like(x, generator) * sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * S_noise
        denoised_prev, h_prev = denoised, h
    return x


@torch.no_grad()
def dpmpp_3m_sde(denoise, x, sigmas, *, generator=None, callback=None, eta=1.0, S_noise=1.0):
    """DPM-Solver++(3M) SDE (3rd order, n NFE); stochastic for eta > 0, eta = 0 is an ODE solver."""
    sigmas = sigmas.tolist()
    history = []  # (D, h) of the previous steps, most recent first, at most two
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoise, x, sigma)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        h_eta = h * (1 + eta)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = 1 + math.expm1(-h_eta) / h_eta  # 1 − (1 − e^{−h_η})/h_η
        if len(history) == 2:
            # Divided differences of D in t give its first and second derivative estimates.
            (D_1, h_1), (D_2, h_2) = history
            r0, r1 = h_1 / h, h_2 / h
            delta_0, delta_1 = (denoised - D_1) / r0, (D_1 - D_2) / r1
            d1 = delta_0 + (delta_0 - delta_1) * r0 / (r0 + r1)
            d2 = (delta_0 - delta_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif len(history) == 1:
            [(D_1, h_1)] = history
            x = x + phi_2 * (denoised - D_1) / (h_1 / h)
        if eta > 0:
            x = x + randn_like(x, generator) * sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * S_noise
        history = [(denoised, h), *history][:2]
    return x


# name -> function, for every sampler of the registry (which holds everything else about them)
SAMPLERS = {name: globals()[name] for name in SAMPLER_NAMES}
