"""The `tdiff` command line: Typer commands over the core package.

Only this package prints, parses argv and turns exceptions into exit codes:
0 done; 2 bad input (`UserError`, Click usage errors); 1 a failed run (`RunError`) or a bug,
which keeps its traceback; 130 Ctrl-C. Data goes to stdout (tables, or one JSON object with
--json); messages and progress go to stderr. Heavy modules (torch) are imported inside the
commands so `tdiff --help` stays instant.

This module holds the Typer `app`, the options and helpers shared by several commands, and
`main()`; each command lives in its own module (params, training, sampling, evaluation,
comparison), imported at the end so that they register on `app` in this order.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

try:  # recent typer (0.29 here) runs on its own copy of click, whose exceptions are not click's
    from typer._click import exceptions as click_errors
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_errors

from tdiff import __version__
from tdiff.errors import RunError, UserError
from tdiff.sampler_registry import REGISTRY, SAMPLER_NAMES

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
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Train, sample and evaluate small diffusion transformers that share their blocks.

    Presets: the paper's Table 1 (d16, d1s16, d1s8, d2s4ui, d2s4i, d2s8ui, d2s8i, d8) and `tiny`.
    Run `tdiff COMMAND --help` for each command's options and examples.
    """


# Options shared by several commands, declared once.
PresetOpt = Annotated[
    Optional[str],
    typer.Option(
        "--preset", "-p", metavar="NAME|PATH", help="A shipped preset name (d16, d2s8i, tiny, ...) or a TOML file."
    ),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        metavar="SECTION.KEY=VALUE",
        help="Override one configuration value, e.g. --set train.lr=3e-4. Repeatable; "
        "the value is read as TOML and type-checked.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
InceptionOpt = Annotated[
    Optional[Path],
    typer.Option(
        metavar="PATH",
        show_default=False,
        help="The Inception weights inception-2015-12-05.pt (or its folder). \\[default: $TDIFF_INCEPTION, "
        "else tdiff's cache: $TDIFF_CACHE_DIR, $XDG_CACHE_HOME/tdiff or ~/.cache/tdiff]",
    ),
]


def resolve_config(preset: str | None, overrides: list[str] | None, base=None, **flags):
    """Defaults (or `base`) < preset < --set < dedicated flags (section__key=value, None = unset)."""
    from tdiff.config import Config, apply_overrides, load_preset, with_values

    config = load_preset(preset) if preset else (base or Config())
    config = apply_overrides(config, overrides or [])
    given = {k: v for k, v in flags.items() if v is not None}
    return with_values(config, **given) if given else config


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _millions(n: int) -> str:  # params and compare
    return f"{n / 1e6:.2f}M"


# --------------------------------------------------------------------------------------------
# Shared by sample, eval and compare


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# The sampler registry imports no torch, so `tdiff --help` stays fast.
SamplerChoice = Enum("SamplerChoice", {name: name for name in SAMPLER_NAMES}, type=str)


class MixedPrecision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class ProtocolChoice(str, Enum):
    clean = "clean"
    paper = "paper"


CheckpointArg = Annotated[
    Path,
    typer.Argument(
        metavar="CKPT",
        show_default=False,
        help="A checkpoint file (ema.safetensors, model.safetensors), a step directory, or a run directory "
        "(its latest checkpoint).",
    ),
]
NoEmaOpt = Annotated[
    bool,
    typer.Option(
        "--no-ema",
        help="The trained weights (model.safetensors), not the EMA: of a run or step directory, or the "
        "step folder of an ema.safetensors given as CKPT.",
    ),
]
SeedOpt = Annotated[int, typer.Option(min=0, help="Image k is drawn from seed + k, whatever the batch size.")]
DeviceOpt = Annotated[DeviceChoice, typer.Option(help="Where to run; auto = cuda when PyTorch sees a GPU.")]
SamplerOpt = Annotated[
    Optional[SamplerChoice],
    typer.Option(
        metavar="NAME",
        show_default=False,
        help=f"Sampler: {', '.join(SAMPLER_NAMES)} (docs/sampling.md). \\[default: the checkpoint's sample.sampler]",
    ),
]
StepsOpt = Annotated[
    Optional[int],
    typer.Option(
        min=1,
        metavar="N",
        show_default=False,
        help="Sampler steps (noise levels). \\[default: the checkpoint's sample.steps]",
    ),
]
EtaOpt = Annotated[
    Optional[float],
    typer.Option(
        min=0,
        help="Noise of the ancestral/SDE samplers; 0 = deterministic. \\[default: the checkpoint's sample.eta]",
        show_default=False,
    ),
]
CfgOpt = Annotated[
    Optional[float],
    typer.Option(
        min=0,
        help="Classifier-free guidance scale; 1 = the plain conditional model, 0 = unconditional. "
        "\\[default: the checkpoint's sample.cfg_scale]",
        show_default=False,
    ),
]
InferencePrecisionOpt = Annotated[
    Optional[MixedPrecision],
    typer.Option(
        "--mixed-precision",
        show_default=False,
        help="Autocast precision of the network; the sampler's arithmetic stays float32. \\[default: bf16 where "
        "native (CUDA from Ampere on, CPUs with AVX512-BF16/AMX), else no]",
    ),
]
InferenceCompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile each distinct block once (regional): pays for long runs; works with "
        "--cache and every sampler.",
    ),
]
InferenceBatchOpt = Annotated[
    Optional[int],
    typer.Option(
        min=1,
        metavar="N",
        show_default=False,
        help="Images per forward pass; the images do not depend on it. \\[default: 64 on the CPU; on CUDA the "
        "most that fit the free memory, measured]",
    ),
]
CacheOpt = Annotated[
    Optional[int],
    typer.Option(
        "--cache",
        metavar="INTERVAL",
        min=1,
        show_default=False,
        help="Δ-DiT block caching: a full network evaluation every INTERVAL; those between skip a span of block "
        "applications and reuse its cached output − input (docs/acceleration.md). 2 is a good start, "
        "1 = exactly uncached. \\[default: no cache]",
    ),
]
CacheSpanOpt = Annotated[
    Optional[int],
    typer.Option(
        min=1,
        show_default=False,
        help="With --cache: block applications cached, the last ones before --cache-boundary, the first ones "
        "after. \\[default: a quarter of the effective depth]",
    ),
]
CacheBoundaryOpt = Annotated[
    Optional[int],
    typer.Option(
        min=0,
        show_default=False,
        help="With --cache: the network evaluation (from 0; heun/edm evaluate twice per step) from which the "
        "front span is cached instead of the rear. \\[default: 60% of the evaluations]",
    ),
]


