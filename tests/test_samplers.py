"""Samplers against the one case with a closed form: Gaussian data, where D and the ODE are exact.

Data N(μ, s²) per pixel (μ, s differ per pixel). The optimal denoiser is
D(x; σ) = μ + s²/(s² + σ²)(x − μ), and the probability-flow ODE from x_T at σ_T has the solution
x(σ) = μ + (x_T − μ)·√(s² + σ²)/√(s² + σ_T²). So every ODE sampler has a known target, and every
stochastic sampler must end with mean μ and std s.
"""

import inspect
import math
from pathlib import Path

import pytest
import torch

from tdiff import samplers as S
from tdiff.sampler_registry import REGISTRY, markdown_table

MU = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64).view(1, 1, 2, 2)
STD = torch.tensor([0.2, 0.5, 0.8, 1.0], dtype=torch.float64).view(1, 1, 2, 2)
SIGMA_MIN, SIGMA_MAX = 0.02, 80.0


def gaussian_denoiser(x, sigma):
    sigma = sigma.view(-1, 1, 1, 1)
    return MU + STD**2 / (STD**2 + sigma**2) * (x - MU)


def exact_ode(x_T, sigma_T, sigma):
    return MU + (x_T - MU) * torch.sqrt(STD**2 + sigma**2) / torch.sqrt(STD**2 + sigma_T**2)


def start_noise(batch=8, seed=1):
    return S.randn((batch, 1, 2, 2), torch.Generator().manual_seed(seed), dtype=torch.float64) * SIGMA_MAX


def rough_sigmas(n):
    """n steps whose widths in ln σ alternate 1:2, so multistep step-ratio errors cannot hide."""
    widths = torch.tensor([1.0 + i % 2 for i in range(n)], dtype=torch.float64)
    t = torch.cat([widths.new_zeros(1), widths.cumsum(0)]) / widths.sum()
    return torch.exp(math.log(SIGMA_MAX) + t * (math.log(SIGMA_MIN) - math.log(SIGMA_MAX)))


# name -> (sampler, deterministic options)
ODE_SAMPLERS = {
    "euler": (S.euler, {}),
    "heun": (S.heun, {}),
    "lms": (S.lms, {}),
    "dpmpp_2m": (S.dpmpp_2m, {}),
    "dpmpp_2m_sde_midpoint": (S.dpmpp_2m_sde, {"eta": 0.0, "solver_type": "midpoint"}),
    "dpmpp_2m_sde_heun": (S.dpmpp_2m_sde, {"eta": 0.0, "solver_type": "heun"}),
    "dpmpp_3m_sde": (S.dpmpp_3m_sde, {"eta": 0.0}),
}
# Max error at 1000 Karras steps, ~3x the measured one (euler 4.7e-3, 2nd order 2-3e-5, 3M 5.6e-6,
# lms 2e-8): a formula one order too low misses these by far.
ODE_TOLERANCE = {
    "euler": 1.5e-2,
    "heun": 1e-4,
    "lms": 1e-6,
    "dpmpp_2m": 1e-4,
    "dpmpp_2m_sde_midpoint": 1e-4,
    "dpmpp_2m_sde_heun": 1e-4,
    "dpmpp_3m_sde": 2e-5,
}
# Observed order log2(err_n / err_2n) at n = 128. DPM++(3M) as k-diffusion writes it (and spec §5)
# weights its second difference by φ₃ where the Taylor expansion needs 2φ₃, so it is 2nd order.
ORDER_BAND = {
    "euler": (0.8, 1.3),
    "heun": (1.7, 2.6),
    "lms": (3.3, 4.5),
    "dpmpp_2m": (1.7, 2.6),
    "dpmpp_2m_sde_midpoint": (1.7, 2.6),
    "dpmpp_2m_sde_heun": (1.7, 2.6),
    "dpmpp_3m_sde": (1.7, 2.6),
}


