"""`tdiff sample`: generate images from a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from tdiff.cli import (CacheBoundaryOpt, CacheOpt, CacheSpanOpt, CfgOpt, CheckpointArg, DeviceChoice, DeviceOpt,
                       EtaOpt, JsonOpt, NoEmaOpt, SamplerOpt, SeedOpt, StageBars, StepsOpt, _block_cache,
                       _cache_report, _checkpoint_label, app, print_json, stderr, stdout)


@app.command(epilog="""[bold]Examples[/bold]

  tdiff sample runs/d2s8i-cifar10 -n 64

  tdiff sample ema.safetensors -n 16 --sampler heun --steps 35 --out grid16

  tdiff sample runs/d2s8i-cifar10 -n 100 --class 3 --cfg-scale 2 --png

  tdiff sample model.safetensors -n 1000 --batch-size 250 --seed 1000 --json
""")
def sample(
    checkpoint: CheckpointArg,
    n: Annotated[int, typer.Option("--num", "-n", min=1, help="Images to generate.")] = 64,
    sampler: SamplerOpt = None,
    steps: StepsOpt = None,
    sigma_min: Annotated[Optional[float], typer.Option(
        min=0, show_default=False,
        help="Lowest noise level. \\[default: the checkpoint's diffusion.sigma_min]")] = None,
    sigma_max: Annotated[Optional[float], typer.Option(
        min=0, show_default=False,
        help="Highest noise level. \\[default: the checkpoint's diffusion.sigma_max]")] = None,
    rho: Annotated[Optional[float], typer.Option(
        min=0, help="Karras schedule curvature. \\[default: the checkpoint's sample.rho]", show_default=False)] = None,
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
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass; the images do not depend on it.")]
        = 64,
    device: DeviceOpt = DeviceChoice.auto,
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder. \\[default: samples/<run>-<step>-<weights>]", show_default=False)] = None,
    png: Annotated[bool, typer.Option("--png", help="Also write each image as OUT/images/NNNNNN.png.")] = False,
    no_ema: NoEmaOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate images from a checkpoint: a grid PNG and samples.npz (and PNG files with --png).

    The checkpoint carries its configuration, so no preset is needed; sampler settings default to its
    sample section. samples.npz holds `images` (uint8, N x H x W x C) and `labels` (class models).
    """
    from tdiff.sample import choose_labels, generate, load_denoiser, make_plan, resolve_device, write_samples

    torch_device = resolve_device(device.value)
    loaded = load_denoiser(checkpoint, ema=not no_ema, device=torch_device)
    config = loaded.config
    plan = make_plan(config, sampler=sampler.value if sampler else None, steps=steps, sigma_min=sigma_min,
                     sigma_max=sigma_max, rho=rho, eta=eta, cfg_scale=cfg_scale)
    labels = choose_labels(classes, n, config.model.num_classes, seed)
    net_kwargs = _block_cache(config, plan, cache, cache_span, cache_boundary)
    out = out or Path("samples") / _checkpoint_label(loaded)
    with StageBars(quiet=as_json) as bars:
        started = time.perf_counter()
        images = generate(loaded.denoiser, config, plan, n, seed=seed, labels=labels, batch_size=batch_size,
                          device=torch_device, progress=lambda done, total: bars("sample", done, total),
                          **net_kwargs)
        seconds = time.perf_counter() - started
    written = write_samples(out, images, labels, png=png)
    summary = {"checkpoint": str(loaded.path), "step": loaded.step, "n": n, "seed": seed,
               "sampler": plan.sampler, "steps": plan.steps, "sigma_min": plan.sigma_min,
               "sigma_max": plan.sigma_max, "rho": plan.rho, **plan.options, "cfg_scale": plan.cfg_scale,
               "classes": classes or ("spread" if config.model.num_classes else None),
               "device": str(torch_device), "batch_size": batch_size, "seconds": seconds,
               "images_per_second": n / max(seconds, 1e-9), "cache": _cache_report(net_kwargs),
               **{k: str(v) for k, v in written.items()}}
    if as_json:
        print_json(summary)
        return
    for path in written.values():
        stdout.print(str(path), highlight=False, soft_wrap=True)
    skipped = f", {summary['cache']['skipped_fraction']:.1%} of block applications cached" if net_kwargs else ""
    stderr.print(f"{n} images ({plan.sampler}, {plan.steps} steps) in {seconds:.1f}s, "
                 f"{summary['images_per_second']:.1f} img/s on {torch_device}{skipped}", highlight=False)
