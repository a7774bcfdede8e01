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
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tdiff import __version__
from tdiff.errors import RunError, UserError

stdout = Console()
stderr = Console(stderr=True)

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

_PARAM_ROWS = [
    ("Table 1 name", "table1_name", str),
    ("parameters", "params_total", "{:,}".format),
    ("  blocks", "params_blocks", "{:,}".format),
    ("  mapping network", "params_mapping", "{:,}".format),
    ("  other", "params_other", "{:,}".format),
    ("distinct blocks x applications", None, None),
    ("effective depth", "effective_depth", str),
    ("application order", "order", str),
    ("width / d_ff / tokens", None, None),
    ("forward GFLOP/image", "gflops_per_image", "{:.3f}".format),
    ("  + attention scores", "gflops_attention_per_image", "{:.3f}".format),
    ("parameter memory (fp32)", "param_bytes_fp32", lambda b: f"{b / 2**20:.1f} MiB"),
]


def _param_cell(row: tuple, summary: dict) -> str:
    label, key, fmt = row
    if label.startswith("distinct"):
        return f"{summary['depth']} x {summary['substeps']}"
    if label.startswith("width"):
        return f"{summary['width']} / {summary['d_ff']} / {summary['tokens']}"
    value = fmt(summary[key])
    if key == "order" and len(value) > 24:
        value = value[:24] + "..."
    return value


def _params_table(summaries: list[dict]) -> Table:
    table = Table(title="Model size and forward cost (one image)")
    table.add_column("")
    for s in summaries:
        table.add_column(s["name"] or s["table1_name"], justify="right")
    for row in _PARAM_ROWS:
        table.add_row(row[0], *(_param_cell(row, s) for s in summaries))
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
    from tdiff.config import load_preset, preset_names
    from tdiff.report import model_summary

    flags = dict(sharing__depth=depth, sharing__substeps=substeps, sharing__interleaved=interleaved,
                 model__width=width, model__patch_size=patch_size, model__image_size=image_size,
                 model__channels=channels, model__num_classes=classes)
    if all_presets:
        if preset:
            raise UserError("--all and --preset: choose one")
        names = [n for n in preset_names() if n != "tiny"]
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
# Entry point: exceptions -> exit codes


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (used by the console script and `python -m tdiff`)."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="tdiff", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:  # usage errors, bad option values: exit 2
        e.show()
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
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