def test_karras_schedule_values():
    sigmas = S.karras_sigmas(50, 0.01, 80.0)
    assert sigmas.shape == (51,) and sigmas.dtype == torch.float32
    torch.testing.assert_close(sigmas[:3], torch.tensor([80.0, 72.09, 64.87]), atol=5e-3, rtol=0)
    torch.testing.assert_close(sigmas[-3:], torch.tensor([0.0144, 0.01, 0.0]), atol=5e-5, rtol=0)


@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_ode_samplers_follow_the_exact_flow(name):
    sampler, options = ODE_SAMPLERS[name]
    sigmas = S.karras_sigmas(1000, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64)
    x_T = start_noise()
    # Without the trailing 0 the sampler stops at σ_min, where the exact flow is known.
    x = sampler(gaussian_denoiser, x_T, sigmas[:-1], **options)
    expected = exact_ode(x_T, SIGMA_MAX, SIGMA_MIN)
    assert (x - expected).abs().max() < ODE_TOLERANCE[name]
    # With it, the last step lands on x(0) (LMS extrapolates) or returns D(x; σ_min).
    x0 = sampler(gaussian_denoiser, x_T, sigmas, **options)
    target = (
        exact_ode(x_T, SIGMA_MAX, 0.0)
        if name == "lms"
        else gaussian_denoiser(expected, torch.tensor([SIGMA_MIN], dtype=torch.float64))
    )
    assert (x0 - target).abs().max() < ODE_TOLERANCE[name]


@pytest.mark.parametrize("schedule", ["karras", "rough"])
@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_convergence_order(name, schedule):
    sampler, options = ODE_SAMPLERS[name]
    x_T = start_noise()
    errors = []
    for n in (128, 256):
        sigmas = (
            S.karras_sigmas(n, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64)[:-1]
            if schedule == "karras"
            else rough_sigmas(n)
        )
        x = sampler(gaussian_denoiser, x_T, sigmas, **options)
        errors.append((x - exact_ode(x_T, SIGMA_MAX, SIGMA_MIN)).abs().max().item())
    order = math.log2(errors[0] / errors[1])
    low, high = ORDER_BAND[name]
    assert low < order < high, f"{name}: observed order {order:.2f}"


def test_multistep_step_ratios_on_an_uneven_schedule():
    # D = a + b·t with t = −ln σ, whatever x: then dx/dt = D − x and x(t) = a + b(t − 1) + C·e^{−t}.
    a, b = 0.7, 0.3

    def linear_in_t(x, sigma):
        return (a - b * sigma.log()).view(-1, 1, 1, 1).expand_as(x)

    widths = torch.tensor([0.7, 0.2, 1.1, 0.4, 0.9, 0.3, 0.6], dtype=torch.float64)  # steps in t
    t = torch.cat([widths.new_zeros(1), widths.cumsum(0)]) - 2.0
    sigmas, x_T = torch.exp(-t), start_noise()
    exact = a + b * (t[-1] - 1) + (x_T - a - b * (t[0] - 1)) * torch.exp(t[0] - t[-1])
    # The first step holds D constant (error b(h − 1 + e^{−h}), then decaying as e^{−Δt}); after it,
    # "heun" 2M-SDE and 3M extrapolate a linear D exactly, for any ratios of step sizes.
    h0 = widths[0].item()
    expected = exact - b * (h0 - 1 + math.exp(-h0)) * torch.exp(t[1] - t[-1])
    for x in (
        S.dpmpp_2m_sde(linear_in_t, x_T, sigmas, eta=0.0, solver_type="heun"),
        S.dpmpp_3m_sde(linear_in_t, x_T, sigmas, eta=0.0),
    ):
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-12)
    # DPM++(2M) is 2M-SDE with eta 0 and the midpoint correction, written out separately.
    sigmas = rough_sigmas(9)
    torch.testing.assert_close(
        S.dpmpp_2m(gaussian_denoiser, x_T, sigmas),
        S.dpmpp_2m_sde(gaussian_denoiser, x_T, sigmas, eta=0.0),
        rtol=0,
        atol=1e-12,
    )


