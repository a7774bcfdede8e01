"""Golden files: tdiff against the reference, k-diffusion 0.1.1, on fixed weights and inputs.

tests/golden/ holds a tiny seeded k-diffusion image_transformer_v1 (width 32, two 16-dim heads,
d_ff 64, depth 2, 8x8 RGB, patch 2, 10 classes; every weight non-zero) under k-diffusion's parameter
names, and k-diffusion's float64 outputs on fixed inputs. tools/kdiff_golden.py wrote them in an
environment with k-diffusion (its docstring says how); this file needs no k-diffusion. It loads the
weights into a tdiff model and checks, in float64:

* the network F (forward, with class and augmentation conditioning, and without augmentation),
* the EDM/Karras denoiser D (sigma_data 0.5) and the per-item loss for each loss weighting,
* the Karras schedule,
* every tdiff sampler (per-step denoised trajectory and final x), stochastic ones fed the noise
  k-diffusion added, in the same order,
* shared-block tdiff models against k-diffusion models whose blocks are tied by hand.

Tolerance: |tdiff - reference| <= ATOL + RTOL * |reference| elementwise, ATOL = RTOL = 1e-12. On the
machine that wrote the fixtures the network, denoiser, loss, shared stacks and the one-step samplers
(euler, euler ancestral, heun, edm) match exactly (0.0); lms and the DPM++ samplers differ by at most
2e-14 (outputs of size ~5), from coefficients written differently (k-diffusion's sigma_next/sigma is
exp(-t_next)/exp(-t), its LMS coefficients come from scipy's quad). The margin absorbs another CPU's
float64 rounding (vectorised reductions), and any
real deviation is many orders larger (see the mutation tests at the end, which check that the
comparisons do fail when one weight, one preconditioning constant, the noise order or the sharing
schedule is changed).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from tdiff import diffusion
from tdiff.config import ModelConfig, SharingConfig
from tdiff.diffusion import Denoiser, conditioned
from tdiff.model import build_model
from tdiff.samplers import SAMPLERS, ImageNoise, karras_sigmas

GOLDEN = Path(__file__).parent / "golden"
WEIGHTS_FILE = GOLDEN / "kdiff_itv1_weights.safetensors"
IO_FILE = GOLDEN / "kdiff_itv1_io.safetensors"
REGENERATE = "/work/peer/venv/bin/python tools/kdiff_golden.py (see its docstring)"

RTOL = 1e-12
ATOL = 1e-12


# ------------------------------------------------------------------------------------------------
# Loading


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: one thread is fastest (on a busy machine, two threads made a forward 100x
    slower) and gives the reductions one fixed order, as when the fixtures were written."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():  # part of the repository: missing is an error, never a skip
        pytest.fail(f"golden fixture {path} is missing; regenerate it with {REGENERATE}")
    with safe_open(str(path), framework="pt") as f:
        names = f.keys()
        return {k: f.get_tensor(k) for k in names}, f.metadata()


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return _load(WEIGHTS_FILE)[0]


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return _load(IO_FILE)[0]


@pytest.fixture(scope="module")
def meta() -> dict[str, str]:
    return _load(IO_FILE)[1]


# k-diffusion state-dict name -> tdiff name. Unlisted parts are spelled the same (time_emb, in_proj,
# out_norm, out_proj, class_emb, mapping.in_norm, ..., and every adaptive-norm `norm.linear`).
KDIFF_TO_TDIFF = [
    (r"^mapping\.blocks\.(\d+)\.up_proj\.", r"mapping.layers.\1.up."),
    (r"^mapping\.blocks\.(\d+)\.down_proj\.", r"mapping.layers.\1.down."),
    (r"^mapping\.blocks\.(\d+)\.", r"mapping.layers.\1."),
    (r"^blocks\.(\d+)\.self_attn\.qkv_proj\.", r"blocks.\1.attn.qkv."),
    (r"^blocks\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.out."),
    (r"^blocks\.(\d+)\.self_attn\.qk_norm\.scale$", r"blocks.\1.attn.qk_norm.log_scale"),
    (r"^blocks\.(\d+)\.self_attn\.pos_emb\.", r"blocks.\1.attn.rope."),
    (r"^blocks\.(\d+)\.self_attn\.", r"blocks.\1.attn."),
    (r"^blocks\.(\d+)\.ff\.up_proj\.", r"blocks.\1.ff.up."),
    (r"^blocks\.(\d+)\.ff\.down_proj\.", r"blocks.\1.ff.down."),
]


def tdiff_name(kdiff_name: str) -> str:
    for pattern, replacement in KDIFF_TO_TDIFF:
        name, n = re.subn(pattern, replacement, kdiff_name)
        if n:
            return name
    return kdiff_name


def tdiff_state(weights: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """k-diffusion's state dict under tdiff's names, keeping the first `depth` blocks."""
    state = {}
    for name, tensor in weights.items():
        block = re.match(r"^blocks\.(\d+)\.", name)
        if block is None or int(block.group(1)) < depth:
            state[tdiff_name(name)] = tensor
    return state


def build_net(meta, weights, sharing: dict | None = None, repeat_emb: torch.Tensor | None = None):
    """The tdiff network of the fixture config, float64, eval, loaded strictly from the k-diffusion weights."""
    config = json.loads(meta["config"])
    sharing = dict(config["sharing"] if sharing is None else sharing)
    with torch.random.fork_rng():  # building draws initial weights; leave the global RNG alone
        net = build_model(ModelConfig(**config["model"]), SharingConfig(**sharing)).double().eval()
    state = tdiff_state(weights, sharing["depth"])
    if repeat_emb is not None:
        state["repeat_emb"] = repeat_emb
    net.load_state_dict(state, strict=True)  # every tdiff tensor filled, every reference tensor used
    return net


@pytest.fixture(scope="module")
def net(meta, weights):
    return build_net(meta, weights)


def sigma_data(meta) -> float:
    return json.loads(meta["config"])["diffusion"]["sigma_data"]


# ------------------------------------------------------------------------------------------------
# Comparison


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.shape == expected.shape and torch.allclose(actual, expected, rtol=RTOL, atol=ATOL)


def check(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype == torch.float64, what
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual - expected).abs().max().item()


# ------------------------------------------------------------------------------------------------
# What tdiff computes for each fixture


def forward(net, golden, aug=True):
    sigma = golden["forward.sigma"]
    return net(
        golden["forward.x"], sigma.log() / 4, aug_cond=golden["aug_cond"] if aug else None, class_cond=golden["labels"]
    )


def denoiser_out(denoiser, golden):
    return denoiser(
        golden["denoiser.x"], golden["denoiser.sigma"], aug_cond=golden["aug_cond"], class_cond=golden["labels"]
    )


def loss_out(denoiser, golden, weighting):
    return denoiser.loss(
        golden["loss.x0"],
        golden["loss.noise"],
        golden["loss.sigma"],
        weighting=weighting,
        aug_cond=golden["aug_cond"],
        class_cond=golden["labels"],
    )


class Replay(ImageNoise):
    """tdiff's per-image noise interface, answering with the reference's draws in order."""

    def __init__(self, draws):
        self.draws = list(draws)
        self.used = 0

    def randn(self, shape, device=None, dtype=torch.float32):
        assert self.used < len(self.draws), (
            f"the sampler drew noise {self.used + 1}; the reference added {len(self.draws)}"
        )
        draw = self.draws[self.used]
        assert tuple(shape) == tuple(draw.shape), (tuple(shape), tuple(draw.shape))
        self.used += 1
        return draw.to(device=device, dtype=dtype)


def run_sampler(net, golden, meta, name, sigmas=None, draws=None, **override):
    """tdiff's sampler `name` on the fixture: (final x, per-step denoised (steps, B, C, H, W), draws used)."""
    spec = json.loads(meta["samplers"])[name]
    denoise = conditioned(Denoiser(net, sigma_data(meta)), golden["sampler.labels"])
    if draws is None:
        draws = golden["sampler.noise"][golden[f"sampler.{name}.noise_index"]]
    noise = Replay(draws)
    steps = []
    out = SAMPLERS[spec["tdiff"]](
        denoise,
        golden["sampler.x_T"].clone(),
        golden["schedule.karras_float64"] if sigmas is None else sigmas,
        generator=noise,
        callback=steps.append,
        **{**spec["tdiff_kwargs"], **override},
    )
    return out, torch.stack([s["denoised"] for s in steps]), noise


