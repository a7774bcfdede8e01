"""Generating images from a denoiser: per-image seeds, batching, grids, and `tdiff sample`'s output folder.

Image k is drawn from its own generator seeded with `seed + k` (starting noise and any sampler
noise), so it depends on (weights, seed, k) only, never on the batch it was generated in. That is
what lets `tdiff sample` write its images batch by batch and continue an interrupted call: only the
missing batches are generated, and the result is the one an uninterrupted call writes.

The output folder (docs/sampling.md): `manifest.json` (what the images are made with), `parts/`
(one .npy per finished batch, while sampling), `images/NNNNNN.png` (with --png), and at the end
`grid.png` (the first 256 images) and `samples.npz`, assembled from the parts one at a time, after
which the parts are removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import nn

from tdiff import checkpoint as ckpt
from tdiff import hardware
from tdiff.config import Config, with_values
from tdiff.diffusion import Denoiser, guided_denoiser
from tdiff.errors import RunError, UserError
from tdiff.files import atomic_write, atomic_write_text, file_sha256, is_temporary
from tdiff.model import build_model
from tdiff.sampler_registry import ETA_SAMPLERS, REGISTRY
from tdiff.samplers import SAMPLERS, ImageNoise, karras_sigmas, randn


@dataclass(frozen=True)
class SamplingPlan:
    """What to run for every batch: sampler, its options and the σ schedule."""

    sampler: str
    steps: int
    sigma_min: float
    sigma_max: float
    rho: float
    cfg_scale: float
    options: dict  # sampler keyword options (eta, solver_type, ...)

    @classmethod
    def from_config(cls, config: Config) -> SamplingPlan:
        s, d = config.sample, config.diffusion
        return cls(
            s.sampler,
            s.steps,
            d.sigma_min,
            d.sigma_max,
            s.rho,
            s.cfg_scale,
            sampler_options(s.sampler, s.eta, s.solver_type),
        )


def sampler_options(sampler: str, eta: float, solver_type: str) -> dict:
    """The subset of (eta, solver_type) that a sampler takes (its registry entry's options)."""
    given = {"eta": eta, "solver_type": solver_type}
    return {option: given[option] for option in REGISTRY[sampler].options}


def spread_labels(n: int, num_classes: int, start: int = 0) -> torch.Tensor:
    """Labels 0, 1, ..., C-1, 0, 1, ... for images start..start+n-1 (evenly spread classes)."""
    return (torch.arange(start, start + n) % max(num_classes, 1)).long()


@torch.no_grad()
def sample_batch(
    denoiser: Callable,
    plan: SamplingPlan,
    seeds: list[int],
    labels: torch.Tensor | None,
    shape: tuple[int, int, int],
    num_classes: int,
    device: torch.device,
    callback: Callable | None = None,
    **net_kwargs,
) -> torch.Tensor:
    """One batch of images in [-1, 1], (len(seeds), C, H, W), on `device`."""
    noise = ImageNoise(seeds, device)  # generated on the device, a function of (seed, draw) per image
    sigmas = karras_sigmas(plan.steps, plan.sigma_min, plan.sigma_max, plan.rho, device=device)
    x = randn((len(seeds), *shape), noise, device=device) * sigmas[0]
    if num_classes:
        denoise = guided_denoiser(denoiser, labels.to(device), num_classes, plan.cfg_scale)
    else:
        denoise = denoiser
    if net_kwargs.get("block_cache") is not None:
        net_kwargs["block_cache"].new_run()  # Δ-DiT deltas belong to one batch: its first evaluation is full
    if net_kwargs:
        base = denoise
        denoise = lambda x, sigma: base(x, sigma, **net_kwargs)  # noqa: E731
    x = SAMPLERS[plan.sampler](denoise, x, sigmas, generator=noise, callback=callback, **plan.options)
    return x.clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), rounding to the nearest level."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def pil_image(image: np.ndarray) -> Image.Image:
    """uint8 (H, W, C) -> a PIL image (greyscale when C = 1)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def image_grid(images: np.ndarray, columns: int | None = None) -> Image.Image:
    """Tile uint8 (N, H, W, C) images into one square-ish PIL image, no padding."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return pil_image(grid)


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (`tdiff.files.atomic_write`): a reader never sees half a file."""
    atomic_write(path, lambda file: image.save(file, format="PNG"))


# --------------------------------------------------------------------------------------------
# From a checkpoint to images: what `tdiff sample` and `tdiff eval` run

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when present, else cpu; asking for cuda without one is a UserError.

    Also sets the float32 matmul precision exactly as `tdiff train` does (TF32 on CUDA)."""
    if name not in DEVICES:
        raise UserError(f"device {name!r}: must be one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    hardware.configure_matmul_precision()
    return torch.device(name)


@dataclass(frozen=True)
class LoadedModel:
    """A denoiser ready to sample, with the configuration its checkpoint carried."""

    denoiser: Denoiser  # eval mode, on the requested device
    config: Config
    path: Path  # the weights file actually read
    step: int | None  # the training step it was saved at, when the metadata says
    sha256: str  # the checksum the file records, else one of the file's bytes: which weights these are


def weights_file(checkpoint: str | Path, *, ema: bool = True) -> Path:
    """The weights file to read: `ckpt.resolve`, except that with ema=False a step folder's
    ema.safetensors gives way to the model.safetensors beside it."""
    path = ckpt.resolve(checkpoint, ema=ema)
    trained = path.with_name("model.safetensors")
    return trained if not ema and path.name == "ema.safetensors" and trained.is_file() else path


def load_denoiser(checkpoint: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """A checkpoint file, step directory or run directory (its latest step; EMA weights unless
    `ema=False`) -> the denoiser. Anything that is not a fitting tdiff checkpoint is one UserError,
    and so is ema=False with a file that holds other than the trained weights."""
    path = weights_file(checkpoint, ema=ema)
    weights = ckpt.load_weights(path)  # never unpickles: safetensors + TOML metadata
    kind = weights.metadata.get("kind")
    if kind == "state":
        raise UserError(
            f"{path} holds the optimiser state, not weights; pass ema.safetensors, "
            "model.safetensors, or the run directory"
        )
    if not ema and kind != "model":
        raise UserError(
            f"--no-ema asks for the trained weights, but {path} holds {kind or 'unlabelled'} weights "
            "and no model.safetensors lies beside it; pass model.safetensors or its step "
            "directory, or leave out --no-ema"
        )
    config = weights.config
    net = build_model(config.model, config.sharing)
    ckpt.load_into(net, weights)
    step = weights.metadata.get("step", "")
    denoiser = Denoiser(net, config.diffusion.sigma_data).eval().requires_grad_(False).to(device)
    return LoadedModel(
        denoiser,
        config,
        path,
        int(step) if step.isdigit() else None,
        weights.metadata.get("sha256") or file_sha256(path),
    )


PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --mixed-precision -> autocast dtype


def resolve_precision(name: str | None, device: torch.device) -> tuple[str, str | None]:
    """--mixed-precision for sampling -> (precision, a warning line or None). None picks the device's
    default (`hardware.default_inference_precision`: bf16 where it is native, else float32)."""
    if name is None:
        return hardware.default_inference_precision(device), None
    if name not in PRECISIONS:
        raise UserError(f"--mixed-precision {name}: must be one of {', '.join(PRECISIONS)}")
    return name, hardware.slow_precision_warning(device, name)


class AutocastNetwork(nn.Module):
    """A network run under autocast to `dtype`, its output returned in float32.

    Wrapped around the inner network only, as accelerate wraps a prepared model in training: the
    EDM preconditioning, the sampler's state and its step arithmetic stay in float32.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x, c_noise, **kwargs) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.net(x, c_noise, **kwargs).float()


def inference_denoiser(denoiser: Denoiser, precision: str = "no") -> Denoiser:
    """The denoiser as sampling runs it: with precision bf16 or fp16 a new Denoiser whose network runs
    under autocast (`AutocastNetwork`, sharing the weights); with "no" the denoiser itself."""
    if PRECISIONS[precision] is None:
        return denoiser
    return Denoiser(AutocastNetwork(denoiser.inner, PRECISIONS[precision]), denoiser.sigma_data)


def compile_for_sampling(denoiser: Denoiser, **options) -> int:
    """Regional torch.compile of the denoiser's network (`ImageTransformer.compile_blocks`: each distinct
    block once; the Δ-DiT cache and every sampler run around the compiled blocks); `options` go to
    torch.compile (bench/sampling.py tries mode="reduce-overhead", CUDA graphs). Returns the regions."""
    net = denoiser.inner.net if isinstance(denoiser.inner, AutocastNetwork) else denoiser.inner
    return net.compile_blocks(**options)


CPU_BATCH = 64  # the CPU's default batch: larger ones are no faster there
PROBE_BATCH = 8  # images in the one-evaluation probe that measures memory per image on CUDA
MAX_BATCH = 4096  # no GPU needs more images in flight to be busy
MEMORY_SHARE = 0.8  # of the free memory, for the batch's activations


def fitting_batch(free_bytes: float, per_image_bytes: float, n: int) -> int:
    """The batch for MEMORY_SHARE of `free_bytes` at `per_image_bytes` an image: a multiple of 64 from
    64 on (a power of two below), at least 1, at most MAX_BATCH and n."""
    fits = int(MEMORY_SHARE * free_bytes / max(per_image_bytes, 1.0))
    rounded = fits // 64 * 64 if fits >= 64 else 1 << max(fits, 1).bit_length() - 1
    return max(1, min(n, MAX_BATCH, rounded))


def default_batch_size(
    denoiser: Callable, config: Config, plan: SamplingPlan, device: torch.device, n: int, *, cached: bool = False
) -> int:
    """The batch when none is asked for: CPU_BATCH on the CPU; on CUDA the largest that fits the free
    memory (`fitting_batch`), measured by one network evaluation of PROBE_BATCH images (with guidance,
    precision and everything else the run uses), plus the Δ-DiT delta per image when `cached`.
    The images do not depend on it (`sample_batch`)."""
    if device.type != "cuda":
        return min(n, CPU_BATCH)
    m = config.model
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - base
    torch.cuda.reset_peak_memory_stats(device)
    labels = spread_labels(PROBE_BATCH, m.num_classes) if m.num_classes else None
    sample_batch(
        denoiser,
        dataclasses.replace(plan, steps=1),
        list(range(PROBE_BATCH)),
        labels,
        (m.channels, m.image_size, m.image_size),
        m.num_classes,
        device,
    )
    per_image = (torch.cuda.max_memory_allocated(device) - base) / PROBE_BATCH
    if cached:
        per_image += (m.image_size // m.patch_size) ** 2 * m.width * 4  # the stored delta, float32 at most
    return fitting_batch(free, per_image, n)


@dataclass(frozen=True)
class Inference:
    """How sampling runs the network: the denoiser to call and the settings that shaped it."""

    denoiser: Denoiser  # under autocast for bf16/fp16, with compiled blocks for compile
    precision: str  # no | bf16 | fp16
    compiled: bool
    batch_size: int
    warning: str | None  # one line for the user (a precision emulated on this device), or None


def prepare_inference(
    denoiser: Denoiser,
    config: Config,
    plan: SamplingPlan,
    device: torch.device,
    n: int,
    *,
    precision: str | None = None,
    compile: bool = False,
    batch_size: int | None = None,
    cached: bool = False,
) -> Inference:
    """--mixed-precision (None: the device's default), --compile and --batch-size (None: the default,
    measured on CUDA through the autocast network before it is compiled) for `tdiff sample` and `eval`."""
    precision, warning = resolve_precision(precision, device)
    denoiser = inference_denoiser(denoiser, precision)
    if batch_size is None:
        batch_size = default_batch_size(denoiser, config, plan, device, n, cached=cached)
    if compile:
        compile_for_sampling(denoiser)
    return Inference(denoiser, precision, compile, batch_size, warning)


PLAN_FLAGS = {
    "sample__sampler": "--sampler",
    "sample__steps": "--steps",
    "diffusion__sigma_min": "--sigma-min",
    "diffusion__sigma_max": "--sigma-max",
    "sample__rho": "--rho",
    "sample__eta": "--eta",
    "sample__cfg_scale": "--cfg-scale",
}  # with_values name -> the flag that sets it


def make_plan(
    config: Config,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float | None = None,
    eta: float | None = None,
    cfg_scale: float | None = None,
) -> SamplingPlan:
    """The checkpoint's [sample] defaults with the given values changed, each checked by the
    configuration's own rules (`with_values`: a one-line UserError led by the flag) and then as one set."""
    values = {
        "sample__sampler": sampler,
        "sample__steps": steps,
        "diffusion__sigma_min": sigma_min,
        "diffusion__sigma_max": sigma_max,
        "sample__rho": rho,
        "sample__eta": eta,
        "sample__cfg_scale": cfg_scale,
    }
    given = {name: value for name, value in values.items() if value is not None}
    try:
        config = with_values(config, **given) if given else config
    except UserError as error:
        raise flag_error(error, given) from None
    sampler = config.sample.sampler
    if eta is not None and sampler not in ETA_SAMPLERS:
        raise UserError(f"--eta: the {sampler} sampler takes no eta (those that do: {', '.join(ETA_SAMPLERS)})")
    if cfg_scale is not None and cfg_scale != 1 and not config.model.num_classes:
        raise UserError("--cfg-scale: this model is unconditional (model.num_classes = 0); guidance needs classes")
    return SamplingPlan.from_config(config)


def flag_error(error: UserError, given: dict) -> UserError:
    """The configuration's message about command-line values, led by the flag it names first:
    `sample.rho = 0.0 in the command line: must be > 0` -> `--rho 0.0: must be > 0`."""
    message = str(error)
    keys = {name.replace("__", "."): name for name in given}
    mentioned = sorted((message.index(key), key) for key in keys if key in message)
    if not mentioned:
        return error
    key = mentioned[0][1]
    value = given[keys[key]]
    reason = message.removeprefix(f"{key} = {value!r} in the command line: ").replace(" in the command line", "")
    return UserError(f"{PLAN_FLAGS[keys[key]]} {value}: {reason}")


def random_labels(n: int, num_classes: int, seed: int, start: int = 0) -> torch.Tensor:
    """Uniform labels for images start..start+n-1; label k is a hash of (seed, k) alone (splitmix64)."""
    x = np.arange(start, start + n, dtype=np.uint64) + np.full(n, seed, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x % np.uint64(num_classes)).astype(np.int64))


