"""`tdiff sample`: generate images from a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from tdiff.cli import (CacheBoundaryOpt, CacheOpt, CacheSpanOpt, CfgOpt, CheckpointArg, DeviceChoice, DeviceOpt,
                       EtaOpt, InferenceBatchOpt, InferenceCompileOpt, InferencePrecisionOpt, JsonOpt, NoEmaOpt,
                       SamplerOpt, SeedOpt, StageBars, StepsOpt, _block_cache, _cache_report, _checkpoint_label,
                       app, print_json, stderr, stdout)


@app.command(epilog="""[bold]Examples[/bold]

  tdiff sample runs/d2s8i-cifar10 -n 64

  tdiff sample ema.safetensors -n 16 --sampler heun --steps 35 --out grid16

  tdiff sample runs/d2s8i-cifar10 -n 100 --class 3 --cfg-scale 2 --png

  tdiff sample model.safetensors -n 1000 --batch-size 250 --seed 1000 --json

  tdiff sample runs/d2s8i-cifar10 -n 50000 --mixed-precision bf16 --compile
""")
def sample(
    checkpoint: CheckpointArg,
    n: Annotated[int, typer.Option("--num", "-n", min=1, metavar="N", help="Images to generate.")] = 64,
    sampler: SamplerOpt = None,
    steps: StepsOpt = None,
    sigma_min: Annotated[Optional[float], typer.Option(
        show_default=False, help="Lowest noise level, > 0. \\[default: the checkpoint's diffusion.sigma_min]")] = None,
    sigma_max: Annotated[Optional[float], typer.Option(
        show_default=False, help="Highest noise level. \\[default: the checkpoint's diffusion.sigma_max]")] = None,
    rho: Annotated[Optional[float], typer.Option(
        show_default=False, help="Karras schedule curvature, > 0. \\[default: the checkpoint's sample.rho]")] = None,
    eta: EtaOpt = None,
    cfg_scale: CfgOpt = None,
    cache: CacheOpt = None,
    cache_span: CacheSpanOpt = None,
    cache_boundary: CacheBoundaryOpt = None,
    classes: Annotated[Optional[str], typer.Option(
        "--class", metavar="LABEL[,LABEL...]|spread|random", show_default=False,
        help="Class labels: one, a comma list repeated over the images, 'random' (from the seed), or "
             "'spread' (0, 1, ..., C-1, 0, ...). \\[default: spread]")] = None,
    seed: SeedOpt = 0,
    batch_size: InferenceBatchOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    mixed_precision: InferencePrecisionOpt = None,
    compile_blocks: InferenceCompileOpt = False,
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder; a call that stopped continues in it. \\[default: samples/<run>-<step>-<weights>]",
        show_default=False)] = None,
    png: Annotated[bool, typer.Option("--png", help="Also write each image as OUT/images/NNNNNN.png.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace what an earlier tdiff sample wrote in OUT with other settings "
                            "(never files it did not write).")] = False,
    no_ema: NoEmaOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate images from a checkpoint: samples.npz, a grid PNG (and PNG files with --png).

    The checkpoint carries its configuration, so no preset is needed; sampler settings default to its
    sample section. samples.npz holds `images` (uint8, N x H x W x C) and `labels` (class models);
    grid.png shows the first 256 images. Images are written batch by batch: running the same command
    again after an interruption continues where it stopped, with the same result.
    """
    from tdiff import sample as sampling

    torch_device = sampling.resolve_device(device.value)
    loaded = sampling.load_denoiser(checkpoint, ema=not no_ema, device=torch_device)
    config, m = loaded.config, loaded.config.model
    plan = sampling.make_plan(config, sampler=sampler.value if sampler else None, steps=steps, sigma_min=sigma_min,
                              sigma_max=sigma_max, rho=rho, eta=eta, cfg_scale=cfg_scale)
    labels = sampling.parse_labels(classes, m.num_classes, seed)
    net_kwargs = _block_cache(config, plan, cache, cache_span, cache_boundary)
    out = out or Path("samples") / _checkpoint_label(loaded)
    shape = (m.image_size, m.image_size, m.channels)
    precision, warning = sampling.resolve_precision(mixed_precision and mixed_precision.value, torch_device)
    if warning:
        stderr.print(f"warning: {warning}", highlight=False)
    manifest = sampling.sample_manifest(loaded, plan, n=n, seed=seed, labels=labels, png=png,
                                        cache=net_kwargs["block_cache"].plan if net_kwargs else None,
                                        precision=precision, compiled=compile_blocks)
    with sampling.output_errors(out, n):
        sampling.check_output(out, manifest, overwrite=overwrite)
        kept = 0 if overwrite else sampling.images_kept(out, n)
        sampling.check_disk_space(out, n, shape, kept=kept, conditional=labels is not None, png=png)
        sampling.start_output(out, manifest, overwrite=overwrite)
        started = time.perf_counter()
        inference = sampling.prepare_inference(loaded.denoiser, config, plan, torch_device, n, precision=precision,
                                               compile=compile_blocks, batch_size=batch_size, cached=bool(net_kwargs))
        try:
            with StageBars(quiet=as_json) as bars:
                generated = sampling.sample_to_folder(
                    inference.denoiser, config, plan, out, n, seed=seed, labels=labels,
                    batch_size=inference.batch_size, device=torch_device, png=png,
                    progress=lambda done, total: bars("sample", done, total), **net_kwargs)
        except KeyboardInterrupt:
            stderr.print(f"interrupted: {sampling.images_kept(out, n):,} of {n:,} images are kept in {out}; "
                         "run the same command again to continue", highlight=False)
            raise typer.Exit(130) from None
        seconds = time.perf_counter() - started
        sampling.assemble_samples(out, n, shape, labels)
    written = sampling.sample_outputs(out, png=png)
    summary = {"checkpoint": str(loaded.path), "step": loaded.step, "n": n, "generated": generated, "seed": seed,
               "sampler": plan.sampler, "steps": plan.steps, "sigma_min": plan.sigma_min,
               "sigma_max": plan.sigma_max, "rho": plan.rho, **plan.options, "cfg_scale": plan.cfg_scale,
               "classes": labels.spec if labels else None, "device": str(torch_device),
               "precision": precision, "compile": compile_blocks, "batch_size": inference.batch_size,
               "seconds": seconds, "images_per_second": generated / max(seconds, 1e-9),
               "cache": _cache_report(net_kwargs), **{k: str(v) for k, v in written.items()}}
    if as_json:
        print_json(summary)
        return
    for path in written.values():
        stdout.print(str(path), highlight=False, soft_wrap=True)
    if not generated:
        stderr.print(f"{out} holds these {n:,} images already; nothing to do", highlight=False)
        return
    before = f"; {kept:,} were in {out} already" if kept else ""
    skipped = f", {summary['cache']['skipped_fraction']:.1%} of block applications cached" if net_kwargs else ""
    stderr.print(f"{generated:,} images ({plan.sampler}, {plan.steps} steps) in {seconds:.1f}s, "
                 f"{summary['images_per_second']:.1f} img/s on {torch_device}{skipped}{before}", highlight=False)