# ------------------------------------------------------------------------------------------------
# The fixtures themselves


def test_fixtures_record_the_reference_versions_and_config(meta):
    weights_meta = _load(WEIGHTS_FILE)[1]
    for m in (meta, weights_meta):
        assert m["generator"] == "tools/kdiff_golden.py"
        assert m["k_diffusion"].startswith("0.1.1"), m["k_diffusion"]
        assert m["torch"]
        json.loads(m["config"])
    assert meta["config"] == weights_meta["config"]
    assert sum(p.stat().st_size for p in GOLDEN.iterdir()) < 1_000_000  # committed: keep them small


def test_every_reference_weight_is_nonzero_and_maps_to_one_tdiff_tensor(meta, weights, net):
    assert all(t.dtype == torch.float64 and t.any() for t in weights.values())
    names = [tdiff_name(k) for k in weights]
    assert len(set(names)) == len(names)
    assert set(names) == set(net.state_dict())  # with strict loading in build_net: a bijection


# ------------------------------------------------------------------------------------------------
# Network, denoiser, loss


@pytest.mark.parametrize("aug", [True, False], ids=["aug_cond", "no_aug_cond"])
def test_forward_matches_kdiffusion(net, golden, aug):
    with torch.no_grad():
        out = forward(net, golden, aug)
    check(out, golden["forward.out" if aug else "forward.out_no_aug"], "network forward")


