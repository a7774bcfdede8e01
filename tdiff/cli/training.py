"""`tdiff train`: train a block-sharing diffusion transformer, with progress display and --resume."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tdiff.cli import InceptionOpt, JsonOpt, MixedPrecision, PresetOpt, SetOpt, app, print_json, resolve_config, stderr
from tdiff.errors import UserError

# 128 + the signal number, as a shell reports a process the signal ended: SIGHUP 1, SIGINT 2, SIGTERM 15.
STOP_EXIT_CODES = {"SIGHUP": 129, "SIGINT": 130, "SIGTERM": 143}


def _run_name(preset: str | None, data: str) -> str:
    """The default run directory's prefix: <preset>-<data> (the library adds the date and time)."""
    data_name = Path(data).stem if ("/" in data or "." in data) else data
    preset_name = Path(preset).stem if preset else "default"
    return f"{preset_name}-{data_name}"


class TrainDisplay:
    """Turns training events into a rich progress bar (TTY) or plain status lines (logs)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.live = stderr.is_terminal and not quiet
        self.progress = None

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "warning":  # also under --json: stdout holds the JSON, warnings go to stderr
            stderr.print(f"warning: {info['message']}", highlight=False, soft_wrap=True)
        if self.quiet:
            return
        if kind == "start":
            self.steps, self.global_batch = info["steps"], info["global_batch"]
            stderr.print(
                f"training {info['params']:,} parameters on {info['device']} x{info['world_size']}, "
                f"global batch {info['global_batch']}, steps {info['step']} -> {info['steps']}, "
                f"run {info['run_dir']}",
                highlight=False,
            )
            if self.live:
                self.progress = Progress(
                    TextColumn("[bold]train"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"),
                    TextColumn("{task.fields[rate]}"),
                    TimeRemainingColumn(),
                    console=stderr,
                    transient=False,
                )
                self.task = self.progress.add_task(
                    "train", total=info["steps"], completed=info["step"], loss="-", rate=""
                )
                self.progress.start()
        elif kind == "step" and self.progress:
            self.progress.update(self.task, completed=info["step"])
        elif kind == "log":
            if self.progress:
                self.progress.update(
                    self.task, loss=f"{info['ema_loss']:.4f}", rate=f"{info['images_per_second']:.0f} img/s"
                )
            else:
                stderr.print(self.status_line(info), highlight=False)
        elif kind == "checkpoint" and not self.progress:
            stderr.print(f"checkpoint {info['path']}", highlight=False)
        elif kind == "eval":
            stderr.print(
                f"eval step {info['step']}: FID {info['fid']:.2f}, KID x1e4 {info['kid_x1e4']:.2f} "
                f"({info['n']:,} samples, {info['protocol']} protocol)",
                highlight=False,
            )
        elif kind == "end" and self.progress:
            self.progress.stop()

    def status_line(self, record: dict) -> str:
        """A log record as the plain line of a non-terminal: what the progress bar shows, in words."""
        steps_per_second = record["images_per_second"] / self.global_batch
        remaining = (self.steps - record["step"]) / steps_per_second if steps_per_second > 0 else float("inf")
        return (
            f"step {record['step']}/{self.steps}  loss {record['loss']:.4f}  ema loss {record['ema_loss']:.4f}  "
            f"{record['images_per_second']:.1f} img/s  elapsed {duration(record['elapsed_seconds'])}  "
            f"ETA {duration(remaining)}"
        )


def duration(seconds: float) -> str:
    """4s, 3m05s, 2h07m: a time span as people read it."""
    if not math.isfinite(seconds):
        return "-"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


EXAMPLES = """[bold]Examples[/bold]

  tdiff train --preset d2s8i --data cifar10

  tdiff train --preset tiny --data digits.npz --steps 200 --cpu

  tdiff train --preset d2s8i --data cifar10 --set train.lr=3e-4 --dry-run

  tdiff train --resume runs/d2s8i-cifar10-20260101-120000

  accelerate launch -m tdiff train --preset d16 --data cifar10 --mixed-precision bf16
