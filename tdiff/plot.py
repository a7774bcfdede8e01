"""The figure of `tdiff compare --plot`, drawn with matplotlib: one panel per view, one colour per run.

    FID against training steps    the paper's Figure 1; only when some run holds FID evaluations
    loss against training steps   faint: the logged loss; solid: its EMA (log y)
    loss against training time    the same against elapsed_seconds, training time over all sessions

The format follows the file's extension (PNG, SVG, PDF). matplotlib is imported only when a figure is
drawn, and no pyplot: a bare `Figure` renders to the file, with no display and no global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tdiff.files import atomic_write

FORMATS = ("png", "svg", "pdf")
PANEL_SIZE = (5.2, 4.0)  # inches per panel; the run legend adds a row below
DPI = 150  # PNG pixels per inch: two panels make 1,560 x 675 pixels, three 2,340 x 675


@dataclass(frozen=True)
class RunCurves:
    """What the figure draws of one run: FID by step, and its training log (loss, EMA loss by step and time)."""

    label: str
    fid_steps: list[float]
    fid: list[float]
    steps: list[float]  # one point per log record
    seconds: list[float]  # elapsed_seconds of the same records
    loss: list[float]
    ema_loss: list[float]


def figure_format(path: str | Path) -> str:
    """ "png", "svg" or "pdf" from the file's extension; ValueError for another."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"{path}: the extension picks the format, one of {', '.join('.' + f for f in FORMATS)}")
    return suffix


def time_unit(seconds: float) -> tuple[float, str]:
    """(seconds per unit, unit name) that keeps a time axis reaching `seconds` in readable numbers."""
    if seconds >= 2 * 3600:
        return 3600.0, "hours"
    if seconds >= 2 * 60:
        return 60.0, "minutes"
    return 1.0, "seconds"


def comparison_figure(runs: list[RunCurves], path: str | Path, *, fid_label: str = "FID") -> Path:
    """Write the panels that have data (see the module's docstring) for `runs` to `path`, format by
    its extension. ValueError when no run holds a FID or a loss point."""
    fmt = figure_format(path)
    with_fid = any(r.fid for r in runs)
    with_loss = any(r.loss for r in runs)
    if not (with_fid or with_loss):
        raise ValueError("nothing to plot: the runs hold neither FID evaluations nor training log records")
    from matplotlib.figure import Figure  # heavy; imported where used

    count = with_fid + 2 * with_loss
    figure = Figure(figsize=(PANEL_SIZE[0] * count, PANEL_SIZE[1] + 0.5), layout="constrained")
    axes = list(figure.subplots(1, count, squeeze=False)[0])
    if with_fid:
        draw_fid(axes.pop(0), runs, fid_label)
    if with_loss:
        draw_loss(axes[0], runs, by_time=False)
        draw_loss(axes[1], runs, by_time=True)
    _run_legend(figure, runs)
    path = Path(path)
    atomic_write(path, lambda file: figure.savefig(file, format=fmt, dpi=DPI))
    return path


def colour(index: int) -> str:
    """The colour of the index-th run: matplotlib's "tab10" cycle (C0, C1, ...)."""
    return f"C{index % 10}"


def draw_fid(ax, runs: list[RunCurves], y_label: str) -> None:
    """FID against training steps, a marker per evaluation, log y (FID falls by orders of magnitude)."""
    for index, run in enumerate(runs):
        if run.fid:
            steps, fid = zip(*sorted(zip(run.fid_steps, run.fid)))
            ax.plot(steps, fid, marker="o", markersize=4, color=colour(index))
    _step_axis(ax)
    _log_y(ax)
    ax.set(title="FID against training steps", ylabel=y_label)


def draw_loss(ax, runs: list[RunCurves], *, by_time: bool) -> None:
    """Loss (faint) and EMA loss (solid) against training steps, or against training time; log y."""
    scale, unit = time_unit(max((s for r in runs for s in r.seconds if math.isfinite(s)), default=0.0))
    for index, run in enumerate(runs):
        x = [s / scale for s in run.seconds] if by_time else run.steps
        ax.plot(x, run.loss, color=colour(index), linewidth=0.8, alpha=0.35)
        lone = len(x) == 1  # a single record: a dot, or nothing would show
        ax.plot(x, run.ema_loss, color=colour(index), linewidth=1.8, marker="o" if lone else None)
    if by_time:
        ax.set(title="Loss against training time", xlabel=f"training time ({unit})")
    else:
        _step_axis(ax)
        ax.set(title="Loss against training steps", ylabel="loss")
        _line_style_key(ax)
    _log_y(ax)


def _run_legend(figure, runs: list[RunCurves]) -> None:
    """One entry per run with something drawn, below the panels."""
    from matplotlib.lines import Line2D

    shown = [(index, run.label) for index, run in enumerate(runs) if run.fid or run.loss]
    figure.legend(
        [Line2D([], [], color=colour(index), linewidth=1.8) for index, _ in shown],
        [label for _, label in shown],
        loc="outside lower center",
        ncols=min(len(shown), 4),
        frameon=False,
    )


def _step_axis(ax) -> None:
    from matplotlib.ticker import EngFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins="auto", integer=True))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 20k, 1.5M
    ax.set_xlabel("training step")


def _log_y(ax) -> None:
    """A log y axis with ticks at 1, 2, 3 and 5 x 10^k labelled as plain numbers (0.05, 0.1, 20); on a
    range too narrow for two of them, matplotlib's linear ticks (0.155, 0.156)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.4g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)


def _line_style_key(ax) -> None:
    """A small key inside the panel: faint = loss as logged, solid = its EMA."""
    from matplotlib.lines import Line2D

    key = [Line2D([], [], color="0.3", linewidth=0.8, alpha=0.5), Line2D([], [], color="0.3", linewidth=1.8)]
    ax.legend(key, ["loss", "EMA loss"], loc="upper right", fontsize="small")
