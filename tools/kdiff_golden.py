"""Write the golden fixtures that keep tdiff equal to the reference, k-diffusion 0.1.1.

Run it ONLY in a separate environment that has k-diffusion (this script never imports tdiff, and
tdiff's tests never import k-diffusion):

    python -m venv /work/peer/venv
    /work/peer/venv/bin/pip install torch==2.14.1 torchvision==0.29.1 k-diffusion==0.1.1.post1
    /work/peer/venv/bin/pip install --no-deps setuptools==78.1.1
    /work/peer/venv/bin/python tools/kdiff_golden.py        # from the repository root

It (re)writes two files under tests/golden/, read by tests/test_golden.py:

* kdiff_itv1_weights.safetensors: the float64 state dict of a tiny seeded k-diffusion
  image_transformer_v1, under k-diffusion's own parameter names (the test maps them to tdiff's).
* kdiff_itv1_io.safetensors: fixed inputs and k-diffusion's float64 outputs for them: the network
  forward (with class and augmentation conditioning, and without augmentation), the Karras denoiser
  (`make_denoiser_wrapper`, sigma_data 0.5), the per-item loss for each loss weighting, the Karras
  schedule, every tdiff sampler's per-step denoised trajectory and final x, and the same network
  with hand-tied (shared) blocks.

The model. `make_model(image_transformer_v1)` with width 32, d_ff 64, depth 2, 8x8 RGB images,
patch 2 (16 tokens), 10 classes (+1 null row). k-diffusion hard-codes 64-dim heads in the model class,
which at width 32 would mean no head at all and at width 64 a single head and a ~0.9 MB float64 file;
so its two blocks are replaced by k-diffusion's own `TransformerBlock(32, 64, d_head=16)`: two heads,
which also checks how tdiff splits the qkv projection into heads. Every parameter and buffer (the
zero-initialised output projections, adaptive-norm projections and feed-forward down projections
included) is then redrawn from one seeded float64 generator, so every single weight moves the output.
Compilation and flash attention are switched off (K_DIFFUSION_USE_COMPILE=0,
K_DIFFUSION_USE_FLASH_2=0): the reference is k-diffusion's eager PyTorch code. One thread, so
reruns write identical bytes.

Noise. The stochastic samplers get their noise from one pre-drawn bank of standard normal tensors
(`sampler.noise`), never from an RNG state, so no draw order has to match by accident: k-diffusion
samplers that take a `noise_sampler` get one that returns the bank's tensors in order; sample_euler
and sample_heun with churn draw `torch.randn_like(x)` at EVERY step and use it only where the
churn gamma > 0, so `torch.randn_like` is replaced by the same bank during those calls, and the steps
that did churn are read back from k-diffusion's callback (sigma_hat > sigma). For each sampler
`sampler.<name>.noise_index` lists the bank entries k-diffusion actually ADDED, in order: tdiff's
samplers must consume exactly those (tdiff only draws when it adds noise), which the test feeds them
through tdiff's generator argument.

Block sharing. tdiff runs `depth` distinct blocks `substeps` times each and multiplies the
conditioning by (repeat index + 1) at each application (plus a learned vector per repeat index with
repeat_conditioning = "scale+embedding"). k-diffusion has no sharing, so the reference is the same
k-diffusion model whose `blocks` list holds the SAME block objects several times, each wrapped to
scale (and shift) the conditioning it passes on; the application orders are written out literally.
"""

from __future__ import annotations

import os

os.environ["K_DIFFUSION_USE_COMPILE"] = "0"  # before k_diffusion is imported: its flags read these
os.environ["K_DIFFUSION_USE_FLASH_2"] = "0"

import copy
import importlib.metadata
import inspect
import json
import math
import platform
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import k_diffusion as K
import torch
from k_diffusion.models.image_transformer_v1 import TransformerBlock
from safetensors.torch import save
from torch import nn

if "tdiff" in sys.modules:  # pragma: no cover - a guard, not a feature
    raise SystemExit("kdiff_golden.py must not import tdiff: it is the independent reference")

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden"
WEIGHTS_FILE = OUT / "kdiff_itv1_weights.safetensors"
IO_FILE = OUT / "kdiff_itv1_io.safetensors"
SEED = 20240611

# The tiny model, in tdiff's ModelConfig / SharingConfig / DiffusionConfig terms (the test builds it
# from this), and the k-diffusion config that builds the same network.
CONFIG = {
    "model": {
        "image_size": 8,
        "channels": 3,
        "num_classes": 10,
        "patch_size": 2,
        "width": 32,
        "head_dim": 16,
        "d_ff": 64,
        "mapping_layers": 2,
        "dropout": 0.0,
    },
    "sharing": {"depth": 2, "substeps": 1, "interleaved": True},
    "diffusion": {"sigma_data": 0.5},
}
KDIFF_CONFIG = {
    "dataset": {"num_classes": 10},
    "model": {
        "type": "image_transformer_v1",
        "input_channels": 3,
        "input_size": [8, 8],
        "patch_size": [2, 2],
        "width": 32,
        "depth": 2,
        "d_ff": 64,
        "dropout_rate": 0.0,
        "sigma_data": 0.5,
        "loss_config": "karras",
        "loss_weighting": "soft-min-snr",
    },
}
D_HEAD = 16