def test_churn_gating_and_cap():
    seen = []
    sigmas = torch.tensor([20.0, 5.0, 1.0, 0.2, 0.0], dtype=torch.float64)
    S.euler(
        gaussian_denoiser,
        start_noise(),
        sigmas,
        generator=torch.Generator().manual_seed(0),
        callback=seen.append,
        S_churn=100.0,
        S_tmin=0.5,
        S_tmax=10.0,
    )
    # γ = min(S_churn/n, √2 − 1) inside [S_tmin, S_tmax], 0 outside: σ̂ = σ·√2 for σ = 5 and 1 only.
    expected = [20.0, 5.0 * math.sqrt(2), math.sqrt(2), 0.2]
    assert [s["sigma_hat"] for s in seen] == pytest.approx(expected, rel=1e-12)


STOCHASTIC = {
    "euler_ancestral": (S.euler_ancestral, {}, 1024),
    "euler_churn": (S.euler, {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0}, 1024),
    "edm": (S.edm, {}, 128),
    "dpmpp_2m_sde_midpoint": (S.dpmpp_2m_sde, {"eta": 1.0}, 128),
    "dpmpp_2m_sde_heun": (S.dpmpp_2m_sde, {"eta": 1.0, "solver_type": "heun"}, 128),
    "dpmpp_3m_sde": (S.dpmpp_3m_sde, {"eta": 1.0}, 128),
}


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_reproduce_the_data_distribution(name):
    sampler, options, steps = STOCHASTIC[name]
    n = 4096
    generator = torch.Generator().manual_seed(0)
    x = S.randn((n, 1, 2, 2), generator, dtype=torch.float64) * SIGMA_MAX
    x = sampler(
        gaussian_denoiser,
        x,
        S.karras_sigmas(steps, 0.01, SIGMA_MAX, dtype=torch.float64),
        generator=generator,
        **options,
    )
    mean_z = (x.mean(0) - MU[0]) / (STD[0] / math.sqrt(n))  # in standard errors
    assert mean_z.abs().max() < 5
    # Standard error of the std is 1.1 %; first-order samplers keep a ~1-2 % bias at 1024 steps.
    assert (x.std(0) / STD[0] - 1).abs().max() < 0.04


def test_deterministic_options_are_deterministic():
    sigmas = S.karras_sigmas(10, 0.01, 80.0, dtype=torch.float64)
    for sampler, options in [(S.euler_ancestral, {"eta": 0.0}), (S.dpmpp_2m_sde, {"eta": 0.0})]:
        runs = [sampler(gaussian_denoiser, start_noise(), sigmas, **options) for _ in range(2)]
        torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    # eta = 0 ancestral is plain Euler.
    torch.testing.assert_close(
        S.euler_ancestral(gaussian_denoiser, start_noise(), sigmas, eta=0.0),
        S.euler(gaussian_denoiser, start_noise(), sigmas),
    )


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_callback_once_per_step_and_model_calls(name):
    calls, steps = [], []

    def counting(x, sigma):
        assert sigma.shape == (x.shape[0],)
        calls.append(1)
        return gaussian_denoiser(x, sigma)

    n = 6
    S.SAMPLERS[name](
        counting,
        start_noise(),
        S.karras_sigmas(n, 0.01, 80.0, dtype=torch.float64),
        generator=torch.Generator().manual_seed(0),
        callback=steps.append,
    )
    assert [s["i"] for s in steps] == list(range(n))
    assert {"i", "x", "sigma", "sigma_hat", "denoised"} <= set(steps[0])
    assert len(calls) == (2 * n - 1 if name in ("heun", "edm") else n)


