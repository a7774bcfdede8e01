"""`tdiff eval`: FID and KID of a checkpoint (or images) against the training set."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tdiff.cli import (CacheBoundaryOpt, CacheOpt, CacheSpanOpt, CfgOpt, DeviceChoice, DeviceOpt, EtaOpt,
                       InceptionOpt, InferenceBatchOpt, InferenceCompileOpt, InferencePrecisionOpt, JsonOpt,
                       NoEmaOpt, ProtocolChoice, SamplerOpt, SeedOpt, StageBars, StepsOpt, _block_cache,
                       _cache_report, app, print_json, stderr, stdout)
from tdiff.errors import UserError


def _eval_data(data: str | None, run) -> tuple[str | None, Path | None]:
    """--data, else the training data of the run (a RunDir or None) from its run.json: (source, data_dir or None)."""
    saved = run.read_record() if data is None and run is not None else None
    if saved is None:
        return data, None
    from tdiff.data import KNOWN_SOURCES

    if saved.data not in KNOWN_SOURCES and not Path(saved.data).expanduser().exists():
        raise UserError(f"{run.path}/run.json names the training data '{saved.data}', which is not found "
                        "from here; pass --data PATH (or --ref)")
    return saved.data, Path(saved.data_dir)


def _eval_table(result: dict) -> Table:
    metrics = " / ".join(name for name in ("FID", "KID") if name.lower() in result)
    float32 = "fid_float64" in result or "kid_float64" in result
    table = Table(title=f"{metrics}, {result['protocol']} protocol", show_header=False,
                  caption="FID and KID in float32 as k-diffusion computes them (the paper's numbers); "
                          "float64: the accurate values" if float32 else None)
    table.add_column("", no_wrap=True)
    table.add_column("", justify="right")
    rows = [("FID", result.get("fid"), "{:.3f}"), ("FID, float64", result.get("fid_float64"), "{:.3f}"),
            ("KID", result.get("kid"), "{:.6f}"), ("KID, float64", result.get("kid_float64"), "{:.6f}"),
            ("KID x 10^4", result.get("kid_x1e4"), "{:.2f}"), ("generated images", result.get("n_fake"), "{:,}"),
            ("reference images", result.get("n_ref"), "{:,}"), ("sampler", result.get("sampler"), "{}"),
            ("sampler steps", result.get("steps"), "{}"), ("network precision", result.get("precision"), "{}"),
            ("checkpoint step", result.get("step"), "{}")]
    for label, value, fmt in rows:
        if value is not None:
            table.add_row(label, fmt.format(value))
    return table


@app.command("eval", epilog="""[bold]Examples[/bold]

  tdiff eval runs/d2s8i-cifar10 --fid --kid

  tdiff eval runs/d2s8i-cifar10 --protocol paper

  tdiff eval --images samples/run/samples.npz --data cifar10 --fid

  tdiff eval ema.safetensors -n 10000 --ref stats/cifar10-train.npz --inception ~/inception-2015-12-05.pt
