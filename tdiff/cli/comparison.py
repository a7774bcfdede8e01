"""`tdiff compare`: runs side by side as the paper's Table 1, or configurations with --presets."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tdiff.cli import (
    DeviceChoice,
    DeviceOpt,
    JsonOpt,
    ProtocolChoice,
    _millions,
    app,
    print_json,
    resolve_config,
    stderr,
    stdout,
)
from tdiff.errors import UserError


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
    """The figure of --plot: FID against steps when the runs hold evaluations; loss and EMA loss against
    steps and training time when they hold a training log."""
    from tdiff.plot import RunCurves, comparison_figure
    from tdiff.report import training_curves

    runs = []
    for run in report["runs"]:
        log = training_curves(Path(run["path"]))
        runs.append(
            RunCurves(
                f"{run['name']} ({run['table1_name']})",
                fid_steps=[p["step"] for p in run["curve"]],
                fid=[p["fid"] for p in run["curve"]],
                steps=log["step"],
                seconds=log["elapsed_seconds"],
                loss=log["loss"],
                ema_loss=log["ema_loss"],
            )
        )
    ns = sorted({r["best"]["n"] for r in report["runs"] if r["best"] and r["best"].get("n")})
    n_text = f", n = {'/'.join(f'{n:,}' for n in ns)}" if ns else ""
    if not any(run.fid or run.loss for run in runs):
        raise UserError("--plot: the runs hold neither training log records nor FID evaluations yet")
    try:
        return comparison_figure(runs, path, fid_label=f"FID ({report['protocol']} protocol{n_text})")
    except OSError as e:
        raise UserError(f"--plot {path}: cannot write ({e.strerror or e})") from None


def _check_plot_format(path: Path) -> None:
    from tdiff.plot import figure_format

    try:
        figure_format(path)
    except ValueError as e:
        raise UserError(f"--plot {e}") from None


EXAMPLES = """[bold]Examples[/bold]

  tdiff compare runs/d16-cifar10 runs/d2s8i-cifar10 --plot curves.png

  tdiff compare runs/* --markdown

  tdiff compare --presets d16,d2s8i,d1s16

  tdiff compare --presets tiny,d8 --measure --device cuda --json
"""
RunDirsArg = Annotated[
    Optional[list[Path]],
    typer.Argument(metavar="[RUN_DIR]...", show_default=False, help="Run directories (config.toml + metrics.jsonl)."),
]
PresetsOpt = Annotated[
    Optional[str],
    typer.Option(
        metavar="A,B,...",
        show_default=False,
        help="Compare configurations instead of runs: parameters, depth, forward GFLOPs.",
    ),
]
MeasureOpt = Annotated[
    bool,
    typer.Option(
        "--measure",
        help="With --presets: also time training and sampling images/s on --device "
        "(random weights and data, batch 8, a few steps).",
    ),
]
ReadProtocolOpt = Annotated[
    Optional[ProtocolChoice],
    typer.Option(show_default=False, help="Which evaluations to read. \\[default: the one protocol the runs used]"),
]
PlotOpt = Annotated[
    Optional[Path],
    typer.Option(
        metavar="FILE",
        show_default=False,
        help="Write the runs' curves as PNG, SVG or PDF (by the extension): FID against steps (Figure 1) when "
        "there are evaluations; loss and EMA loss against steps and against training time.",
    ),
]
MarkdownOpt = Annotated[bool, typer.Option("--markdown", help="Print a Markdown table instead.")]


@app.command(epilog=EXAMPLES)
def compare(
    run_dirs: RunDirsArg = None,
    presets: PresetsOpt = None,
    measure: MeasureOpt = False,
    protocol: ReadProtocolOpt = None,
    plot: PlotOpt = None,
    markdown: MarkdownOpt = False,
    device: DeviceOpt = DeviceChoice.auto,
    as_json: JsonOpt = False,
) -> None:
    """Put runs side by side as the paper's Table 1: best checkpoint (lowest FID) Steps x 10^-6 / FID / KID x 10^4.

    Reads each run's config.toml and the evaluation records (kind "eval") in its metrics.jsonl, written by
    `tdiff eval` or by training with --eval-every. With --presets and no runs, compares configurations.
    """
    if as_json and markdown:
        raise UserError("--json and --markdown: choose one")
    if presets is not None:
        if run_dirs:
            raise UserError("--presets compares configurations, RUN_DIRs compare runs: give one or the other")
        if plot is not None:
            raise UserError("--plot draws the curves of runs; it does not go with --presets")
        _compare_presets(
            [name.strip() for name in presets.split(",") if name.strip()],
            measure,
            device,
            as_json=as_json,
            markdown=markdown,
        )
        return
    if measure:
        raise UserError("--measure goes with --presets (it times configurations, not runs)")
    if not run_dirs:
        raise UserError("give run directories to compare, or --presets A,B,...")
    if plot is not None:
        _check_plot_format(plot)
    _compare_runs(run_dirs, protocol.value if protocol else None, plot, as_json=as_json, markdown=markdown)


def _compare_presets(names: list[str], measure: bool, device: DeviceChoice, *, as_json: bool, markdown: bool) -> None:
    """--presets: the configurations' sizes and costs side by side (and, with --measure, their speed)."""
    from tdiff.report import model_summary

    columns = [model_summary(resolve_config(name, None), name) for name in names]
    rows = [
        ("Table 1 name", lambda c: c["table1_name"]),
        ("parameters", lambda c: _millions(c["params_total"])),
        ("effective depth", lambda c: str(c["effective_depth"])),
        ("GFLOP/image", lambda c: f"{c['gflops_per_image']:.3f}"),
    ]
    if measure:
        from tdiff.report import measure_throughput
        from tdiff.sample import resolve_device

        torch_device = resolve_device(device.value)
        for column in columns:
            if not as_json:
                stderr.print(f"measuring {column['name']} on {torch_device}", highlight=False)
            column.update(measure_throughput(resolve_config(column["name"], None), torch_device))
        rows += [
            ("train images/s", lambda c: f"{c['train_images_per_second']:.1f}"),
            ("sample images/s", lambda c: f"{c['sample_images_per_second']:.2f}"),
        ]
    if as_json:
        print_json({"presets": columns})
        return
    title = "Configurations" + (f" (measured on {columns[0]['device']})" if measure and columns else "")
    _compare_output(title, columns, rows, markdown)


def _compare_runs(
    run_dirs: list[Path], protocol: str | None, plot: Path | None, *, as_json: bool, markdown: bool
) -> None:
    """RUN_DIRs: each run's best evaluated checkpoint as Table 1 (and the curves with --plot)."""
    from tdiff.report import compare_runs

    report = compare_runs(run_dirs, protocol)
    for run in report["runs"]:
        if run["skipped_lines"]:
            lines = ", ".join(map(str, run["skipped_lines"][:5])) + (", ..." if len(run["skipped_lines"]) > 5 else "")
            stderr.print(
                f"warning: {run['path']}/metrics.jsonl: skipped {len(run['skipped_lines'])} torn or "
                f"undecodable line(s) ({lines})",
                highlight=False,
                soft_wrap=True,
            )
    plotted = _plot_runs(report, plot) if plot is not None else None
    if as_json:
        print_json({**report, "plot": str(plotted) if plotted else None})
        return

    def best(key: str, fmt: Callable) -> Callable:
        return lambda c: fmt(c["best"][key]) if c["best"] and c["best"].get(key) is not None else "-"

    rows = [
        ("Table 1 name", lambda c: c["table1_name"]),
        ("parameters", lambda c: _millions(c["params_total"])),
        ("effective depth", lambda c: str(c["effective_depth"])),
        ("Steps (x10^-6)", best("step", _steps_millions)),
        ("FID", best("fid", "{:.2f}".format)),
        ("KID (x10^4)", best("kid_x1e4", "{:.2f}".format)),
        ("samples per evaluation", best("n", "{:,}".format)),
        ("evaluations", lambda c: str(c["evaluations"])),
    ]
    protocol_text = f"{report['protocol']} protocol" if report["protocol"] else "no evaluations yet"
    _compare_output(f"Best checkpoint (lowest FID), {protocol_text}", report["runs"], rows, markdown)
    if plotted:
        stderr.print(f"wrote {plotted}", highlight=False)
