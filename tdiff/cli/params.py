"""`tdiff params`: a model's parameters, effective depth and forward cost."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.measure import Measurement
from rich.table import Table

from tdiff.cli import JsonOpt, PresetOpt, SetOpt, _millions, app, print_json, resolve_config, stdout
from tdiff.errors import UserError


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
        (
            "order",
            lambda s: s["order"] if len(s["order"]) <= (6 if wide else 32) else s["order"][: (5 if wide else 30)] + "…",
        ),
        ("width", lambda s: str(s["width"]) if wide else f"{s['width']} (d_ff {s['d_ff']})"),
        ("GFLOP/image", lambda s: f"{s['gflops_per_image']:.3f}"),
        ("  + attention", lambda s: f"{s['gflops_attention_per_image']:.3f}"),
        ("fp32 weights, MiB", lambda s: f"{s['param_bytes_fp32'] / 2**20:.1f}"),
    ]


def _params_table(summaries: list[dict]) -> Table:
    """One column per configuration, as Table 1; `_params_rows` when that is wider than the terminal."""
    table = Table(title="Model size and forward cost (one image)")
    table.add_column("", no_wrap=True)
    for s in summaries:
        table.add_column(s["name"] or s["table1_name"], justify="right", no_wrap=True)
    for label, cell in _param_rows(wide=len(summaries) > 1):
        table.add_row(label, *(cell(s) for s in summaries))
    if Measurement.get(stdout, stdout.options.update_width(10_000), table).maximum > stdout.width:
        return _params_rows(summaries)
    return table


def _params_rows(summaries: list[dict]) -> Table:
    """One row per configuration: the narrow layout of the same numbers (80 columns hold it)."""
    table = Table(title="Model size and forward cost (one image)")
    columns = [
        ("preset", lambda s: s["name"] or s["table1_name"]),
        ("params", lambda s: _millions(s["params_total"])),
        ("blocks×uses", lambda s: f"{s['depth']}×{s['substeps']}"),
        ("depth", lambda s: str(s["effective_depth"])),
        ("order", lambda s: s["order"] if len(s["order"]) <= 8 else s["order"][:7] + "…"),
        ("width", lambda s: str(s["width"])),
        ("GFLOP", lambda s: f"{s['gflops_per_image']:.2f}"),
        ("MiB fp32", lambda s: f"{s['param_bytes_fp32'] / 2**20:.1f}"),
    ]
    for header, _ in columns:
        table.add_column(header, justify="left" if header in ("preset", "order") else "right", no_wrap=True)
    for s in summaries:
        table.add_row(*(cell(s) for _, cell in columns))
    return table


EXAMPLES = """[bold]Examples[/bold]

  tdiff params --preset d2s8i

  tdiff params --depth 2 --substeps 8 --json

  tdiff params --all --set model.width=1024
"""
DepthOpt = Annotated[Optional[int], typer.Option(min=1, help="Distinct transformer blocks.")]
SubstepsOpt = Annotated[Optional[int], typer.Option(min=1, help="Applications of each block.")]
InterleavedOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--interleaved/--no-interleaved", help="Order 1212... or 11...22... \\[default: interleaved, or the preset's]"
    ),
]
WidthOpt = Annotated[Optional[int], typer.Option(min=1, help="Model width (d_model).")]
PatchOpt = Annotated[Optional[int], typer.Option(min=1, help="Patch side, pixels.")]
ImageSizeOpt = Annotated[Optional[int], typer.Option(min=1, help="Image side, pixels.")]
ChannelsOpt = Annotated[Optional[int], typer.Option(min=1, help="Image channels.")]
ClassesOpt = Annotated[Optional[int], typer.Option(min=0, help="Classes; 0 = unconditional.")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every shipped preset side by side, as Table 1's columns.")]


@app.command(epilog=EXAMPLES)
def params(
    preset: PresetOpt = None,
    overrides: SetOpt = None,
    depth: DepthOpt = None,
    substeps: SubstepsOpt = None,
    interleaved: InterleavedOpt = None,
    width: WidthOpt = None,
    patch_size: PatchOpt = None,
    image_size: ImageSizeOpt = None,
    channels: ChannelsOpt = None,
    classes: ClassesOpt = None,
    all_presets: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a model's parameters, effective depth and forward cost.

    Flags override the preset, so no preset is needed: `tdiff params --depth 2 --substeps 8`.
    Nothing is allocated: models are built on PyTorch's meta device.
    A model too large for this machine is still counted; one beyond PyTorch's 2^63 bytes is refused.
    """
    from tdiff.config import TABLE1_PRESETS, preset_names
    from tdiff.report import model_summary

    flags = {
        "sharing__depth": depth,
        "sharing__substeps": substeps,
        "sharing__interleaved": interleaved,
        "model__width": width,
        "model__patch_size": patch_size,
        "model__image_size": image_size,
        "model__channels": channels,
        "model__num_classes": classes,
    }
    if all_presets and preset:
        raise UserError("--all and --preset: choose one")
    if all_presets:
        names = [name for name in TABLE1_PRESETS if name in preset_names()]
        summaries = [model_summary(resolve_config(name, overrides, **flags), name) for name in names]
    else:
        summaries = [model_summary(resolve_config(preset, overrides, **flags), name=preset or "")]
    if as_json:
        print_json({"presets": summaries} if all_presets else summaries[0])
        return
    stdout.print(_params_table(summaries))
    stdout.print(_device_line(), highlight=False)


def _device_line() -> str:
    """Where `tdiff train` would run by default, and whether --mixed-precision bf16 pays there."""
    import torch

    from tdiff.hardware import describe

    return "this machine: " + describe(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