"""
RunDirArg = Annotated[
    Optional[Path],
    typer.Argument(help="With --resume: the run directory to continue (same as --out).", show_default=False),
]
DataOpt = Annotated[
    Optional[str],
    typer.Option(
        metavar="NAME|PATH",
        help="digits (bundled, offline), cifar10, artbench10, a folder with one sub-folder per class, or an .npz "
        "of images.",
    ),
]
DataDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        metavar="DIR",
        help="Where cifar10/artbench10 are downloaded or looked for. \\[default: data, or the run's on --resume]",
        show_default=False,
    ),
]
OutOpt = Annotated[
    Optional[Path],
    typer.Option(
        metavar="DIR",
        help="Run directory: new, empty, or a run to --resume. \\[default: a new runs/PRESET-DATA-TIME]",
        show_default=False,
    ),
]
StepsOpt = Annotated[
    Optional[int], typer.Option(min=1, metavar="N", help="Train until this optimiser step (train.steps).")
]
BatchOpt = Annotated[Optional[int], typer.Option(min=1, metavar="N", help="Images per process per micro-step.")]
SeedOpt = Annotated[
    Optional[int],
    typer.Option(
        min=0,
        metavar="N",
        show_default=False,
        help="Seed for weights, data order, noise and augmentation. \\[default: 0, or the run's on --resume]",
    ),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the run in RUN_DIR / --out from its newest checkpoint that verifies.")
]
PrecisionOpt = Annotated[
    Optional[MixedPrecision],
    typer.Option(
        show_default=False, help="Autocast precision for the forward pass. \\[default: no, or the run's on --resume]"
    ),
]
CpuOpt = Annotated[bool, typer.Option("--cpu", help="Train on the CPU even when a GPU is present.")]
CompileOpt = Annotated[
    bool,
    typer.Option("--compile", help="torch.compile each distinct block once (regional compilation); works with TREAD."),
]
WorkersOpt = Annotated[
    int,
    typer.Option(
        min=0,
        metavar="N",
        help="DataLoader worker processes per training process (folder data sets; in-memory ones "
        "are gathered and augmented on the device).",
    ),
]
EvalEveryOpt = Annotated[
    Optional[int],
    typer.Option(
        min=0,
        metavar="N",
        show_default=False,
        help="Steps between in-training FID/KID (the paper's protocol, train.eval_n samples; needs the "
        "Inception weights); 0 = off. \\[default: train.eval_every on a GPU, off on the CPU]",
    ),
]
LogWithOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        metavar="TRACKER",
        show_default=False,
        help="Mirror metrics.jsonl to an experiment tracker through accelerate: tensorboard (files in "
        "RUN/trackers/), wandb, mlflow, aim, comet_ml, clearml, dvclive, ... Repeat it or give a comma "
        "list; each needs its package: pip install \"tdiff\\[tensorboard]\". 'none': no trackers. "
        "\\[default: none, or the run's on --resume]",
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved configuration as TOML and exit.")]


@app.command(epilog=EXAMPLES)
def train(
    run_dir: RunDirArg = None,
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    out: OutOpt = None,
    steps: StepsOpt = None,
    batch_size: BatchOpt = None,
    seed: SeedOpt = None,
    resume: ResumeOpt = False,
    mixed_precision: PrecisionOpt = None,
    cpu: CpuOpt = False,
    compile_model: CompileOpt = False,
    num_workers: WorkersOpt = 2,
    eval_every: EvalEveryOpt = None,
    inception: InceptionOpt = None,
    log_with: LogWithOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a block-sharing diffusion transformer.

    Checkpoints (safetensors, configuration in the metadata), metrics.jsonl and EMA sample grids
    go to the run directory. Ctrl-C, SIGTERM or SIGHUP (to the process or its whole group) finishes the
    current step, writes a checkpoint and exits 130/143/129; `--resume` continues bit-identically.
    Several GPUs or machines: start the same command with `accelerate launch -m tdiff train ...`.
    """
    from tdiff.config import to_toml
    from tdiff.train import train as run_training

    if run_dir is not None and not resume:
        raise UserError(f"a run directory ({run_dir}) is only taken with --resume; to start a run use --out")
    given = {"data": data, "data_dir": data_dir, "seed": seed, "mixed_precision": mixed_precision, "log_with": log_with}
    if resume:
        out = run_dir or out
        config, given = _resumed(out, preset, overrides, steps, batch_size, given)
    else:
        if data is None:
            raise UserError("--data is required (digits, cifar10, artbench10, a folder or an .npz)")
        config = resolve_config(preset, overrides, train__steps=steps, train__batch_size=batch_size)
        given["log_with"] = _tracker_names(log_with or [])
    config = _eval_schedule(config, eval_every, cpu)
    if dry_run:
        sys.stdout.write(to_toml(config))
        return
    machine = {"cpu": cpu, "compile": compile_model, "num_workers": num_workers, "inception": inception}
    options = _run_options(given, out, preset, resume, machine)
    _finish(run_training(config, options, on_event=TrainDisplay(quiet=as_json)), as_json)