# Karras schedule for the samplers: 5 steps, 80 -> 0.03. With EDM's churn window [0.05, 50] the
# first (80) and last (0.03) steps do not churn and the three between do.
SCHEDULE = {"n": 5, "sigma_min": 0.03, "sigma_max": 80.0, "rho": 7.0}
CHURN = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}

# name -> (k-diffusion sampler, its kwargs, tdiff sampler, tdiff kwargs)
SAMPLERS = {
    "euler": ("sample_euler", {}, "euler", {}),
    "euler_churn": (
        "sample_euler",
        CHURN,
        "euler",
        {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003},
    ),
    "euler_ancestral": (
        "sample_euler_ancestral",
        {"eta": 1.0, "s_noise": 1.0},
        "euler_ancestral",
        {"eta": 1.0, "S_noise": 1.0},
    ),
    "heun": ("sample_heun", {}, "heun", {}),
    "edm": ("sample_heun", CHURN, "edm", {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}),
    "lms": ("sample_lms", {"order": 4}, "lms", {"order": 4}),
    "dpmpp_2m": ("sample_dpmpp_2m", {}, "dpmpp_2m", {}),
    "dpmpp_2m_sde_eta0": (
        "sample_dpmpp_2m_sde",
        {"eta": 0.0, "solver_type": "midpoint"},
        "dpmpp_2m_sde",
        {"eta": 0.0, "solver_type": "midpoint"},
    ),
    "dpmpp_2m_sde_midpoint": (
        "sample_dpmpp_2m_sde",
        {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"},
        "dpmpp_2m_sde",
        {"eta": 1.0, "S_noise": 1.0, "solver_type": "midpoint"},
    ),
    "dpmpp_2m_sde_heun": (
        "sample_dpmpp_2m_sde",
        {"eta": 1.0, "s_noise": 1.0, "solver_type": "heun"},
        "dpmpp_2m_sde",
        {"eta": 1.0, "S_noise": 1.0, "solver_type": "heun"},
    ),
    "dpmpp_3m_sde_eta0": ("sample_dpmpp_3m_sde", {"eta": 0.0}, "dpmpp_3m_sde", {"eta": 0.0}),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {"eta": 1.0, "s_noise": 1.0}, "dpmpp_3m_sde", {"eta": 1.0, "S_noise": 1.0}),
}

# Shared stacks: name -> (tdiff sharing config, applications as (distinct block, repeat index)).
SHARED = {
    "d2s2i": ({"depth": 2, "substeps": 2, "interleaved": True}, [(0, 0), (1, 0), (0, 1), (1, 1)]),
    "d2s2ui": ({"depth": 2, "substeps": 2, "interleaved": False}, [(0, 0), (0, 1), (1, 0), (1, 1)]),
    "d1s3": ({"depth": 1, "substeps": 3, "interleaved": True}, [(0, 0), (0, 1), (0, 2)]),
    "d2s2i_embedding": (
        {"depth": 2, "substeps": 2, "interleaved": True, "repeat_conditioning": "scale+embedding"},
        [(0, 0), (1, 0), (0, 1), (1, 1)],
    ),
}


@contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_reference() -> nn.Module:
    """k-diffusion's image_transformer_v1 with 16-dim heads, every weight redrawn, float64, eval."""
    torch.manual_seed(SEED)
    model = K.config.make_model(KDIFF_CONFIG)
    assert isinstance(model, K.models.ImageTransformerDenoiserModelV1)
    width, d_ff = KDIFF_CONFIG["model"]["width"], KDIFF_CONFIG["model"]["d_ff"]
    model.blocks = nn.ModuleList(
        [TransformerBlock(width, d_ff, D_HEAD, dropout=0.0) for _ in range(KDIFF_CONFIG["model"]["depth"])]
    )
    model = model.double().eval()
    g = torch.Generator().manual_seed(SEED)
    state = model.state_dict()  # tensors that share storage with the model
    with torch.no_grad():
        for name in sorted(state):
            t = state[name]
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if name.endswith("qk_norm.scale"):  # log temperature, init ln 10, clamped at ln 100
                value = math.log(10.0) + 0.3 * noise
            elif name.endswith(("freqs_h", "freqs_w")):  # RoPE log-frequencies
                value = t + 0.2 * noise
            elif name.endswith(".scale"):  # RMSNorm gains
                value = 1 + 0.2 * noise
            elif name.endswith("_emb.weight"):  # Fourier features (buffers) and the class table
                value = noise
            elif name.endswith("norm.linear.weight"):  # adaptive-norm modulation (zero in k-diffusion)
                value = 0.5 * noise / math.sqrt(t.shape[1])
            else:  # every other Linear: variance 1 / fan_in (out_proj and down_proj are zero in k-diffusion)
                assert name.endswith(".weight") and t.ndim == 2, name
                value = noise / math.sqrt(t.shape[1])
            t.copy_(value)
    assert all(p.any() for p in model.state_dict().values()), "a zero tensor would hide its weights"
    return model