def test_sampler_table_has_docstrings():
    for name, sampler in S.SAMPLERS.items():
        assert sampler.__doc__ and sampler.__doc__.strip().splitlines()[0], name


def test_lms_coefficients():
    # Equal steps of width h: order-4 Adams–Bashforth, h·(55, −59, 37, −9)/24.
    sigmas = [5.0, 4.0, 3.0, 2.0, 1.0]
    coeffs = [S._lms_coefficient(sigmas, 3, j, 4) for j in range(4)]
    expected = [-55 / 24, 59 / 24, -37 / 24, 9 / 24]
    assert all(abs(c - e) < 1e-12 for c, e in zip(coeffs, expected))
    # Uneven steps: the coefficients still sum to the step, since the Lagrange basis sums to 1.
    sigmas = [7.0, 3.5, 2.2, 0.9, 0.1]
    assert abs(sum(S._lms_coefficient(sigmas, 3, j, 4) for j in range(4)) - (0.1 - 0.9)) < 1e-12


def test_image_noise_is_independent_of_batch():
    sigmas = S.karras_sigmas(8, 0.01, 80.0, dtype=torch.float64)

    def sample(seeds):
        noise = S.ImageNoise(seeds)
        x = S.randn((len(seeds), 1, 2, 2), noise, dtype=torch.float64) * sigmas[0]
        return S.euler_ancestral(gaussian_denoiser, x, sigmas, generator=noise)

    big, small = sample([10, 11, 12, 13]), sample([12])
    torch.testing.assert_close(big[2:3], small, rtol=0, atol=0)
    assert not torch.equal(big[0], big[1])
    with pytest.raises(ValueError):
        S.randn((3, 1, 2, 2), S.ImageNoise([1, 2]))


def test_randn_from_generator_and_global():
    a = S.randn_like(torch.zeros(2, 3), torch.Generator().manual_seed(5))
    b = S.randn((2, 3), torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(5)
    torch.testing.assert_close(S.randn((2, 3)), b, rtol=0, atol=0)


def test_unknown_solver_type():
    with pytest.raises(ValueError):
        S.dpmpp_2m_sde(gaussian_denoiser, start_noise(), S.karras_sigmas(3, 0.1, 1.0), solver_type="rk4")


# ------------------------------------------------------------------------------------------------
# The registry: what it says of each sampler is what the sampler does


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_registry_counts_the_network_evaluations(name):
    calls = []

    def counting(x, sigma):
        calls.append(1)
        return gaussian_denoiser(x, sigma)

    sigmas = S.karras_sigmas(5, 0.01, 80.0, dtype=torch.float64)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    S.SAMPLERS[name](counting, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert len(calls) == REGISTRY[name].evaluations(5)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_registry_names_the_options_and_the_randomness(name):
    spec = REGISTRY[name]
    parameters = inspect.signature(S.SAMPLERS[name]).parameters
    assert {"eta", "solver_type"} & set(parameters) == set(spec.options)
    sigmas = S.karras_sigmas(4, 0.01, 80.0, dtype=torch.float64)
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64) * 80
    options = {"eta": 1.0} if "eta" in spec.options else {}
    runs = [
        S.SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed), **options)
        for seed in (1, 2)
    ]
    assert torch.equal(*runs) == (spec.stochastic == "no")
    if spec.stochastic == "when eta > 0":  # and with eta 0 it is deterministic
        runs = [
            S.SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed), eta=0.0)
            for seed in (1, 2)
        ]
        assert torch.equal(*runs)


def test_every_registered_sampler_has_its_function_and_the_docs_table():
    assert list(S.SAMPLERS) == list(REGISTRY) and all(callable(f) for f in S.SAMPLERS.values())
    docs = (Path(__file__).resolve().parents[1] / "docs" / "sampling.md").read_text()
    assert markdown_table() in docs, "docs/sampling.md's samplers table is not tdiff.sampler_registry.markdown_table()"