@dataclass(frozen=True)
class Labels:
    """A checked --class: the label of image k for any range of k, without making all n at once."""

    spec: str  # "spread", "random", or a comma list of labels ("3", "1,5,7")
    num_classes: int
    seed: int = 0  # for "random"

    def range(self, start: int, stop: int) -> torch.Tensor:
        """The labels of images start..stop-1, int64."""
        if self.spec == "spread":
            return spread_labels(stop - start, self.num_classes, start)
        if self.spec == "random":
            return random_labels(stop - start, self.num_classes, self.seed, start)
        chosen = torch.tensor([int(label) for label in self.spec.split(",")])
        return chosen[torch.arange(start, stop) % len(chosen)]


def parse_labels(spec: str | None, num_classes: int, seed: int = 0) -> Labels | None:
    """--class: None/"spread" (0, 1, ..., C-1, 0, ...), "random" (uniform, from the seed), one label
    ("3") or a comma list ("1,5,7", repeated over the images); None for an unconditional model."""
    if not num_classes:
        if spec not in (None, "spread"):
            raise UserError("--class: this model is unconditional (model.num_classes = 0); leave --class out")
        return None
    spec = (spec or "spread").strip()
    if spec in ("spread", "random"):
        return Labels(spec, num_classes, seed)
    try:
        chosen = [int(item) for item in spec.split(",")]
    except ValueError:
        raise UserError(f"--class {spec}: expected a label, a comma list of labels, 'spread' or 'random'") from None
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise UserError(
            f"--class {spec}: label {bad[0]} is outside 0..{num_classes - 1} (this model has {num_classes} classes)"
        )
    return Labels(",".join(map(str, chosen)), num_classes, seed)