class NoiseBank:
    """Hands out pre-drawn tensors in order, as a k-diffusion noise_sampler or torch.randn_like."""

    def __init__(self, bank: torch.Tensor):
        self.bank = bank
        self.drawn = 0

    def _next(self, shape) -> torch.Tensor:
        draw = self.bank[self.drawn]
        assert tuple(draw.shape) == tuple(shape), (draw.shape, shape)
        self.drawn += 1
        return draw.clone()

    def noise_sampler(self, sigma, sigma_next):
        return self._next(self.bank.shape[1:])

    def randn_like(self, x, *args, **kwargs):
        return self._next(x.shape).to(x)


def run_sampler(name: str, denoiser, x_T, sigmas, bank: torch.Tensor, labels):
    fn_name, kwargs, _, _ = SAMPLERS[name]
    fn = getattr(K.sampling, fn_name)
    noise = NoiseBank(bank)
    steps = []
    kwargs = dict(kwargs)
    if fn_name in ("sample_euler", "sample_heun"):
        patch = mock.patch.object(K.sampling.torch, "randn_like", noise.randn_like)
    else:
        patch = mock.patch.object(K.sampling.torch, "randn_like", side_effect=AssertionError("unexpected randn_like"))
        if "noise_sampler" in inspect.signature(fn).parameters:
            kwargs["noise_sampler"] = noise.noise_sampler
    with patch:
        x = fn(
            denoiser,
            x_T.clone(),
            sigmas,
            extra_args={"class_cond": labels},
            callback=steps.append,
            disable=True,
            **kwargs,
        )
    if fn_name in ("sample_euler", "sample_heun"):
        assert noise.drawn == len(sigmas) - 1  # one randn_like per step, used or not
        used = [s["i"] for s in steps if float(s["sigma_hat"]) > float(s["sigma"])]
    else:
        used = list(range(noise.drawn))  # every noise_sampler call is added
    denoised = torch.stack([s["denoised"] for s in steps])
    return x, denoised, torch.tensor(used, dtype=torch.int64)


class RepeatedBlock(nn.Module):
    """One more application of an existing k-diffusion block: conditioning * (r + 1) [+ e_r]."""

    def __init__(self, block: nn.Module, repeat: int, offset: torch.Tensor | None = None):
        super().__init__()
        self.block = block
        self.repeat = repeat
        self.offset = offset

    def forward(self, x, pos, attn_mask, cond):
        cond = cond * (self.repeat + 1)
        if self.offset is not None:
            cond = cond + self.offset
        return self.block(x, pos, attn_mask, cond)


def shared_reference(model: nn.Module, applications, repeat_emb: torch.Tensor | None) -> nn.Module:
    shared = copy.deepcopy(model)
    distinct = shared.blocks
    shared.blocks = nn.ModuleList(
        [RepeatedBlock(distinct[b], r, None if repeat_emb is None else repeat_emb[r]) for b, r in applications]
    )
    for a, (b, _) in zip(shared.blocks, applications):  # tied: the same module objects
        assert a.block is distinct[b]
    return shared.eval()


def write_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    """safetensors.torch.save_file, but with the JSON header's keys sorted: the library writes its
    metadata in hash order, so two identical runs would differ in their bytes."""
    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format allows trailing spaces; keeps the data 8-byte aligned
    path.write_bytes(len(header).to_bytes(8, "little") + header + blob[8 + n :])