def test_denoiser_matches_kdiffusion(net, golden, meta):
    with torch.no_grad():
        out = denoiser_out(Denoiser(net, sigma_data(meta)), golden)
    check(out, golden["denoiser.out"], "denoiser")


@pytest.mark.parametrize("weighting", ["karras", "soft-min-snr", "snr"])
def test_loss_matches_kdiffusion(net, golden, meta, weighting):
    with torch.no_grad():
        out = loss_out(Denoiser(net, sigma_data(meta)), golden, weighting)
    check(out, golden[f"loss.{weighting}"], f"loss ({weighting})")


# ------------------------------------------------------------------------------------------------
# Schedule and samplers


def test_karras_schedule_matches_kdiffusion_in_float64(golden, meta):
    s = json.loads(meta["schedule"])
    sigmas = karras_sigmas(s["n"], s["sigma_min"], s["sigma_max"], s["rho"], dtype=torch.float64)
    check(sigmas, golden["schedule.karras_float64"], "Karras schedule (float64)")


def test_karras_schedule_float32_is_the_float64_reference_rounded_not_kdiffusions_float32(golden, meta):
    # A known, deliberate difference: k-diffusion computes the schedule in the default dtype, so in
    # float32 the rho-th root and power (rho = 7) leave up to ~6.5 float32 ulps of error (even
    # sigma_max = 80 comes back as 80 - 1.6 ulp). tdiff computes in float64 and rounds once: its float32
    # schedule is k-diffusion's float64 schedule rounded to float32, and k-diffusion's own float32
    # schedule is within 8 ulps of it.
    s = json.loads(meta["schedule"])
    sigmas = karras_sigmas(s["n"], s["sigma_min"], s["sigma_max"], s["rho"], dtype=torch.float32)
    assert torch.equal(sigmas, golden["schedule.karras_float64"].float())
    kdiff32 = golden["schedule.karras_float32"]
    assert kdiff32.dtype == torch.float32
    torch.testing.assert_close(kdiff32, sigmas, rtol=8 * torch.finfo(torch.float32).eps, atol=0)


SAMPLER_CASES = [
    "euler",
    "euler_churn",
    "euler_ancestral",
    "heun",
    "edm",
    "lms",
    "dpmpp_2m",
    "dpmpp_2m_sde_eta0",
    "dpmpp_2m_sde_midpoint",
    "dpmpp_2m_sde_heun",
    "dpmpp_3m_sde_eta0",
    "dpmpp_3m_sde",
]


