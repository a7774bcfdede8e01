"""`tdiff sample`: generate images from a checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from tdiff.cli import (
    CacheBoundaryOpt,
    CacheOpt,
    CacheSpanOpt,
    CfgOpt,
    CheckpointArg,
    DeviceChoice,
    DeviceOpt,
    EtaOpt,
    InferenceBatchOpt,
    InferenceCompileOpt,
    InferencePrecisionOpt,
    JsonOpt,
    NoEmaOpt,
    SamplerOpt,
    SeedOpt,
    StageBars,
    StepsOpt,
    _block_cache,
    _cache_report,
    _checkpoint_label,
    _inference_precision,
    app,
    print_json,
    stderr,
    stdout,
)

if TYPE_CHECKING:  # the CLI imports torch only when a command runs
    import torch

    from tdiff.sample import Inference, Labels, LoadedModel, SamplingPlan


EXAMPLES = """[bold]Examples[/bold]

  tdiff sample runs/d2s8i-cifar10 -n 64

  tdiff sample ema.safetensors -n 16 --sampler heun --steps 35 --out grid16

  tdiff sample runs/d2s8i-cifar10 -n 100 --class 3 --cfg-scale 2 --png

  tdiff sample model.safetensors -n 1000 --batch-size 250 --seed 1000 --json

  tdiff sample runs/d2s8i-cifar10 -n 50000 --mixed-precision bf16 --compile
"""
NumOpt = Annotated[int, typer.Option("--num", "-n", min=1, metavar="N", help="Images to generate.")]
SigmaMinOpt = Annotated[
    Optional[float],
    typer.Option(show_default=False, help="Lowest noise level, > 0. \\[default: the checkpoint's diffusion.sigma_min]"),
]
SigmaMaxOpt = Annotated[
    Optional[float],
    typer.Option(show_default=False, help="Highest noise level. \\[default: the checkpoint's diffusion.sigma_max]"),
]
RhoOpt = Annotated[
    Optional[float],
    typer.Option(show_default=False, help="Karras schedule curvature, > 0. \\[default: the checkpoint's sample.rho]"),
]
ClassOpt = Annotated[
    Optional[str],
    typer.Option(
        "--class",
        metavar="LABEL[,LABEL...]|spread|random",
        show_default=False,
        help="Class labels: one, a comma list repeated over the images, 'random' (from the seed), or "
        "'spread' (0, 1, ..., C-1, 0, ...). \\[default: spread]",
    ),
]
OutOpt = Annotated[
    Optional[Path],
    typer.Option(
        help="Output folder; a call that stopped continues in it. \\[default: samples/<run>-<step>-<weights>]",
        show_default=False,
    ),
]
PngOpt = Annotated[bool, typer.Option("--png", help="Also write each image as OUT/images/NNNNNN.png.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace what an earlier tdiff sample wrote in OUT with other settings (never files it did not write).",
    ),
]


@dataclass
class SampleJob:
    """One `tdiff sample` call, checked: what to generate, how, and where."""

    loaded: LoadedModel
    plan: SamplingPlan
    labels: Labels | None
    net_kwargs: dict  # {"block_cache": BlockCache} with --cache, else {}
    device: torch.device
    precision: str
    compile: bool
    n: int
    seed: int
    out: Path
    png: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        m = self.loaded.config.model
        return m.image_size, m.image_size, m.channels


@app.command(epilog=EXAMPLES)
def sample(
    checkpoint: CheckpointArg,
    n: NumOpt = 64,
    sampler: SamplerOpt = None,
    steps: StepsOpt = None,
    sigma_min: SigmaMinOpt = None,
    sigma_max: SigmaMaxOpt = None,
    rho: RhoOpt = None,
    eta: EtaOpt = None,
    cfg_scale: CfgOpt = None,
    cache: CacheOpt = None,
    cache_span: CacheSpanOpt = None,
    cache_boundary: CacheBoundaryOpt = None,
    classes: ClassOpt = None,
    seed: SeedOpt = 0,
    batch_size: InferenceBatchOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    mixed_precision: InferencePrecisionOpt = None,
    compile_blocks: InferenceCompileOpt = False,
    out: OutOpt = None,
    png: PngOpt = False,
    overwrite: OverwriteOpt = False,
    no_ema: NoEmaOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate images from a checkpoint: samples.npz, a grid PNG (and PNG files with --png).

    The checkpoint carries its configuration, so no preset is needed; sampler settings default to its
    sample section. samples.npz holds `images` (uint8, N x H x W x C) and `labels` (class models);
    grid.png shows the first 256 images. Images are written batch by batch: running the same command
    again after an interruption continues where it stopped, with the same result.
    """
    job = _job(
        checkpoint,
        no_ema,
        device,
        (sampler, steps, sigma_min, sigma_max, rho, eta, cfg_scale),
        (cache, cache_span, cache_boundary),
        classes,
        seed,
        n,
        (mixed_precision, compile_blocks),
        out,
        png,
    )
    summary = _run(job, batch_size=batch_size, overwrite=overwrite, quiet=as_json)
    if as_json:
        print_json(summary)
    else:
        _report(job, summary)


