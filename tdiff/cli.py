"""The `tdiff` command line: Typer commands over the core package.

Only this module prints, parses argv and turns exceptions into exit codes:
0 done; 2 bad input (`UserError`, Click usage errors); 1 a failed run (`RunError`) or a bug,
which keeps its traceback; 130 Ctrl-C. Data goes to stdout (tables, or one JSON object with
--json); messages and progress go to stderr. Heavy modules (torch) are imported inside the
commands so `tdiff --help` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional, get_args

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

try:  # recent typer (0.29 here) runs on its own copy of click, whose exceptions are not click's
    from typer._click import exceptions as click_errors
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_errors

from tdiff import __version__
from tdiff.config import SamplerName
from tdiff.errors import RunError, UserError

stdout = Console()
stderr = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="tdiff",
    # The root help is `_root`'s docstring (a `help=` here would replace it).
    epilog="""[bold]Examples[/bold]

  tdiff params --all

  tdiff train --preset d2s8i --data cifar10 --dry-run
""",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"tdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Train, sample and evaluate small diffusion transformers that share their blocks.

    Presets: the paper's Table 1 (d16, d1s16, d1s8, d2s4ui, d2s4i, d2s8ui, d2s8i, d8) and `tiny`.
    Run `tdiff COMMAND --help` for each command's options and examples.
    """


# Options shared by several commands, declared once.
PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", "-p", metavar="NAME|PATH",
    help="A shipped preset name (d16, d2s8i, tiny, ...) or a TOML file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="SECTION.KEY=VALUE",
    help="Override one configuration value, e.g. --set train.lr=3e-4. Repeatable; "
         "the value is read as TOML and type-checked.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
InceptionOpt = Annotated[Optional[Path], typer.Option(
    metavar="PATH", show_default=False,
    help="The Inception weights inception-2015-12-05.pt (or its folder). \\[default: $TDIFF_INCEPTION, "
         "else clean-fid's cache /tmp/inception-2015-12-05.pt]")]


def resolve_config(preset: str | None, overrides: list[str] | None, **flags):
    """Defaults < preset < --set < dedicated flags (given as section__key=value, None = unset)."""
    from tdiff.config import Config, apply_overrides, load_preset, with_values

    config = load_preset(preset) if preset else Config()
    config = apply_overrides(config, overrides or [])
    given = {k: v for k, v in flags.items() if v is not None}
    return with_values(config, **given) if given else config


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# tdiff params

def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _param_rows(wide: bool) -> list[tuple[str, object]]:
    """(label, summary -> cell) for the params table; `wide` tables use shorter cells."""
    count = _millions if wide else "{:,}".format
    return [
        ("Table 1 name", lambda s: s["table1_name"]),
        ("parameters", lambda s: count(s["params_total"])),
        ("  blocks", lambda s: count(s["params_blocks"])),
        ("  mapping network", lambda s: count(s["params_mapping"])),
        ("  other", lambda s: count(s["params_other"])),
        ("blocks x uses", lambda s: f"{s['depth']}x{s['substeps']}"),
        ("effective depth", lambda s: str(s["effective_depth"])),
        ("order", lambda s: s["order"] if len(s["order"]) <= (6 if wide else 32)
         else s["order"][:(5 if wide else 30)] + "…"),
        ("width", lambda s: str(s["width"]) if wide else f"{s['width']} (d_ff {s['d_ff']})"),
        ("GFLOP/image", lambda s: f"{s['gflops_per_image']:.3f}"),
        ("  + attention", lambda s: f"{s['gflops_attention_per_image']:.3f}"),
        ("fp32 weights, MiB", lambda s: f"{s['param_bytes_fp32'] / 2**20:.1f}"),
    ]


def _params_table(summaries: list[dict]) -> Table:
    table = Table(title="Model size and forward cost (one image)")
    table.add_column("", no_wrap=True)
    for s in summaries:
        table.add_column(s["name"] or s["table1_name"], justify="right", no_wrap=True)
    for label, cell in _param_rows(wide=len(summaries) > 1):
        table.add_row(label, *(cell(s) for s in summaries))
    return table