def main() -> None:
    torch.set_num_threads(1)
    model = build_reference()
    Denoiser = K.config.make_denoiser_wrapper(KDIFF_CONFIG)
    denoiser = Denoiser(model).eval()
    assert denoiser.sigma_data == CONFIG["diffusion"]["sigma_data"]

    g = torch.Generator().manual_seed(SEED + 1)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)

    io = {}
    labels = torch.tensor([0, 7, 10])  # class 0, a middle class, and the null class (row num_classes)
    aug = 0.5 * randn(3, 9)
    aug[2] = 0  # one item without augmentation, as in most training batches
    io["labels"] = labels
    io["aug_cond"] = aug

    with torch.no_grad():
        # The network F: tdiff's net takes c_noise = ln(sigma)/4, k-diffusion's takes sigma.
        x = randn(3, 3, 8, 8)
        sigma = torch.tensor([0.03, 1.1, 40.0], dtype=torch.float64)
        io["forward.x"], io["forward.sigma"] = x, sigma
        io["forward.out"] = model(x, sigma, aug_cond=aug, class_cond=labels)
        io["forward.out_no_aug"] = model(x, sigma, class_cond=labels)

        # The Karras/EDM denoiser D(x; sigma).
        sigma = torch.tensor([0.02, 0.7, 25.0], dtype=torch.float64)
        x = randn(3, 3, 8, 8) * (sigma**2 + 0.25).sqrt()[:, None, None, None]
        io["denoiser.x"], io["denoiser.sigma"] = x, sigma
        io["denoiser.out"] = denoiser(x, sigma, aug_cond=aug, class_cond=labels)

        # The per-item training loss for fixed x0, noise and sigma, every k-diffusion weighting.
        x0, noise = (0.5 * randn(3, 3, 8, 8)).clamp(-1, 1), randn(3, 3, 8, 8)
        sigma = torch.tensor([0.05, 0.5, 9.0], dtype=torch.float64)
        io["loss.x0"], io["loss.noise"], io["loss.sigma"] = x0, noise, sigma
        for weighting in ("karras", "soft-min-snr", "snr"):
            kconfig = copy.deepcopy(KDIFF_CONFIG)
            kconfig["model"]["loss_weighting"] = weighting
            wrapped = K.config.make_denoiser_wrapper(kconfig)(model)
            io[f"loss.{weighting}"] = wrapped.loss(x0, noise, sigma, aug_cond=aug, class_cond=labels)

        # Karras schedules: k-diffusion computes in the default dtype (float32 normally).
        s = SCHEDULE
        io["schedule.karras_float32"] = K.sampling.get_sigmas_karras(s["n"], s["sigma_min"], s["sigma_max"], s["rho"])
        with default_dtype(torch.float64):
            sigmas = K.sampling.get_sigmas_karras(s["n"], s["sigma_min"], s["sigma_max"], s["rho"])
        assert sigmas.dtype == torch.float64
        io["schedule.karras_float64"] = sigmas

        # Samplers on the denoiser, batch 2, classes 3 and null.
        sampler_labels = torch.tensor([3, 10])
        x_T = randn(2, 3, 8, 8) * sigmas[0]
        bank = randn(s["n"], 2, 3, 8, 8)
        io["sampler.labels"], io["sampler.x_T"], io["sampler.noise"] = sampler_labels, x_T, bank
        for name in SAMPLERS:
            out, denoised, used = run_sampler(name, denoiser, x_T, sigmas, bank, sampler_labels)
            io[f"sampler.{name}.out"] = out
            io[f"sampler.{name}.denoised"] = denoised
            io[f"sampler.{name}.noise_index"] = used

        # Shared blocks, on the forward inputs.
        for name, (sharing, applications) in SHARED.items():
            repeat_emb = None
            if sharing.get("repeat_conditioning") == "scale+embedding":
                repeat_emb = 0.3 * randn(sharing["substeps"], KDIFF_CONFIG["model"]["width"])
                io[f"shared.{name}.repeat_emb"] = repeat_emb
            shared = shared_reference(model, applications, repeat_emb)
            io[f"shared.{name}.out"] = shared(io["forward.x"], io["forward.sigma"], aug_cond=aug, class_cond=labels)

    for key, t in io.items():
        assert torch.isfinite(t.double()).all(), key

    meta = {
        "generator": "tools/kdiff_golden.py",
        "k_diffusion": importlib.metadata.version("k-diffusion"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seed": str(SEED),
        "config": json.dumps(CONFIG, sort_keys=True),
        "kdiff_config": json.dumps(KDIFF_CONFIG, sort_keys=True),
        "d_head": str(D_HEAD),
        "env": "K_DIFFUSION_USE_COMPILE=0 K_DIFFUSION_USE_FLASH_2=0, torch.set_num_threads(1)",
    }
    io_meta = {
        **meta,
        "schedule": json.dumps(SCHEDULE, sort_keys=True),
        "samplers": json.dumps(
            {
                k: {"kdiff": v[0], "kdiff_kwargs": v[1], "tdiff": v[2], "tdiff_kwargs": v[3]}
                for k, v in SAMPLERS.items()
            },
            sort_keys=True,
        ),
        "shared": json.dumps({k: {"sharing": v[0], "applications": v[1]} for k, v in SHARED.items()}, sort_keys=True),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    write_safetensors(WEIGHTS_FILE, model.state_dict(), meta)
    write_safetensors(IO_FILE, io, io_meta)
    for path in (WEIGHTS_FILE, IO_FILE):
        print(f"{path.relative_to(OUT.parent.parent)}: {path.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