def choose_labels(spec: str | None, n: int, num_classes: int, seed: int = 0) -> torch.Tensor | None:
    """All n labels of --class at once (`parse_labels`), for `generate`."""
    labels = parse_labels(spec, num_classes, seed)
    return labels.range(0, n) if labels is not None else None


def sample_range(
    denoiser: Callable,
    config: Config,
    plan: SamplingPlan,
    start: int,
    stop: int,
    *,
    seed: int,
    labels: torch.Tensor | None,
    device: str | torch.device,
    **net_kwargs,
) -> np.ndarray:
    """Images start..stop-1 as uint8 (stop - start, H, W, C): image k from seed + k and its label."""
    m = config.model
    batch = sample_batch(
        denoiser,
        plan,
        list(range(seed + start, seed + stop)),
        labels,
        (m.channels, m.image_size, m.image_size),
        m.num_classes,
        torch.device(device),
        **net_kwargs,
    )
    return to_uint8(batch)


def generate(
    denoiser: Callable,
    config: Config,
    plan: SamplingPlan,
    n: int,
    *,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    make_range: Callable = sample_range,
    **net_kwargs,
) -> np.ndarray:
    """n images in memory as uint8 (n, H, W, C), `batch_size` at a time; image k from seed + k and labels[k].

    `progress(done, n)` is called after every batch; `net_kwargs` go to every network call. `make_range`
    (`sample_range`'s signature) makes each batch; another one may return other arrays, e.g. floats.
    """
    m = config.model
    if m.num_classes and (labels is None or len(labels) != n):
        raise ValueError(f"a class-conditional model needs {n} labels")
    images = None
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = make_range(
            denoiser,
            config,
            plan,
            start,
            stop,
            seed=seed,
            device=device,
            labels=labels[start:stop] if labels is not None else None,
            **net_kwargs,
        )
        if images is None:
            images = np.empty((n, *batch.shape[1:]), dtype=batch.dtype)
        images[start:stop] = batch
        if progress is not None:
            progress(stop, n)
    return images


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez atomically (`tdiff.files.atomic_write`)."""
    atomic_write(path, lambda file: np.savez(file, **arrays))


# --------------------------------------------------------------------------------------------
# The output folder of `tdiff sample`: streamed, continued, never mixed

SAMPLES_FORMAT = "tdiff-samples-2"  # 2: noise generated on the device (counter-based)
MANIFEST, NPZ, GRID = "manifest.json", "samples.npz", "grid.png"
PNG_DIR, PARTS = "images", "parts"
OWN_FOLDERS = {PNG_DIR: re.compile(r"\d{6,}\.png"), PARTS: re.compile(r"(\d+)-(\d+)\.npy")}
GRID_LIMIT = 256  # grid.png shows the first images only; samples.npz holds them all
PROVENANCE_ONLY = ("checkpoint",)  # recorded, not compared: the same weights may have moved
LABEL_CHUNK = 1 << 20  # labels written to samples.npz this many at a time


def sample_manifest(
    loaded: LoadedModel,
    plan: SamplingPlan,
    *,
    n: int,
    seed: int,
    labels: Labels | None,
    cache: object | None,
    png: bool,
    precision: str = "no",
    compiled: bool = False,
) -> dict:
    """What the outputs are made with: everything an image depends on (compiled kernels round
    differently), n and the files asked for. `cache` is the Δ-DiT `CachePlan` (a dataclass) or None."""
    m = loaded.config.model
    return {
        "format": SAMPLES_FORMAT,
        "checkpoint": str(loaded.path.resolve()),
        "weights_sha256": loaded.sha256,
        "n": n,
        "seed": seed,
        "classes": labels.spec if labels is not None else None,
        **dataclasses.asdict(plan),
        "cache": dataclasses.asdict(cache) if cache is not None else None,
        "precision": precision,
        "compile": compiled,
        "shape": [m.image_size, m.image_size, m.channels],
        "png": png,
    }


def read_manifest(out: Path) -> dict | None:
    """OUT's manifest, or None when it has none (or one that is not a manifest)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == SAMPLES_FORMAT else None