def test_every_tdiff_sampler_has_a_golden_case(meta):
    assert {spec["tdiff"] for spec in json.loads(meta["samplers"]).values()} == set(SAMPLERS)
    assert set(json.loads(meta["samplers"])) == set(SAMPLER_CASES)


@pytest.mark.parametrize("name", SAMPLER_CASES)
def test_sampler_matches_kdiffusion(net, golden, meta, name):
    out, denoised, noise = run_sampler(net, golden, meta, name)
    assert noise.used == len(noise.draws), f"{name}: drew {noise.used} of the reference's {len(noise.draws)} noises"
    check(denoised, golden[f"sampler.{name}.denoised"], f"{name}: denoised at each step")
    check(out, golden[f"sampler.{name}.out"], f"{name}: final x")


# ------------------------------------------------------------------------------------------------
# Shared blocks


SHARED_CASES = ["d2s2i", "d2s2ui", "d1s3", "d2s2i_embedding"]


def shared_net(meta, weights, golden, name, **sharing_override):
    spec = json.loads(meta["shared"])[name]
    return build_net(meta, weights, {**spec["sharing"], **sharing_override}, golden.get(f"shared.{name}.repeat_emb"))


def test_shared_cases_cover_the_fixture(meta):
    assert set(json.loads(meta["shared"])) == set(SHARED_CASES)


@pytest.mark.parametrize("name", SHARED_CASES)
def test_shared_blocks_match_kdiffusion_with_tied_blocks(meta, weights, golden, name):
    net = shared_net(meta, weights, golden, name)
    applications = json.loads(meta["shared"])[name]["applications"]
    assert [list(a) for a in net.schedule] == applications  # tdiff's schedule is the one the reference ran
    with torch.no_grad():
        check(forward(net, golden), golden[f"shared.{name}.out"], f"shared blocks {name}")


# ------------------------------------------------------------------------------------------------
# The checks can fail: each mutation below must break the comparison it targets


def _all_weight_names():
    return sorted(_load(WEIGHTS_FILE)[0]) if WEIGHTS_FILE.is_file() else ["(fixtures missing)"]


@pytest.mark.parametrize("kdiff_name", _all_weight_names())
def test_changing_any_one_weight_breaks_the_forward_check(net, golden, kdiff_name):
    """One element of one tensor, changed by 1e-6 relative: far above the tolerance in the output.

    Element 0 of every tensor is used by the fixture inputs: the class table's row 0 is class 0,
    which the inputs contain, and Fourier/aug weights meet non-zero inputs.
    """
    mutated = copy.deepcopy(net)
    tensor = mutated.state_dict()[tdiff_name(kdiff_name)]  # shares storage with the parameter
    with torch.no_grad():
        tensor.view(-1)[0] *= 1 + 1e-6
        out = forward(mutated, golden)
    assert not close(out, golden["forward.out"]), f"changing {kdiff_name}[0] went unnoticed"
    assert max_error(out, golden["forward.out"]) > 100 * ATOL


def _scaled(index: int, factor: float):
    """edm_scalings with output `index` (c_skip, c_out, c_in, c_noise) multiplied by `factor`."""
    original = diffusion.edm_scalings
    calls = []

    def edm_scalings(sigma, sigma_data=0.5):
        calls.append(1)
        scalings = list(original(sigma, sigma_data))
        scalings[index] = scalings[index] * factor
        return tuple(scalings)

    return edm_scalings, calls


@pytest.mark.parametrize("which", ["c_skip", "c_out", "c_in", "c_noise"])
def test_changing_a_preconditioning_coefficient_breaks_denoiser_and_loss_checks(monkeypatch, net, golden, meta, which):
    index = ["c_skip", "c_out", "c_in", "c_noise"].index(which)
    mutated, calls = _scaled(index, 1 + 1e-9)
    monkeypatch.setattr(diffusion, "edm_scalings", mutated)
    denoiser = Denoiser(net, sigma_data(meta))
    with torch.no_grad():
        assert not close(denoiser_out(denoiser, golden), golden["denoiser.out"]), f"{which} * (1 + 1e-9) unnoticed"
        assert not close(loss_out(denoiser, golden, "karras"), golden["loss.karras"])
    assert calls, "the mutation was never used: tdiff.diffusion no longer computes scalings via edm_scalings"


