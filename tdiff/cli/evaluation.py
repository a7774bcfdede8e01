"""`tdiff eval`: FID and KID of a checkpoint (or images) against the training set."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from tdiff.cli import (
    CacheBoundaryOpt,
    CacheOpt,
    CacheSpanOpt,
    CfgOpt,
    DeviceChoice,
    DeviceOpt,
    EtaOpt,
    InceptionOpt,
    InferenceBatchOpt,
    InferenceCompileOpt,
    InferencePrecisionOpt,
    JsonOpt,
    MixedPrecision,
    NoEmaOpt,
    ProtocolChoice,
    SamplerChoice,
    SamplerOpt,
    SeedOpt,
    StageBars,
    StepsOpt,
    _block_cache,
    _cache_report,
    _inference_precision,
    app,
    print_json,
    stderr,
    stdout,
)
from tdiff.errors import UserError

if TYPE_CHECKING:  # the CLI imports torch and numpy only when a command runs
    import numpy as np

    from tdiff.run import RunDir
    from tdiff.sample import LoadedModel, SamplingPlan


def _eval_data(data: str | None, run) -> tuple[str | None, Path | None]:
    """--data, else the training data of the run (a RunDir or None) from its run.json: (source, data_dir or None)."""
    saved = run.read_record() if data is None and run is not None else None
    if saved is None:
        return data, None
    from tdiff.data import KNOWN_SOURCES

    if saved.data not in KNOWN_SOURCES and not Path(saved.data).expanduser().exists():
        raise UserError(
            f"{run.path}/run.json names the training data '{saved.data}', which is not found "
            "from here; pass --data PATH (or --ref)"
        )
    return saved.data, Path(saved.data_dir)


def _eval_table(result: dict) -> Table:
    metrics = " / ".join(name for name in ("FID", "KID") if name.lower() in result)
    float32 = "fid_float64" in result or "kid_float64" in result
    table = Table(
        title=f"{metrics}, {result['protocol']} protocol",
        show_header=False,
        caption="FID and KID in float32 as k-diffusion computes them (the paper's numbers); "
        "float64: the accurate values"
        if float32
        else None,
    )
    table.add_column("", no_wrap=True)
    table.add_column("", justify="right")
    rows = [
        ("FID", result.get("fid"), "{:.3f}"),
        ("FID, float64", result.get("fid_float64"), "{:.3f}"),
        ("KID", result.get("kid"), "{:.6f}"),
        ("KID, float64", result.get("kid_float64"), "{:.6f}"),
        ("KID x 10^4", result.get("kid_x1e4"), "{:.2f}"),
        ("generated images", result.get("n_fake"), "{:,}"),
        ("reference images", result.get("n_ref"), "{:,}"),
        ("sampler", result.get("sampler"), "{}"),
        ("sampler steps", result.get("steps"), "{}"),
        ("network precision", result.get("precision"), "{}"),
        ("checkpoint step", result.get("step"), "{}"),
    ]
    for label, value, fmt in rows:
        if value is not None:
            table.add_row(label, fmt.format(value))
    return table


EXAMPLES = """[bold]Examples[/bold]

  tdiff eval runs/d2s8i-cifar10 --fid --kid

  tdiff eval runs/d2s8i-cifar10 --protocol paper

  tdiff eval --images samples/run/samples.npz --data cifar10 --fid

  tdiff eval ema.safetensors -n 10000 --ref stats/cifar10-train.npz --inception ~/inception-2015-12-05.pt