""")
def eval_command(
    checkpoint: Annotated[Optional[Path], typer.Argument(
        metavar="[CKPT]", show_default=False,
        help="A checkpoint file, step directory or run directory to sample from (or use --images).")] = None,
    fid: Annotated[bool, typer.Option("--fid", help="Compute FID. \\[default: FID and KID]")] = False,
    kid: Annotated[bool, typer.Option("--kid", help="Compute KID (raw and x 10^4). \\[default: FID and KID]")] = False,
    n: Annotated[Optional[int], typer.Option(
        "--num", "-n", min=2, show_default=False,
        help="Images to generate. \\[default: 50,000 (clean), 2,000 (paper)]")] = None,
    protocol: Annotated[ProtocolChoice, typer.Option(
        help="clean: FID-50K style, the checkpoint's sampler, the whole training set, clean-fid's resize. "
             "paper: 2,000 samples, DPM++(2M) SDE eta 0 heun 50 steps, no guidance, vs 2,000 training "
             "images, k-diffusion's resize, unrounded samples, FID/KID in k-diffusion's float32 (float64 "
             "beside) (docs/evaluation.md).")] = ProtocolChoice.clean,
    images: Annotated[Optional[Path], typer.Option(
        metavar="DIR|NPZ", show_default=False,
        help="Score these images (a PNG/JPG folder or samples.npz) instead of sampling a checkpoint.")] = None,
    ref: Annotated[Optional[Path], typer.Option(
        metavar="PATH", show_default=False,
        help="The reference: statistics (.npz with mu, sigma[, feats]), or images (a folder or an .npz). "
             "\\[default: the training data, statistics cached in ~/.cache/tdiff]")] = None,
    data: Annotated[Optional[str], typer.Option(
        show_default=False,
        help="Training data for the reference (cifar10, artbench10, a folder, an .npz). "
             "\\[default: the run's, from run.json]")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        show_default=False, help="Where cifar10/artbench10 live. \\[default: the run's, else ./data]")] = None,
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
    from tdiff.run import RunDir
    from tdiff.sample import load_denoiser, prepare_inference, resolve_device, resolve_precision

    if (checkpoint is None) == (images is None):
        raise UserError("give either CKPT (to sample and score) or --images DIR|NPZ (to score), not "
                        + ("both" if checkpoint else "neither"))
    chosen = evaluate.get_protocol(protocol.value)
    want_fid, want_kid = (fid, kid) if (fid or kid) else (True, True)
    torch_device = resolve_device(device.value)

    # Everything that can be wrong is checked before the long part: checkpoint, plan, data, weights.
    loaded = run = plan = fakes = None
    net_kwargs = {}
    if checkpoint is not None:
        loaded = load_denoiser(checkpoint, ema=not no_ema, device=torch_device)
        run = RunDir.of_weights(loaded.path)
        plan = evaluate.protocol_plan(chosen, loaded.config, sampler=sampler.value if sampler else None,
                                      steps=steps, eta=eta, cfg_scale=cfg_scale)
        net_kwargs = _block_cache(loaded.config, plan, cache, cache_span, cache_boundary)
        n = n or chosen.n
        precision, warning = resolve_precision(mixed_precision and mixed_precision.value, torch_device)
        if warning:
            stderr.print(f"warning: {warning}", highlight=False)
    else:
        if sampler or steps or eta is not None or cfg_scale is not None or cache is not None or compile_blocks \
                or mixed_precision or batch_size:
            raise UserError("--images scores images already made; the sampling options go with CKPT")
        fakes = evaluate.load_images(images)
        n = len(fakes)
    source, saved_dir = _eval_data(data, run)
    if ref is None and source is None:
        raise UserError("no reference: pass --data (the training data) or --ref PATH"
                        + ("" if checkpoint is None else "; CKPT is not inside a run directory with a run.json"))
    extractor = evaluate.load_inception(inception, device=torch_device, resize=chosen.resize)

    started = time.perf_counter()
    with StageBars(quiet=as_json) as bars:
        reference_progress = lambda done, total: bars("reference", done, total)  # noqa: E731
        if ref is not None:
            reference = evaluate.reference_from_path(ref, extractor, progress=reference_progress)
        else:
            from tdiff.data import open_dataset

            size = loaded.config.model.image_size if loaded else fakes.shape[1]
            training = open_dataset(source, data_dir or saved_dir or Path("data"), size)
            reference = evaluate.training_reference(training, extractor, chosen, n, progress=reference_progress)
        if want_kid and reference.feats is None:
            if kid:
                raise UserError(f"--kid needs reference features, and {ref} holds only mu and sigma; "
                                "ask for --fid only, or pass reference images")
            want_kid = False
        if loaded is not None:
            inference = prepare_inference(loaded.denoiser, loaded.config, plan, torch_device, n, precision=precision,
                                          compile=compile_blocks, batch_size=batch_size, cached=bool(net_kwargs))
            result = evaluate.evaluate_checkpoint(inference.denoiser, loaded.config, reference, extractor,
                                                  protocol=chosen, plan=plan, n=n, seed=seed,
                                                  batch_size=inference.batch_size, device=torch_device, fid=want_fid,
                                                  kid=want_kid, progress=bars, **net_kwargs)
            result.update(cache=_cache_report(net_kwargs), precision=precision, compile=compile_blocks,
                          batch_size=inference.batch_size)
        else:
            result = evaluate.score(fakes, reference, extractor, protocol=chosen, fid=want_fid, kid=want_kid,
                                    progress=lambda done, total: bars("features", done, total))
            result["n"] = n
    result.update(protocol=chosen.name, step=loaded.step if loaded else None,
                  seconds=time.perf_counter() - started,
                  checkpoint=str(loaded.path) if loaded else None, images=str(images) if images else None)
    metrics = None
    if run is not None and loaded.step is not None:
        from tdiff.run import METRICS

        run.append_metrics(evaluate.eval_record(loaded.step, result, chosen.name))
        metrics = run.path / METRICS
    result["metrics"] = str(metrics) if metrics else None
    if as_json:
        print_json(result)
        return
    stdout.print(_eval_table(result))
    if metrics:
        stderr.print(f"appended to {metrics}", highlight=False)