def _job(
    checkpoint: Path,
    no_ema: bool,
    device: DeviceChoice,
    plan_values: tuple,
    cache: tuple,
    classes: str | None,
    seed: int,
    n: int,
    speed: tuple,
    out: Path | None,
    png: bool,
) -> SampleJob:
    """The command's options checked and resolved: the weights, the sampling plan (the checkpoint's [sample]
    with `plan_values` = (sampler, steps, sigma_min, sigma_max, rho, eta, cfg_scale) changed), labels, cache,
    (precision, compile) and the output folder."""
    from tdiff import sample as sampling

    torch_device = sampling.resolve_device(device.value)
    loaded = sampling.load_denoiser(checkpoint, ema=not no_ema, device=torch_device)
    sampler, steps, sigma_min, sigma_max, rho, eta, cfg_scale = plan_values
    plan = sampling.make_plan(
        loaded.config,
        sampler=sampler.value if sampler else None,
        steps=steps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
        eta=eta,
        cfg_scale=cfg_scale,
    )
    labels = sampling.parse_labels(classes, loaded.config.model.num_classes, seed)
    net_kwargs = _block_cache(loaded.config, plan, *cache)
    precision = _inference_precision(speed[0], torch_device)
    out = out or Path("samples") / _checkpoint_label(loaded)
    return SampleJob(loaded, plan, labels, net_kwargs, torch_device, precision, speed[1], n, seed, out, png)


def _run(job: SampleJob, *, batch_size: int | None, overwrite: bool, quiet: bool) -> dict:
    """Check and prepare OUT, generate what it lacks, assemble it; the summary of the call."""
    from tdiff import sample as sampling

    cache = job.net_kwargs["block_cache"].plan if job.net_kwargs else None
    manifest = sampling.sample_manifest(
        job.loaded,
        job.plan,
        n=job.n,
        seed=job.seed,
        labels=job.labels,
        png=job.png,
        cache=cache,
        precision=job.precision,
        compiled=job.compile,
    )
    with sampling.output_errors(job.out, job.n):
        sampling.check_output(job.out, manifest, overwrite=overwrite)
        kept = 0 if overwrite else sampling.images_kept(job.out, job.n)
        sampling.check_disk_space(job.out, job.n, job.shape, kept=kept, conditional=job.labels is not None, png=job.png)
        sampling.start_output(job.out, manifest, overwrite=overwrite)
        started = time.perf_counter()
        inference = sampling.prepare_inference(
            job.loaded.denoiser,
            job.loaded.config,
            job.plan,
            job.device,
            job.n,
            precision=job.precision,
            compile=job.compile,
            batch_size=batch_size,
            cached=bool(job.net_kwargs),
        )
        generated = _generate(job, inference, quiet)
        seconds = time.perf_counter() - started
        sampling.assemble_samples(job.out, job.n, job.shape, job.labels)
    return _summary(job, generated=generated, kept=kept, seconds=seconds, batch_size=inference.batch_size)


def _generate(job: SampleJob, inference: Inference, quiet: bool) -> int:
    """The missing images into OUT, with a progress bar; Ctrl-C keeps the finished batches (exit 130)."""
    from tdiff import sample as sampling

    try:
        with StageBars(quiet=quiet) as bars:
            return sampling.sample_to_folder(
                inference.denoiser,
                job.loaded.config,
                job.plan,
                job.out,
                job.n,
                seed=job.seed,
                labels=job.labels,
                batch_size=inference.batch_size,
                device=job.device,
                png=job.png,
                progress=lambda done, total: bars("sample", done, total),
                **job.net_kwargs,
            )
    except KeyboardInterrupt:
        stderr.print(
            f"interrupted: {sampling.images_kept(job.out, job.n):,} of {job.n:,} images are kept in "
            f"{job.out}; run the same command again to continue",
            highlight=False,
        )
        raise typer.Exit(130) from None


def _summary(job: SampleJob, *, generated: int, kept: int, seconds: float, batch_size: int) -> dict:
    from tdiff.sample import sample_outputs

    plan = job.plan
    written = sample_outputs(job.out, png=job.png)
    return {
        "checkpoint": str(job.loaded.path),
        "step": job.loaded.step,
        "n": job.n,
        "generated": generated,
        "kept": kept,
        "seed": job.seed,
        "sampler": plan.sampler,
        "steps": plan.steps,
        "sigma_min": plan.sigma_min,
        "sigma_max": plan.sigma_max,
        "rho": plan.rho,
        **plan.options,
        "cfg_scale": plan.cfg_scale,
        "classes": job.labels.spec if job.labels else None,
        "device": str(job.device),
        "precision": job.precision,
        "compile": job.compile,
        "batch_size": batch_size,
        "seconds": seconds,
        "images_per_second": generated / max(seconds, 1e-9),
        "cache": _cache_report(job.net_kwargs),
        **{k: str(v) for k, v in written.items()},
    }


def _report(job: SampleJob, summary: dict) -> None:
    """The written paths on stdout, one line of what was done on stderr."""
    for key in ("npz", "grid", "manifest", "png_dir"):
        if key in summary:
            stdout.print(summary[key], highlight=False, soft_wrap=True)
    generated, kept = summary["generated"], summary["kept"]
    if not generated:
        stderr.print(f"{job.out} holds these {job.n:,} images already; nothing to do", highlight=False)
        return
    before = f"; {kept:,} were in {job.out} already" if kept else ""
    cache = summary["cache"]
    skipped = f", {cache['skipped_fraction']:.1%} of block applications cached" if cache else ""
    stderr.print(
        f"{generated:,} images ({job.plan.sampler}, {job.plan.steps} steps) in {summary['seconds']:.1f}s, "
        f"{summary['images_per_second']:.1f} img/s on {job.device}{skipped}{before}",
        highlight=False,
    )