"""
CheckpointOpt = Annotated[
    Optional[Path],
    typer.Argument(
        metavar="[CKPT]",
        show_default=False,
        help="A checkpoint file, step directory or run directory to sample from (or use --images).",
    ),
]
FidOpt = Annotated[bool, typer.Option("--fid", help="Compute FID. \\[default: FID and KID]")]
KidOpt = Annotated[bool, typer.Option("--kid", help="Compute KID (raw and x 10^4). \\[default: FID and KID]")]
NumOpt = Annotated[
    Optional[int],
    typer.Option(
        "--num", "-n", min=2, show_default=False, help="Images to generate. \\[default: 50,000 (clean), 2,000 (paper)]"
    ),
]
ProtocolOpt = Annotated[
    ProtocolChoice,
    typer.Option(
        help="clean: FID-50K style, the checkpoint's sampler, the whole training set, clean-fid's resize. "
        "paper: 2,000 samples, DPM++(2M) SDE eta 0 heun 50 steps, no guidance, vs 2,000 training "
        "images, k-diffusion's resize, unrounded samples, FID/KID in k-diffusion's float32 (float64 "
        "beside) (docs/evaluation.md)."
    ),
]
ImagesOpt = Annotated[
    Optional[Path],
    typer.Option(
        metavar="DIR|NPZ",
        show_default=False,
        help="Score these images (a PNG/JPG folder or samples.npz) instead of sampling a checkpoint.",
    ),
]
RefOpt = Annotated[
    Optional[Path],
    typer.Option(
        metavar="PATH",
        show_default=False,
        help="The reference: statistics (.npz with mu, sigma[, feats]), or images (a folder or an .npz). "
        "\\[default: the training data, statistics cached in ~/.cache/tdiff]",
    ),
]
DataOpt = Annotated[
    Optional[str],
    typer.Option(
        show_default=False,
        help="Training data for the reference (cifar10, artbench10, a folder, an .npz). "
        "\\[default: the run's, from run.json]",
    ),
]
DataDirOpt = Annotated[
    Optional[Path],
    typer.Option(show_default=False, help="Where cifar10/artbench10 live. \\[default: the run's, else ./data]"),
]


@dataclass(frozen=True)
class SamplingChoices:
    """The options of `tdiff eval` that say how a checkpoint is sampled (none go with --images)."""

    sampler: SamplerChoice | None
    steps: int | None
    eta: float | None
    cfg_scale: float | None
    cache: tuple[int | None, int | None, int | None]  # --cache, --cache-span, --cache-boundary
    precision: MixedPrecision | None
    compile: bool
    batch_size: int | None

    def given(self) -> bool:
        values = (self.sampler, self.steps, self.eta, self.cfg_scale, self.cache[0], self.precision, self.batch_size)
        return self.compile or any(value is not None for value in values)


@dataclass
class Fakes:
    """What is scored: a checkpoint to sample (with everything about how), or images already made."""

    n: int
    loaded: LoadedModel | None = None
    run: RunDir | None = None  # the run CKPT lies in, where the record goes
    plan: SamplingPlan | None = None
    net_kwargs: dict = field(default_factory=dict)  # {"block_cache": BlockCache} with --cache
    precision: str = "no"
    choices: SamplingChoices | None = None
    images: np.ndarray | None = None  # --images, uint8 (N, H, W, C)

    @property
    def image_size(self) -> int:
        return self.loaded.config.model.image_size if self.loaded else self.images.shape[1]


@app.command("eval", epilog=EXAMPLES)
def eval_command(
    checkpoint: CheckpointOpt = None,
    fid: FidOpt = False,
    kid: KidOpt = False,
    n: NumOpt = None,
    protocol: ProtocolOpt = ProtocolChoice.clean,
    images: ImagesOpt = None,
    ref: RefOpt = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    inception: InceptionOpt = None,
    sampler: SamplerOpt = None,
    steps: StepsOpt = None,
    eta: EtaOpt = None,
    cfg_scale: CfgOpt = None,
    cache: CacheOpt = None,
    cache_span: CacheSpanOpt = None,
    cache_boundary: CacheBoundaryOpt = None,
    seed: SeedOpt = 0,
    batch_size: InferenceBatchOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    mixed_precision: InferencePrecisionOpt = None,
    compile_blocks: InferenceCompileOpt = False,
    no_ema: NoEmaOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score a checkpoint (or images) with FID and KID against the training set.

    Samples `-n` images (uniform random labels from --seed), extracts Inception features and compares
    them with reference statistics of the training data, computed once and cached as an .npz in tdiff's
    cache folder ($TDIFF_CACHE_DIR, else $XDG_CACHE_HOME/tdiff or ~/.cache/tdiff). When CKPT lies in a
    run directory the result is appended to its metrics.jsonl (kind "eval"), which `tdiff compare` reads.
    """
    from tdiff import evaluate
    from tdiff.sample import resolve_device

    chosen = evaluate.get_protocol(protocol.value)
    torch_device = resolve_device(device.value)
    choices = SamplingChoices(
        sampler, steps, eta, cfg_scale, (cache, cache_span, cache_boundary), mixed_precision, compile_blocks, batch_size
    )
    # Everything that can be wrong is checked before the long part: checkpoint, plan, data, weights.
    if checkpoint is None:
        fakes = _given_images(images, choices)
    else:
        fakes = _checkpoint_fakes(checkpoint, images, chosen, n, torch_device, choices, no_ema=no_ema)
    reference_source = _reference_source(ref, data, data_dir, fakes)
    extractor = evaluate.load_inception(inception, device=torch_device, resize=chosen.resize)
    result = _scored(fakes, reference_source, extractor, chosen, (fid, kid, ref), seed, torch_device, quiet=as_json)
    result.update(images=str(images) if images else None, metrics=_record(fakes, result, chosen.name))
    if as_json:
        print_json(result)
        return
    stdout.print(_eval_table(result))
    if result["metrics"]:
        stderr.print(f"appended to {result['metrics']}", highlight=False)


