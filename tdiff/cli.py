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
from typing import Annotated, Callable, Optional

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
from tdiff.errors import RunError, UserError

stdout = Console()
stderr = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="tdiff",
    help="Train, sample and evaluate small diffusion transformers that share their blocks.",
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

    Presets name the configurations of the paper's Table 1 (d16, d1s16, d1s8, d2s4ui, d2s4i,
    d2s8ui, d2s8i, d8) plus `tiny` for a laptop CPU. Run `tdiff COMMAND --help` for examples.
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
        help="Order 1212... or 11...22... [default: interleaved, or the preset's]")] = None,
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
        help="Run directory. [default: runs/<preset>-<data>-<time>]", show_default=False)] = None,
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
    else:
        if data is None:
            raise UserError("--data is required (cifar10, artbench10, a folder or an .npz)")
        config = resolve_config(preset, overrides, train__steps=steps, train__batch_size=batch_size)
        out = out or _default_out(preset, data)
    if dry_run:
        sys.stdout.write(to_toml(config))
        return
    options = RunOptions(data=data, out=out, data_dir=data_dir, seed=seed, resume=resume,
                         mixed_precision=mixed_precision.value, cpu=cpu, compile=compile_model,
                         num_workers=num_workers)
    display = TrainDisplay(quiet=as_json)
    summary = run_training(config, options, on_event=_with_run_options(display, options))
    if as_json:
        print_json({k: str(v) if isinstance(v, Path) else v for k, v in summary.__dict__.items()})
    else:
        where = f"; last checkpoint {summary.checkpoint}" if summary.checkpoint else ""
        stderr.print(f"step {summary.step}: loss {summary.loss:.4f}, ema loss {summary.ema_loss:.4f}, "
                     f"{summary.images_per_second:.1f} img/s, {summary.elapsed_seconds:.0f}s{where}",
                     highlight=False)
    if summary.stopped_by:
        stderr.print(f"stopped by {summary.stopped_by}; resume with: tdiff train --resume {out}", highlight=False)
        raise typer.Exit(143 if summary.stopped_by == "SIGTERM" else 130)


def _apply(config, overrides, **flags):
    from tdiff.config import apply_overrides, with_values

    config = apply_overrides(config, overrides or [])
    given = {k: v for k, v in flags.items() if v is not None}
    return with_values(config, **given) if given else config


def _with_run_options(display: TrainDisplay, options) -> Callable:
    """Record the run-time options in the run directory once it exists (for --resume)."""

    def on_event(kind: str, info: dict) -> None:
        if kind == "start" and not options.resume and options.out.is_dir():
            record = {"data": options.data, "data_dir": str(options.data_dir), "seed": options.seed,
                      "mixed_precision": options.mixed_precision}
            (options.out / RUN_OPTIONS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        display(kind, info)

    return on_event


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