def _block_cache(config, plan, interval: int | None, span: int | None, boundary: int | None) -> dict:
    """The net kwargs for --cache: {"block_cache": BlockCache(...)}, or {} without --cache."""
    if interval is None:
        if span is not None or boundary is not None:
            raise UserError("--cache-span / --cache-boundary shape the block cache; add --cache INTERVAL")
        return {}
    from tdiff.acceleration import BlockCache, CachePlan

    applications = config.sharing.depth * config.sharing.substeps
    evaluations = REGISTRY[plan.sampler].evaluations(plan.steps)
    cache_plan = CachePlan.default(evaluations, applications, span, boundary, interval)
    if cache_plan.span > applications:
        raise UserError(f"--cache-span {cache_plan.span}: this model runs only {applications} block applications")
    return {"block_cache": BlockCache(cache_plan)}


def _cache_report(net_kwargs: dict) -> dict | None:
    return net_kwargs["block_cache"].report() if net_kwargs else None


def _inference_precision(choice: MixedPrecision | None, device) -> str:
    """--mixed-precision of sample and eval resolved for the device, with the warning for an emulated one."""
    from tdiff.sample import resolve_precision

    precision, warning = resolve_precision(choice and choice.value, device)
    if warning:
        stderr.print(f"warning: {warning}", highlight=False)
    return precision


class StageBars:
    """progress(stage, done, total) -> one rich bar per stage on stderr (TTY only); a line per stage in logs."""

    LABELS = {"sample": "sample", "reference": "reference features", "features": "features"}

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = (
            None
            if quiet or not stderr.is_terminal
            else Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=stderr,
                transient=True,
            )
        )
        self.tasks: dict[str, object] = {}

    def __enter__(self) -> StageBars:
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


def _checkpoint_label(loaded) -> str:
    from tdiff.run import RunDir

    run = RunDir.of_weights(loaded.path)
    step = f"-{loaded.step:08d}" if loaded.step is not None else ""
    return f"{run.path.name}{step}-{loaded.path.stem}" if run else loaded.path.stem


# --------------------------------------------------------------------------------------------
# Entry point: exceptions -> exit codes


def reflow(text: str | None) -> str | None:
    """A docstring as paragraphs: the line breaks inside a paragraph become spaces, so the help wraps to
    the terminal instead of breaking where the source did. Indented lines (examples) stay as written."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith((" ", "-")) else " ".join(p.split("\n")) for p in paragraphs)


def _tidy_help(command) -> None:
    """Paragraph help texts, and no `<bool>` type column for on/off flags, on every command."""
    for sub in getattr(command, "commands", {}).values():
        sub.help = reflow(sub.help)
        for param in sub.params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        sub.get_help_option = _flag_without_type(sub.get_help_option)


def _flag_without_type(get_help_option):
    """--help, which click makes on demand, without its `<bool>`."""

    def wrapped(ctx):
        option = get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    return wrapped


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (used by the console script and `python -m tdiff`)."""
    command = typer.main.get_command(app)
    _tidy_help(command)
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


# The commands register on `app` as they are imported, in the order of `tdiff --help`.
from tdiff.cli import comparison, evaluation, params, sampling, training  # noqa: E402,F401