def _scored(
    fakes: Fakes, reference_source: tuple, extractor, protocol, wanted: tuple, seed: int, device, *, quiet: bool
) -> dict:
    """The reference, then the fakes' FID/KID against it, with progress bars; the result with its timing."""
    from tdiff import evaluate

    started = time.perf_counter()
    with StageBars(quiet=quiet) as bars:
        reference = _reference(reference_source, extractor, protocol, fakes, bars)
        want_fid, want_kid = _metrics(*wanted, reference)
        if fakes.loaded is not None:
            result = _sample_and_score(fakes, reference, extractor, protocol, (want_fid, want_kid), seed, device, bars)
        else:
            features = lambda done, total: bars("features", done, total)  # noqa: E731
            result = evaluate.score(
                fakes.images, reference, extractor, protocol=protocol, fid=want_fid, kid=want_kid, progress=features
            )
            result["n"] = fakes.n
    loaded = fakes.loaded
    return {
        **result,
        "protocol": protocol.name,
        "step": loaded.step if loaded else None,
        "seconds": time.perf_counter() - started,
        "checkpoint": str(loaded.path) if loaded else None,
    }


def _given_images(images: Path | None, choices: SamplingChoices) -> Fakes:
    """--images: the images to score; sampling options make no sense with them."""
    from tdiff.evaluate import load_images

    if images is None:
        raise UserError("give either CKPT (to sample and score) or --images DIR|NPZ (to score), not neither")
    if choices.given():
        raise UserError("--images scores images already made; the sampling options go with CKPT")
    fakes = load_images(images)
    return Fakes(len(fakes), images=fakes)


def _checkpoint_fakes(
    checkpoint: Path, images: Path | None, protocol, n: int | None, device, choices: SamplingChoices, *, no_ema: bool
) -> Fakes:
    """CKPT: the weights, their run, the protocol's plan with the given changes, the cache and precision."""
    from tdiff.evaluate import protocol_plan
    from tdiff.run import RunDir
    from tdiff.sample import load_denoiser

    if images is not None:
        raise UserError("give either CKPT (to sample and score) or --images DIR|NPZ (to score), not both")
    loaded = load_denoiser(checkpoint, ema=not no_ema, device=device)
    sampler = choices.sampler.value if choices.sampler else None
    plan = protocol_plan(
        protocol, loaded.config, sampler=sampler, steps=choices.steps, eta=choices.eta, cfg_scale=choices.cfg_scale
    )
    net_kwargs = _block_cache(loaded.config, plan, *choices.cache)
    precision = _inference_precision(choices.precision, device)
    return Fakes(n or protocol.n, loaded, RunDir.of_weights(loaded.path), plan, net_kwargs, precision, choices)