def manifest_changes(previous: dict, current: dict) -> list[str]:
    """What differs between two manifests, as 'seed 0 -> 1' phrases; [] when they describe the same outputs."""
    current = json.loads(json.dumps(current))  # as read back: lists for tuples

    def shown(value) -> str:
        return value[:12] + "..." if isinstance(value, str) and len(value) > 16 else json.dumps(value)

    keys = [key for key in {**previous, **current} if key not in PROVENANCE_ONLY]
    return [
        f"{key} {shown(previous.get(key))} -> {shown(current.get(key))}"
        for key in keys
        if previous.get(key) != current.get(key)
    ]


def foreign_entries(out: Path) -> list[str]:
    """What in OUT `tdiff sample` did not write: anything but its files, folders and temporary files."""
    foreign = []
    for entry in sorted(out.iterdir()):
        pattern = OWN_FOLDERS.get(entry.name)
        if is_temporary(entry) or (entry.name in (MANIFEST, NPZ, GRID) and entry.is_file()):
            continue
        if pattern is not None and entry.is_dir():
            foreign += [
                f"{entry.name}/{file.name}"
                for file in sorted(entry.iterdir())
                if not (is_temporary(file) or (pattern.fullmatch(file.name) and file.is_file()))
            ]
        else:
            foreign.append(entry.name)
    return foreign