def _run_options(given: dict, out: Path | None, preset: str | None, resume: bool, machine: dict):
    """tdiff.train.RunOptions from the run settings (`given`, after --resume filled them in) and the
    settings of this machine and call (`machine`: cpu, compile, num_workers, inception)."""
    from tdiff.train import RunOptions

    precision = (given["mixed_precision"] or MixedPrecision.no).value
    return RunOptions(
        data=given["data"],
        out=out,
        name=_run_name(preset, given["data"]),
        data_dir=given["data_dir"] or Path("data"),
        seed=given["seed"] or 0,
        resume=resume,
        mixed_precision=precision,
        log_with=given["log_with"],
        **machine,
    )


def _resumed(out: Path | None, preset, overrides, steps, batch_size, given: dict) -> tuple:
    """--resume: the run's configuration with the given changes, and every run setting not given again
    (data, its folder, seed, precision, trackers) taken from its run.json."""
    from tdiff.train import resume_settings

    if out is None:
        raise UserError("--resume needs the run directory: tdiff train --resume RUN_DIR")
    base, saved = resume_settings(out)
    config = resolve_config(preset, overrides, base=base, train__steps=steps, train__batch_size=batch_size)
    return config, {
        "data": given["data"] or saved.data,
        "data_dir": given["data_dir"] or Path(saved.data_dir),
        "seed": saved.seed if given["seed"] is None else given["seed"],
        "mixed_precision": given["mixed_precision"] or MixedPrecision(saved.mixed_precision),
        "log_with": saved.log_with if given["log_with"] is None else _tracker_names(given["log_with"]),
    }


def _finish(summary, as_json: bool) -> None:
    """The run's summary (JSON or one line; once, from the main process), and the exit code of a stop signal."""
    report = summary.process_index == 0  # under `accelerate launch` every process gets here; one reports
    if as_json and report:
        print_json({k: str(v) if isinstance(v, Path) else v for k, v in summary.__dict__.items()})
    elif report:
        where = f"; last checkpoint {summary.checkpoint}" if summary.checkpoint else ""
        stderr.print(
            f"step {summary.step}: loss {summary.loss:.4f}, ema loss {summary.ema_loss:.4f}, "
            f"{summary.images_per_second:.1f} img/s, {summary.elapsed_seconds:.0f}s{where}",
            highlight=False,
        )
    if summary.stopped_by:
        if report:
            stderr.print(
                f"stopped by {summary.stopped_by}; resume with: tdiff train --resume {summary.run_dir}", highlight=False
            )
        raise typer.Exit(STOP_EXIT_CODES.get(summary.stopped_by, 130))


def _tracker_names(values: list[str]) -> tuple[str, ...]:
    """--log-with a --log-with b,c -> ("a", "b", "c"), each once; "none" alone -> ()."""
    names = tuple(dict.fromkeys(name.strip().lower() for value in values for name in value.split(",") if name.strip()))
    return () if names == ("none",) else names


def _eval_schedule(config, eval_every: int | None, cpu: bool):
    """--eval-every, else the configuration's train.eval_every on a GPU and 0 on the CPU, where
    sampling and Inception features for 2,000 images would take longer than the training between."""
    if eval_every is None:
        import torch

        eval_every = config.train.eval_every if not cpu and torch.cuda.is_available() else 0
    return resolve_config(None, None, base=config, train__eval_every=eval_every)