def test_changing_sigma_data_breaks_denoiser_and_loss_checks(net, golden, meta):
    denoiser = Denoiser(net, sigma_data(meta) * (1 + 1e-9))
    with torch.no_grad():
        assert not close(denoiser_out(denoiser, golden), golden["denoiser.out"])
        for weighting in ("karras", "soft-min-snr", "snr"):
            assert not close(loss_out(denoiser, golden, weighting), golden[f"loss.{weighting}"]), weighting


def test_wrong_c_skip_formula_breaks_the_denoiser_check(monkeypatch, net, golden, meta):
    # sigma_data / (sigma + sigma_data) instead of sigma_data^2 / (sigma^2 + sigma_data^2)
    original = diffusion.edm_scalings

    def edm_scalings(sigma, sigma_data=0.5):
        _, c_out, c_in, c_noise = original(sigma, sigma_data)
        return sigma_data / (sigma + sigma_data), c_out, c_in, c_noise

    monkeypatch.setattr(diffusion, "edm_scalings", edm_scalings)
    with torch.no_grad():
        out = denoiser_out(Denoiser(net, sigma_data(meta)), golden)
    assert max_error(out, golden["denoiser.out"]) > 1e-3


@pytest.mark.parametrize("name", ["euler_churn", "euler_ancestral", "edm", "dpmpp_2m_sde_midpoint", "dpmpp_3m_sde"])
def test_swapping_two_noise_draws_breaks_a_stochastic_sampler_check(net, golden, meta, name):
    draws = golden["sampler.noise"][golden[f"sampler.{name}.noise_index"]]
    swapped = draws[[1, 0, *range(2, len(draws))]]
    out, _, _ = run_sampler(net, golden, meta, name, draws=swapped)
    assert not close(out, golden[f"sampler.{name}.out"])


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpmpp_2m", "dpmpp_3m_sde_eta0"])
def test_moving_one_noise_level_breaks_a_deterministic_sampler_check(net, golden, meta, name):
    sigmas = golden["schedule.karras_float64"].clone()
    sigmas[2] *= 1 + 1e-9
    out, _, _ = run_sampler(net, golden, meta, name, sigmas=sigmas)
    assert not close(out, golden[f"sampler.{name}.out"])


def test_the_other_second_order_correction_breaks_the_dpmpp_2m_sde_check(net, golden, meta):
    out, _, _ = run_sampler(net, golden, meta, "dpmpp_2m_sde_midpoint", solver_type="heun")
    assert not close(out, golden["sampler.dpmpp_2m_sde_midpoint.out"])


def test_the_other_block_order_breaks_the_shared_check(meta, weights, golden):
    net = shared_net(meta, weights, golden, "d2s2i", interleaved=False)
    with torch.no_grad():
        assert not close(forward(net, golden), golden["shared.d2s2i.out"])


@pytest.mark.parametrize("name", ["d2s2i", "d2s2ui", "d1s3"])
def test_unscaled_repeat_conditioning_breaks_the_shared_check(monkeypatch, meta, weights, golden, name):
    net = shared_net(meta, weights, golden, name)
    substeps = json.loads(meta["shared"])[name]["sharing"]["substeps"]
    monkeypatch.setattr(net, "repeat_conditions", lambda cond: [cond] * substeps)  # no (r + 1) factor
    with torch.no_grad():
        assert not close(forward(net, golden), golden[f"shared.{name}.out"])


def test_dropping_the_repeat_embedding_breaks_its_shared_check(meta, weights, golden):
    net = shared_net(meta, weights, golden, "d2s2i_embedding")
    with torch.no_grad():
        net.repeat_emb.zero_()
        assert not close(forward(net, golden), golden["shared.d2s2i_embedding.out"])