def check_output(out: Path, manifest: dict, *, overwrite: bool) -> None:
    """Refuse an OUT with files that are not tdiff sample's, and one with samples made otherwise
    (unless `overwrite`); an OUT with the same manifest is continued. Reads only."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; --out names a folder")
    foreign = foreign_entries(out)
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(
            f"--out {out} holds files that tdiff sample did not write ({listed}); "
            "choose a new or empty folder for --out"
        )
    if overwrite or all(is_temporary(entry) for entry in out.iterdir()):
        return
    previous = read_manifest(out)
    changes = [f"no readable {MANIFEST}"] if previous is None else manifest_changes(previous, manifest)
    if changes:
        raise UserError(
            f"--out {out} holds samples made with other settings ({'; '.join(changes[:3])}); "
            "add --overwrite to replace them, or choose another --out"
        )


def start_output(out: Path, manifest: dict, *, overwrite: bool) -> None:
    """Clear tdiff sample's earlier outputs (with `overwrite`) and leftover temporary files, create
    OUT and record the manifest. Call after `check_output`."""
    if out.is_dir():
        for entry in out.iterdir():
            if overwrite or is_temporary(entry):
                remove(entry)
            elif entry.is_dir():
                for file in entry.iterdir():
                    if is_temporary(file):
                        remove(file)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def remove(path: Path) -> None:
    """Delete a file, or a folder with everything in it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def finished_parts(out: Path) -> list[tuple[int, int, Path]]:
    """The batches already written to OUT/parts, as (start, stop, file), in order."""
    folder = out / PARTS
    if not folder.is_dir():
        return []
    matches = ((OWN_FOLDERS[PARTS].fullmatch(path.name), path) for path in folder.iterdir())
    return sorted((int(match[1]), int(match[2]), path) for match, path in matches if match)