@app.command(epilog="""[bold]Examples[/bold]

  tdiff params --preset d2s8i

  tdiff params --depth 2 --substeps 8 --json

  tdiff params --all --set model.width=1024
""")
def params(
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    depth: Annotated[Optional[int], typer.Option(min=1, help="Distinct transformer blocks.")] = None,
    substeps: Annotated[Optional[int], typer.Option(min=1, help="Applications of each block.")] = None,
    interleaved: Annotated[Optional[bool], typer.Option(
        "--interleaved/--no-interleaved",
        help="Order 1212... or 11...22... \\[default: interleaved, or the preset's]")] = None,
    width: Annotated[Optional[int], typer.Option(min=1, help="Model width (d_model).")] = None,
    patch_size: Annotated[Optional[int], typer.Option(min=1, help="Patch side, pixels.")] = None,
    image_size: Annotated[Optional[int], typer.Option(min=1, help="Image side, pixels.")] = None,
    channels: Annotated[Optional[int], typer.Option(min=1, help="Image channels.")] = None,
    classes: Annotated[Optional[int], typer.Option(min=0, help="Classes; 0 = unconditional.")] = None,
    all_presets: Annotated[bool, typer.Option(
        "--all", help="Every shipped preset side by side, as Table 1's columns.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a model's parameters, effective depth and forward cost.

    Flags override the preset, so no preset is needed: `tdiff params --depth 2 --substeps 8`.
    Nothing is allocated: models are built on PyTorch's meta device.
    """
    from tdiff.config import TABLE1_PRESETS, preset_names
    from tdiff.report import model_summary

    flags = dict(sharing__depth=depth, sharing__substeps=substeps, sharing__interleaved=interleaved,
                 model__width=width, model__patch_size=patch_size, model__image_size=image_size,
                 model__channels=channels, model__num_classes=classes)
    if all_presets:
        if preset:
            raise UserError("--all and --preset: choose one")
        names = [n for n in TABLE1_PRESETS if n in preset_names()]
        configs = [(n, resolve_config(n, overrides, **flags)) for n in names]
        summaries = [model_summary(c, name) for name, c in configs]
        if as_json:
            print_json({"presets": summaries})
        else:
            stdout.print(_params_table(summaries))
        return
    config = resolve_config(preset, overrides, **flags)
    summary = model_summary(config, name=preset or "")
    if as_json:
        print_json(summary)
    else:
        stdout.print(_params_table([summary]))


# --------------------------------------------------------------------------------------------
# tdiff train


class MixedPrecision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


RUN_OPTIONS_FILE = "run.json"  # the run-time options of a run, reused by --resume


def _default_out(preset: str | None, data: str) -> Path:
    data_name = Path(data).stem if ("/" in data or "." in data) else data
    preset_name = Path(preset).stem if preset else "default"
    return Path("runs") / f"{preset_name}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _resume_settings(run_dir: Path) -> tuple[object, dict]:
    """The configuration and run-time options a run was started with."""
    from tdiff.config import loads

    config_file, options_file = run_dir / "config.toml", run_dir / RUN_OPTIONS_FILE
    if not config_file.is_file() or not options_file.is_file():
        raise UserError(f"--resume: {run_dir} is not a tdiff run directory (no config.toml / {RUN_OPTIONS_FILE})")
    return loads(config_file.read_text(), where=str(config_file)), json.loads(options_file.read_text())


class TrainDisplay:
    """Turns training events into a rich progress bar (TTY) or plain status lines (logs)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.live = stderr.is_terminal and not quiet
        self.progress = None

    def __call__(self, kind: str, info: dict) -> None:
        if self.quiet:
            return
        if kind == "start":
            stderr.print(f"training {info['params']:,} parameters on {info['device']} x{info['world_size']}, "
                         f"global batch {info['global_batch']}, steps {info['step']} -> {info['steps']}, "
                         f"run {info['run_dir']}", highlight=False)
            if self.live:
                self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                                         TimeRemainingColumn(), console=stderr, transient=False)
                self.task = self.progress.add_task("train", total=info["steps"], completed=info["step"],
                                                   loss="-", rate="")
                self.progress.start()
        elif kind == "step" and self.progress:
            self.progress.update(self.task, completed=info["step"], loss=f"{info['ema_loss']:.4f}")
        elif kind == "log":
            if self.progress:
                self.progress.update(self.task, rate=f"{info['images_per_second']:.0f} img/s")
            else:
                stderr.print(f"step {info['step']}  loss {info['loss']:.4f}  ema loss {info['ema_loss']:.4f}  "
                             f"{info['images_per_second']:.1f} img/s  {info['elapsed_seconds']:.0f}s",
                             highlight=False)
        elif kind == "checkpoint" and not self.progress:
            stderr.print(f"checkpoint {info['path']}", highlight=False)
        elif kind == "eval":
            stderr.print(f"eval step {info['step']}: FID {info['fid']:.2f}, KID x1e4 {info['kid_x1e4']:.2f} "
                         f"({info['n']:,} samples, {info['protocol']} protocol)", highlight=False)
        elif kind == "end" and self.progress:
            self.progress.stop()


@app.command(epilog="""[bold]Examples[/bold]

  tdiff train --preset d2s8i --data cifar10

  tdiff train --preset tiny --data digits.npz --steps 200 --cpu

  tdiff train --preset d2s8i --data cifar10 --set train.lr=3e-4 --dry-run

  tdiff train --resume runs/d2s8i-cifar10-20260101-120000

  accelerate launch -m tdiff train --preset d16 --data cifar10 --mixed-precision bf16
""")
def train(
    run_dir: Annotated[Optional[Path], typer.Argument(
        help="With --resume: the run directory to continue (same as --out).", show_default=False)] = None,
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    data: Annotated[Optional[str], typer.Option(
        help="cifar10, artbench10, a folder with one sub-folder per class, or an .npz of images.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Where cifar10/artbench10 are downloaded or looked for.")]
        = Path("data"),
    out: Annotated[Optional[Path], typer.Option(
        help="Run directory. \\[default: runs/<preset>-<data>-<time>]", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Train until this optimiser step (train.steps).")]
        = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per process per micro-step.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed for weights, data order, noise and augmentation.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in RUN_DIR / --out from its latest checkpoint.")]
        = False,
    mixed_precision: Annotated[MixedPrecision, typer.Option(help="Autocast precision for the forward pass.")]
        = MixedPrecision.no,
    cpu: Annotated[bool, typer.Option(help="Train on the CPU even when a GPU is present.")] = False,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the network.")] = False,
    num_workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes per training process.")]
        = 2,
    eval_every: Annotated[Optional[int], typer.Option(
        min=0, show_default=False,
        help="Steps between in-training FID/KID (the paper's protocol, train.eval_n samples; needs the "
             "Inception weights); 0 = off. \\[default: train.eval_every on a GPU, off on the CPU]")] = None,
    inception: InceptionOpt = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved configuration as TOML and exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a block-sharing diffusion transformer.

    Checkpoints (safetensors, configuration in the metadata), metrics.jsonl and EMA sample grids
    go to the run directory. Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and
    exits 130/143; `--resume` continues bit-identically. Several GPUs or machines: start the same
    command with `accelerate launch -m tdiff train ...`.
    """
    from tdiff.config import to_toml
    from tdiff.train import RunOptions, train as run_training

    if run_dir is not None and not resume:
        raise UserError(f"a run directory ({run_dir}) is only taken with --resume; to start a run use --out")
    if resume:
        out = run_dir or out
        if out is None:
            raise UserError("--resume needs the run directory: tdiff train --resume RUN_DIR")
        base, saved = _resume_settings(out)
        config = resolve_config(preset, overrides, train__steps=steps, train__batch_size=batch_size) \
            if preset else _apply(base, overrides, train__steps=steps, train__batch_size=batch_size)
        data = data or saved["data"]
        data_dir = Path(saved["data_dir"]) if data_dir == Path("data") else data_dir
        seed = saved["seed"] if seed == 0 else seed
        if mixed_precision == MixedPrecision.no:  # like the seed: the run's own unless given
            mixed_precision = MixedPrecision(saved.get("mixed_precision", "no"))
    else:
        if data is None:
            raise UserError("--data is required (cifar10, artbench10, a folder or an .npz)")
        config = resolve_config(preset, overrides, train__steps=steps, train__batch_size=batch_size)
        out = out or _default_out(preset, data)
    config = _eval_schedule(config, eval_every, cpu)
    if dry_run:
        sys.stdout.write(to_toml(config))
        return
    options = RunOptions(data=data, out=out, data_dir=data_dir, seed=seed, resume=resume,
                         mixed_precision=mixed_precision.value, cpu=cpu, compile=compile_model,
                         num_workers=num_workers, inception=inception)
    display = TrainDisplay(quiet=as_json)
    summary = run_training(config, options, on_event=_with_run_options(display, options))
    report = summary.process_index == 0  # under `accelerate launch` every process gets here; one reports
    if as_json and report:
        print_json({k: str(v) if isinstance(v, Path) else v for k, v in summary.__dict__.items()})
    elif report:
        where = f"; last checkpoint {summary.checkpoint}" if summary.checkpoint else ""
        stderr.print(f"step {summary.step}: loss {summary.loss:.4f}, ema loss {summary.ema_loss:.4f}, "
                     f"{summary.images_per_second:.1f} img/s, {summary.elapsed_seconds:.0f}s{where}",
                     highlight=False)
    if summary.stopped_by:
        if report:
            stderr.print(f"stopped by {summary.stopped_by}; resume with: tdiff train --resume {out}",
                         highlight=False)
        raise typer.Exit(143 if summary.stopped_by == "SIGTERM" else 130)


def _eval_schedule(config, eval_every: int | None, cpu: bool):
    """--eval-every, else the configuration's train.eval_every on a GPU and 0 on the CPU, where
    sampling and Inception features for 2,000 images would take longer than the training between."""
    if eval_every is None:
        import torch

        eval_every = config.train.eval_every if not cpu and torch.cuda.is_available() else 0
    return _apply(config, None, train__eval_every=eval_every)


def _apply(config, overrides, **flags):
    from tdiff.config import apply_overrides, with_values

    config = apply_overrides(config, overrides or [])
    given = {k: v for k, v in flags.items() if v is not None}
    return with_values(config, **given) if given else config


def _with_run_options(display: TrainDisplay, options) -> Callable:
    """Record the run-time options in the run directory once it exists (for --resume)."""

    def on_event(kind: str, info: dict) -> None:
        if kind == "start" and not options.resume and options.out.is_dir():
            # Absolute paths, so `tdiff eval RUN` and --resume work from any directory.
            from tdiff.data import KNOWN_SOURCES

            named = options.data in KNOWN_SOURCES
            data = options.data if named or not Path(options.data).exists() else str(Path(options.data).resolve())
            record = {"data": data, "data_dir": str(options.data_dir.resolve()), "seed": options.seed,
                      "mixed_precision": options.mixed_precision}
            (options.out / RUN_OPTIONS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        display(kind, info)

    return on_event


# --------------------------------------------------------------------------------------------
# Shared by sample, eval and compare


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# The names of the diffusion core's samplers; config.SamplerName lists exactly SAMPLERS' keys (a test
# checks), and reading it here keeps `tdiff --help` from importing torch.
SamplerChoice = Enum("SamplerChoice", {name: name for name in get_args(SamplerName)}, type=str)


class ProtocolChoice(str, Enum):
    clean = "clean"
    paper = "paper"


CheckpointArg = Annotated[Path, typer.Argument(
    metavar="CKPT", show_default=False,
    help="A checkpoint file (ema.safetensors, model.safetensors), a step directory, or a run directory "
         "(its latest checkpoint).")]
NoEmaOpt = Annotated[bool, typer.Option(
    "--no-ema", help="With a run or step directory: the trained weights (model.safetensors), not the EMA.")]
SeedOpt = Annotated[int, typer.Option(min=0, help="Image k is drawn from seed + k, whatever the batch size.")]
DeviceOpt = Annotated[DeviceChoice, typer.Option(help="Where to run; auto = cuda when PyTorch sees a GPU.")]
SamplerOpt = Annotated[Optional[SamplerChoice], typer.Option(
    help="Sampler. \\[default: the checkpoint's sample.sampler]", show_default=False)]
StepsOpt = Annotated[Optional[int], typer.Option(
    min=1, help="Sampler steps (noise levels). \\[default: the checkpoint's sample.steps]", show_default=False)]
EtaOpt = Annotated[Optional[float], typer.Option(
    min=0, help="Noise of the ancestral/SDE samplers; 0 = deterministic. \\[default: the checkpoint's sample.eta]",
    show_default=False)]
CfgOpt = Annotated[Optional[float], typer.Option(
    min=0, help="Classifier-free guidance scale; 1 = the plain conditional model, 0 = unconditional. "
                "\\[default: the checkpoint's sample.cfg_scale]", show_default=False)]
CacheOpt = Annotated[Optional[int], typer.Option(
    "--cache", metavar="INTERVAL", min=1, show_default=False,
    help="Δ-DiT block caching: a full network evaluation every INTERVAL; those between skip a span of block "
         "applications and reuse its cached output − input (docs/acceleration.md). 2 is a good start, "
         "1 = exactly uncached. \\[default: no cache]")]
CacheSpanOpt = Annotated[Optional[int], typer.Option(
    min=1, show_default=False,
    help="With --cache: block applications cached, the last ones before --cache-boundary, the first ones "
         "after. \\[default: a quarter of the effective depth]")]
CacheBoundaryOpt = Annotated[Optional[int], typer.Option(
    min=0, show_default=False,
    help="With --cache: the network evaluation (from 0; heun/edm evaluate twice per step) from which the "
         "front span is cached instead of the rear. \\[default: 60% of the evaluations]")]


def _block_cache(config, plan, interval: int | None, span: int | None, boundary: int | None) -> dict:
    """The net kwargs for --cache: {"block_cache": BlockCache(...)}, or {} without --cache."""
    if interval is None:
        if span is not None or boundary is not None:
            raise UserError("--cache-span / --cache-boundary shape the block cache; add --cache INTERVAL")
        return {}
    from tdiff.acceleration import BlockCache, CachePlan

    applications = config.sharing.depth * config.sharing.substeps
    evaluations = 2 * plan.steps - 1 if plan.sampler in ("heun", "edm") else plan.steps
    cache_plan = CachePlan.default(evaluations, applications, span, boundary, interval)
    if cache_plan.span > applications:
        raise UserError(f"--cache-span {cache_plan.span}: this model runs only {applications} block applications")
    return {"block_cache": BlockCache(cache_plan)}


def _cache_report(net_kwargs: dict) -> dict | None:
    return net_kwargs["block_cache"].report() if net_kwargs else None


class StageBars:
    """progress(stage, done, total) -> one rich bar per stage on stderr (TTY only); a line per stage in logs."""

    LABELS = {"sample": "sample", "reference": "reference features", "features": "features"}

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = None if quiet or not stderr.is_terminal else Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=stderr, transient=True)
        self.tasks: dict[str, object] = {}

    def __enter__(self) -> "StageBars":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            label = self.LABELS.get(stage, stage)
            self.tasks[stage] = self.progress.add_task(label, total=total) if self.progress else None
            if not self.progress and not self.quiet:
                stderr.print(f"{label}: {total:,} images", highlight=False)
        if self.progress:
            self.progress.update(self.tasks[stage], completed=done)


def _run_of(weights_file: Path) -> Path | None:
    """The run directory a weights file lies in (RUN/checkpoints/STEP/x.safetensors), if any."""
    run = weights_file.resolve().parent.parent.parent
    return run if (run / "config.toml").is_file() and (run / "checkpoints").is_dir() else None


def _checkpoint_label(loaded) -> str:
    run = _run_of(loaded.path)
    step = f"-{loaded.step:08d}" if loaded.step is not None else ""
    return f"{run.name}{step}-{loaded.path.stem}" if run else loaded.path.stem


# --------------------------------------------------------------------------------------------
# tdiff sample


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


# --------------------------------------------------------------------------------------------
# tdiff eval


def _eval_data(data: str | None, run_dir: Path | None) -> tuple[str | None, Path | None]:
    """--data, else the run's training data from run.json: (source, data_dir from run.json or None)."""
    if data is not None or run_dir is None or not (run_dir / RUN_OPTIONS_FILE).is_file():
        return data, None
    saved = json.loads((run_dir / RUN_OPTIONS_FILE).read_text())
    source = saved.get("data")
    from tdiff.data import KNOWN_SOURCES

    if source and source not in KNOWN_SOURCES and not Path(source).expanduser().exists():
        raise UserError(f"{run_dir}/{RUN_OPTIONS_FILE} names the training data '{source}', which is not found "
                        "from here; pass --data PATH (or --ref)")
    return source, Path(saved["data_dir"]) if saved.get("data_dir") else None


def _eval_table(result: dict) -> Table:
    metrics = " / ".join(name for name in ("FID", "KID") if name.lower() in result)
    table = Table(title=f"{metrics}, {result['protocol']} protocol", show_header=False)
    table.add_column("", no_wrap=True)
    table.add_column("", justify="right")
    rows = [("FID", result.get("fid"), "{:.3f}"), ("KID", result.get("kid"), "{:.6f}"),
            ("KID x 10^4", result.get("kid_x1e4"), "{:.2f}"), ("generated images", result.get("n_fake"), "{:,}"),
            ("reference images", result.get("n_ref"), "{:,}"), ("sampler", result.get("sampler"), "{}"),
            ("sampler steps", result.get("steps"), "{}"), ("checkpoint step", result.get("step"), "{}")]
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
             "images, k-diffusion's resize (docs/evaluation.md).")] = ProtocolChoice.clean,
    images: Annotated[Optional[Path], typer.Option(
        metavar="DIR|NPZ", show_default=False,
        help="Score these images (a PNG/JPG folder or samples.npz) instead of sampling a checkpoint.")] = None,
    ref: Annotated[Optional[Path], typer.Option(
        metavar="PATH", show_default=False,
        help="The reference: statistics (.npz with mu, sigma[, feats]), or images (a folder or an .npz). "
             "\\[default: the training data, statistics cached beside it]")] = None,
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
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass when sampling.")] = 256,
    device: DeviceOpt = DeviceChoice.auto,
    no_ema: NoEmaOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score a checkpoint (or images) with FID and KID against the training set.

    Samples `-n` images (uniform random labels from --seed), extracts Inception features and compares
    them with reference statistics of the training data, computed once and cached as an .npz beside the
    data. When CKPT lies in a run directory the result is appended to its metrics.jsonl (kind "eval"),
    which `tdiff compare` reads.
    """
    from tdiff import evaluate
    from tdiff.sample import load_denoiser, resolve_device

    if (checkpoint is None) == (images is None):
        raise UserError("give either CKPT (to sample and score) or --images DIR|NPZ (to score), not "
                        + ("both" if checkpoint else "neither"))
    chosen = evaluate.get_protocol(protocol.value)
    want_fid, want_kid = (fid, kid) if (fid or kid) else (True, True)
    torch_device = resolve_device(device.value)

    # Everything that can be wrong is checked before the long part: checkpoint, plan, data, weights.
    loaded = run_dir = plan = fakes = None
    net_kwargs = {}
    if checkpoint is not None:
        loaded = load_denoiser(checkpoint, ema=not no_ema, device=torch_device)
        run_dir = _run_of(loaded.path)
        plan = evaluate.protocol_plan(chosen, loaded.config, sampler=sampler.value if sampler else None,
                                      steps=steps, eta=eta, cfg_scale=cfg_scale)
        net_kwargs = _block_cache(loaded.config, plan, cache, cache_span, cache_boundary)
        n = n or chosen.n
    else:
        if sampler or steps or eta is not None or cfg_scale is not None or cache is not None:
            raise UserError("--images scores images already made; the sampler options go with CKPT")
        fakes = evaluate.load_images(images)
        n = len(fakes)
    source, saved_dir = _eval_data(data, run_dir)
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
            reference = evaluate.training_reference(training, data_dir or saved_dir or Path("data"), extractor,
                                                    chosen, n, progress=reference_progress)
        if want_kid and reference.feats is None:
            if kid:
                raise UserError(f"--kid needs reference features, and {ref} holds only mu and sigma; "
                                "ask for --fid only, or pass reference images")
            want_kid = False
        if loaded is not None:
            result = evaluate.evaluate_checkpoint(loaded.denoiser, loaded.config, reference, extractor, plan=plan,
                                                  n=n, seed=seed, batch_size=batch_size, device=torch_device,
                                                  fid=want_fid, kid=want_kid, progress=bars, **net_kwargs)
            result["cache"] = _cache_report(net_kwargs)
        else:
            result = evaluate.score(fakes, reference, extractor, fid=want_fid, kid=want_kid,
                                    progress=lambda done, total: bars("features", done, total))
            result["n"] = n
    result.update(protocol=chosen.name, step=loaded.step if loaded else None,
                  seconds=time.perf_counter() - started,
                  checkpoint=str(loaded.path) if loaded else None, images=str(images) if images else None)
    metrics = None
    if run_dir is not None and loaded.step is not None:
        from tdiff.train import append_metrics

        append_metrics(run_dir, evaluate.eval_record(loaded.step, result, chosen.name))
        metrics = run_dir / "metrics.jsonl"
    result["metrics"] = str(metrics) if metrics else None
    if as_json:
        print_json(result)
        return
    stdout.print(_eval_table(result))
    if metrics:
        stderr.print(f"appended to {metrics}", highlight=False)


# --------------------------------------------------------------------------------------------
# tdiff compare


def _steps_millions(step: int) -> str:
    value = step / 1e6
    return f"{value:.2f}" if value >= 0.01 else f"{value:.2g}"


def _compare_output(title: str, columns: list[dict], rows: list[tuple[str, Callable]], markdown: bool) -> None:
    names = [c["name"] for c in columns]
    cells = [(label, [cell(c) for c in columns]) for label, cell in rows]
    if markdown:
        lines = [f"**{title}**", "", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += ["| " + label + " | " + " | ".join(values) + " |" for label, values in cells]
        sys.stdout.write("\n".join(lines) + "\n")
        return
    table = Table(title=title)
    table.add_column("", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for label, values in cells:
        table.add_row(label, *values)
    stdout.print(table)


def _plot_runs(report: dict, path: Path) -> Path:
    from tdiff.plot import Series, line_plot

    series = [Series(f"{r['name']} ({r['table1_name']})", [p["step"] for p in r["curve"]],
                     [p["fid"] for p in r["curve"]]) for r in report["runs"] if r["curve"]]
    if not series:
        raise UserError("--plot: the runs hold no FID evaluations yet; run `tdiff eval RUN` or train with "
                        "--eval-every")
    ns = sorted({r["best"]["n"] for r in report["runs"] if r["best"] and r["best"].get("n")})
    n_text = f", n = {'/'.join(f'{n:,}' for n in ns)}" if ns else ""
    try:
        return line_plot(series, path, title="FID against training steps", x_label="training step",
                         y_label=f"FID ({report['protocol']} protocol{n_text})")
    except OSError as e:
        raise UserError(f"--plot {path}: cannot write ({e.strerror or e})") from None


@app.command(epilog="""[bold]Examples[/bold]

  tdiff compare runs/d16-cifar10 runs/d2s8i-cifar10 --plot fid.png

  tdiff compare runs/* --markdown

  tdiff compare --presets d16,d2s8i,d1s16

  tdiff compare --presets tiny,d8 --measure --device cuda --json
""")
def compare(
    run_dirs: Annotated[Optional[list[Path]], typer.Argument(
        metavar="[RUN_DIR]...", show_default=False, help="Run directories (config.toml + metrics.jsonl).")] = None,
    presets: Annotated[Optional[str], typer.Option(
        metavar="A,B,...", show_default=False,
        help="Compare configurations instead of runs: parameters, depth, forward GFLOPs.")] = None,
    measure: Annotated[bool, typer.Option(
        "--measure", help="With --presets: also time training and sampling images/s on --device "
                          "(random weights and data, batch 8, a few steps).")] = False,
    protocol: Annotated[Optional[ProtocolChoice], typer.Option(
        show_default=False, help="Which evaluations to read. \\[default: the one protocol the runs used]")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        metavar="PNG", show_default=False, help="Write the FID-against-steps curves (Figure 1) as a PNG.")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table instead.")] = False,
    device: DeviceOpt = DeviceChoice.auto,
    as_json: JsonOpt = False,
) -> None:
    """Put runs side by side as the paper's Table 1: best checkpoint (lowest FID) Steps x 10^-6 / FID / KID x 10^4.

    Reads each run's config.toml and the evaluation records (kind "eval") in its metrics.jsonl, written by
    `tdiff eval` or by training with --eval-every. With --presets and no runs, compares configurations.
    """
    from tdiff.report import compare_runs, model_summary

    if as_json and markdown:
        raise UserError("--json and --markdown: choose one")
    if presets is not None:
        if run_dirs:
            raise UserError("--presets compares configurations, RUN_DIRs compare runs: give one or the other")
        if plot is not None:
            raise UserError("--plot draws FID curves of runs; it does not go with --presets")
        names = [name.strip() for name in presets.split(",") if name.strip()]
        columns = [model_summary(resolve_config(name, None), name) for name in names]
        rows = [("Table 1 name", lambda c: c["table1_name"]), ("parameters", lambda c: _millions(c["params_total"])),
                ("effective depth", lambda c: str(c["effective_depth"])),
                ("GFLOP/image", lambda c: f"{c['gflops_per_image']:.3f}")]
        if measure:
            from tdiff.report import measure_throughput
            from tdiff.sample import resolve_device

            torch_device = resolve_device(device.value)
            for column in columns:
                if not as_json:
                    stderr.print(f"measuring {column['name']} on {torch_device}", highlight=False)
                column.update(measure_throughput(resolve_config(column["name"], None), torch_device))
            rows += [("train images/s", lambda c: f"{c['train_images_per_second']:.1f}"),
                     ("sample images/s", lambda c: f"{c['sample_images_per_second']:.2f}")]
        if as_json:
            print_json({"presets": columns})
        else:
            title = "Configurations" + (f" (measured on {columns[0]['device']})" if measure and columns else "")
            _compare_output(title, columns, rows, markdown)
        return
    if measure:
        raise UserError("--measure goes with --presets (it times configurations, not runs)")
    if not run_dirs:
        raise UserError("give run directories to compare, or --presets A,B,...")
    report = compare_runs(run_dirs, protocol.value if protocol else None)
    plotted = _plot_runs(report, plot) if plot is not None else None
    if as_json:
        print_json({**report, "plot": str(plotted) if plotted else None})
        return

    def best(key: str, fmt: Callable) -> Callable:
        return lambda c: fmt(c["best"][key]) if c["best"] and c["best"].get(key) is not None else "-"

    rows = [("Table 1 name", lambda c: c["table1_name"]), ("parameters", lambda c: _millions(c["params_total"])),
            ("effective depth", lambda c: str(c["effective_depth"])),
            ("Steps (x10^-6)", best("step", _steps_millions)), ("FID", best("fid", "{:.2f}".format)),
            ("KID (x10^4)", best("kid_x1e4", "{:.2f}".format)), ("samples per evaluation", best("n", "{:,}".format)),
            ("evaluations", lambda c: str(c["evaluations"]))]
    protocol_text = f"{report['protocol']} protocol" if report["protocol"] else "no evaluations yet"
    _compare_output(f"Best checkpoint (lowest FID), {protocol_text}", report["runs"], rows, markdown)
    if plotted:
        stderr.print(f"wrote {plotted}", highlight=False)


# --------------------------------------------------------------------------------------------
# Entry point: exceptions -> exit codes


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (used by the console script and `python -m tdiff`)."""
    command = typer.main.get_command(app)
    try:
        # Without standalone mode an eager `--version`/`--help` comes back as its exit code.
        code = command.main(args=argv, prog_name="tdiff", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except click_errors.ClickException as e:  # usage errors, bad option values: exit 2
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `tdiff`: the help page is the message
            e.show()
            return e.exit_code
        # One line, like a UserError: `error: Invalid value for '--depth': ... (see tdiff params --help)`
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        stderr.print(Text.assemble(("error: ", "red"), e.format_message() + hint), soft_wrap=True)
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        stderr.print("interrupted")
        return 130
    except UserError as e:
        if os.environ.get("TDIFF_DEBUG"):
            raise
        stderr.print(Text.assemble(("error: ", "red"), str(e)), soft_wrap=True)
        return 2
    except RunError as e:
        if os.environ.get("TDIFF_DEBUG"):
            raise
        stderr.print(Text.assemble(("failed: ", "red"), str(e)), soft_wrap=True)
        return 1


def run() -> None:
    sys.exit(main())