def _reference_source(ref: Path | None, data: str | None, data_dir: Path | None, fakes: Fakes) -> tuple:
    """("ref", PATH) or ("data", source, folder): where the reference comes from, checked before sampling."""
    if ref is not None:
        return "ref", ref
    source, saved_dir = _eval_data(data, fakes.run)
    if source is None:
        raise UserError(
            "no reference: pass --data (the training data) or --ref PATH"
            + ("" if fakes.loaded is None else "; CKPT is not inside a run directory with a run.json")
        )
    return "data", source, data_dir or saved_dir or Path("data")


def _reference(source: tuple, extractor, protocol, fakes: Fakes, bars: StageBars):
    """The reference statistics (computed once, then read from tdiff's cache)."""
    from tdiff import evaluate

    progress = lambda done, total: bars("reference", done, total)  # noqa: E731
    if source[0] == "ref":
        return evaluate.reference_from_path(source[1], extractor, progress=progress)
    from tdiff.data import open_dataset

    training = open_dataset(source[1], source[2], fakes.image_size)
    return evaluate.training_reference(training, extractor, protocol, fakes.n, progress=progress)


def _metrics(fid: bool, kid: bool, ref: Path | None, reference) -> tuple[bool, bool]:
    """(FID wanted, KID wanted): both without --fid/--kid; KID dropped when the reference has no features
    unless --kid asked for it (then an error)."""
    want_fid, want_kid = (fid, kid) if (fid or kid) else (True, True)
    if want_kid and reference.feats is None:
        if kid:
            raise UserError(
                f"--kid needs reference features, and {ref} holds only mu and sigma; "
                "ask for --fid only, or pass reference images"
            )
        want_kid = False
    return want_fid, want_kid


def _sample_and_score(
    fakes: Fakes, reference, extractor, protocol, wanted: tuple[bool, bool], seed: int, device, progress
) -> dict:
    """Sample the checkpoint as the choices say (precision, compile, batch) and score the images."""
    from tdiff import evaluate
    from tdiff.sample import prepare_inference

    loaded, choices = fakes.loaded, fakes.choices
    inference = prepare_inference(
        loaded.denoiser,
        loaded.config,
        fakes.plan,
        device,
        fakes.n,
        precision=fakes.precision,
        compile=choices.compile,
        batch_size=choices.batch_size,
        cached=bool(fakes.net_kwargs),
    )
    result = evaluate.evaluate_checkpoint(
        inference.denoiser,
        loaded.config,
        reference,
        extractor,
        protocol=protocol,
        plan=fakes.plan,
        n=fakes.n,
        seed=seed,
        batch_size=inference.batch_size,
        device=device,
        fid=wanted[0],
        kid=wanted[1],
        progress=progress,
        **fakes.net_kwargs,
    )
    return {
        **result,
        "cache": _cache_report(fakes.net_kwargs),
        "precision": fakes.precision,
        "compile": choices.compile,
        "batch_size": inference.batch_size,
    }


def _record(fakes: Fakes, result: dict, protocol: str) -> str | None:
    """Append the result to the run's metrics.jsonl when CKPT is a step of a run; the file's path, or None."""
    if fakes.run is None or fakes.loaded.step is None:
        return None
    from tdiff.evaluate import eval_record
    from tdiff.run import METRICS

    fakes.run.append_metrics(eval_record(fakes.loaded.step, result, protocol))
    return str(fakes.run.path / METRICS)