def images_kept(out: Path, n: int) -> int:
    """How many of the n images OUT holds: all once samples.npz is there, else those in its parts."""
    if (out / NPZ).is_file():
        return n
    return sum(stop - start for start, stop, _ in finished_parts(out))


def missing_ranges(done: list[tuple[int, int]], n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """The batches (start, stop) still to generate: the gaps between the sorted `done` ranges in
    0..n, `batch_size` at a time."""
    position = 0
    for start, stop in [*done, (n, n)]:
        for first in range(position, start, batch_size):
            yield first, min(first + batch_size, start)
        position = max(position, stop)


def human_size(size: float) -> str:
    """Bytes as '307 GB', '1.5 TB', '12 MB' (powers of 1000, as disks are sold)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.0f} {unit}" if size >= 10 * scale else f"{size / scale:.1f} {unit}"
    return f"{size:.0f} bytes"


def check_disk_space(
    out: Path, n: int, shape: tuple[int, int, int], *, kept: int, conditional: bool, png: bool
) -> None:
    """Refuse an n whose samples.npz (plus the parts it is assembled from, and the PNGs) cannot fit
    on OUT's disk, before anything is generated; `kept` images are in OUT already (`images_kept`)."""
    if kept == n:
        return
    image_bytes = math.prod(shape)
    npz_bytes = n * (image_bytes + 8 * conditional)
    need = npz_bytes + (n - kept) * image_bytes * (2 if png else 1)  # a PNG: about the raw size
    free = shutil.disk_usage(next(p for p in (out, *out.parents) if p.exists())).free
    if need > free:
        h, w, c = shape
        labels = " + 8-byte labels" if conditional else ""
        total = (
            f", {human_size(need)} in all with the batch files{' and PNGs' if png else ''}" if need > npz_bytes else ""
        )
        raise UserError(
            f"-n {n}: samples.npz would need {human_size(npz_bytes)} ({n:,} x {h}x{w}x{c} bytes"
            f"{labels}){total}; {out} is on a disk with {human_size(free)} free"
        )


def write_batch(out: Path, start: int, images: np.ndarray, *, png: bool) -> None:
    """One finished batch: its PNGs (with `png`), then its part file, each written atomically."""
    if png:
        for k, image in enumerate(images, start):
            save_png(pil_image(image), out / PNG_DIR / f"{k:06d}.png")
    atomic_write(out / PARTS / f"{start:09d}-{start + len(images):09d}.npy", lambda file: np.save(file, images))


def sample_to_folder(
    denoiser: Callable,
    config: Config,
    plan: SamplingPlan,
    out: Path,
    n: int,
    *,
    seed: int = 0,
    labels: Labels | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    png: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **net_kwargs,
) -> int:
    """Generate the images OUT/parts does not hold yet, `batch_size` at a time, writing each batch
    when it is done (`write_batch`); returns how many this call generated. An interrupted call keeps
    its finished batches, and calling again continues; a finished OUT (with samples.npz) needs nothing.
    `progress(done, n)` after every batch."""
    if (out / NPZ).is_file():
        return 0
    done = [(start, stop) for start, stop, _ in finished_parts(out)]
    count = sum(stop - start for start, stop in done)
    (out / PARTS).mkdir(exist_ok=True)
    if png:
        (out / PNG_DIR).mkdir(exist_ok=True)
    generated = 0
    for start, stop in missing_ranges(done, n, batch_size):
        images = sample_range(
            denoiser,
            config,
            plan,
            start,
            stop,
            seed=seed,
            device=device,
            labels=labels.range(start, stop) if labels is not None else None,
            **net_kwargs,
        )
        write_batch(out, start, images, png=png)
        count, generated = count + stop - start, generated + stop - start
        if progress is not None:
            progress(count, n)
    return generated


def stored_images(parts: list[tuple[int, int, Path]]) -> Iterator[np.ndarray]:
    """The parts' images in order, one part in memory at a time, each image once."""
    position = 0
    for start, stop, path in parts:
        if stop > position:
            yield np.load(path)[position - start :]
            position = stop


def first_images(parts: list[tuple[int, int, Path]], count: int) -> np.ndarray:
    """The first `count` images of the parts (fewer if they hold fewer)."""
    chunks, held = [], 0
    for images in stored_images(parts):
        if held >= count:
            break
        chunks.append(images[: count - held])
        held += len(chunks[-1])
    return np.concatenate(chunks)


def write_npy_member(
    archive: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Iterable[np.ndarray]
) -> None:
    """One .npy member of a zip archive, written chunk by chunk: np.load reads it like np.save's."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    expected, written = math.prod(shape) * np.dtype(dtype).itemsize, 0
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks:
            written += member.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
    if written != expected:
        raise RunError(f"{name}: the parts hold {written:,} bytes where {expected:,} were expected")


def write_npz(
    file: BinaryIO, images: Iterable[np.ndarray], n: int, shape: tuple[int, int, int], labels: Labels | None
) -> None:
    """samples.npz as np.savez writes it (stored, zip64): `images` uint8 (n, H, W, C) from the chunks of
    `images`, and `labels` int64 (n,) from `labels` when given, with bounded memory."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        write_npy_member(archive, "images", np.uint8, (n, *shape), images)
        if labels is not None:
            write_npy_member(
                archive,
                "labels",
                np.int64,
                (n,),
                (labels.range(k, min(k + LABEL_CHUNK, n)).numpy() for k in range(0, n, LABEL_CHUNK)),
            )


def assemble_samples(out: Path, n: int, shape: tuple[int, int, int], labels: Labels | None) -> None:
    """grid.png from the first GRID_LIMIT images and samples.npz from all the parts (unless OUT has
    it already), then remove the parts: once samples.npz is there, OUT is finished."""
    if not (out / NPZ).is_file():
        parts = finished_parts(out)
        save_png(image_grid(first_images(parts, GRID_LIMIT)), out / GRID)
        atomic_write(out / NPZ, lambda file: write_npz(file, stored_images(parts), n, shape, labels))
    if (out / PARTS).is_dir():
        shutil.rmtree(out / PARTS)


def sample_outputs(out: Path, *, png: bool) -> dict[str, Path]:
    """The files of a finished OUT, by the summary's names."""
    return {
        "npz": out / NPZ,
        "grid": out / GRID,
        "manifest": out / MANIFEST,
        **({"png_dir": out / PNG_DIR} if png else {}),
    }


@contextlib.contextmanager
def output_errors(out: Path, n: int) -> Iterator[None]:
    """OSErrors while writing OUT as one line: an unwritable folder is a UserError (choose another
    --out), anything else (a full disk) a RunError saying what was kept."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        if isinstance(error, PermissionError) or error.errno == errno.EROFS:
            raise UserError(f"cannot write to --out {out} ({reason}); choose another --out") from None
        kept = images_kept(out, n) if out.is_dir() else 0
        then = f"; the {kept:,} images finished before are kept: run the same command again to continue" if kept else ""
        raise RunError(f"could not write samples to {out} ({reason}){then}") from None
