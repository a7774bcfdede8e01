"""A small line plot drawn with PIL: the Figure 1 curves of `tdiff compare --plot` without matplotlib.

`line_plot(series, path, ...)` draws one polyline with point markers per series on shared axes with
"nice" ticks (1, 2, 2.5 or 5 × 10^k), grid lines, axis labels, a title and a legend, and writes a PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tdiff.files import atomic_write

# matplotlib's "tab10": distinct, colour-blind-friendlier than primaries, familiar from papers
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
INK, GRID, BACKGROUND = (40, 40, 40), (225, 225, 225), (255, 255, 255)
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Series:
    label: str
    x: list[float]
    y: list[float]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` evenly spaced round values covering [lo, hi]; the first and last enclose both."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"axis range must be finite, got {lo}..{hi}")
    if hi - lo < 1e-12 * max(abs(lo), abs(hi), 1):  # one value: widen around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def short_number(value: float) -> str:
    """1500000 -> 1.5M, 20000 -> 20k, 2.5 -> 2.5: compact tick labels."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:g}{suffix}"
    return f"{value:g}"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType (>= 10.1)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def line_plot(series: list[Series], path: str | Path, *, title: str = "", x_label: str = "", y_label: str = "",
              size: tuple[int, int] = (900, 560)) -> Path:
    """Draw `series` (each at least one point) on shared axes and write a PNG to `path`."""
    points = [(x, y) for s in series for x, y in zip(s.x, s.y)]
    if not points:
        raise ValueError("nothing to plot: every series is empty")
    k = SUPERSAMPLE  # drawn k times larger, then shrunk: smooth lines without an antialiasing library
    width, height = size[0] * k, size[1] * k
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, small, bold = _font(15 * k), _font(13 * k), _font(18 * k)

    x_ticks = nice_ticks(min(p[0] for p in points), max(p[0] for p in points))
    y_ticks = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    y_labels = [short_number(v) for v in y_ticks]
    # Plot area: room on the left for y tick labels and the rotated axis label, below for x.
    left = (30 + 12) * k + max(_text_size(draw, t, small)[0] for t in y_labels)
    top, right, bottom = (50 if title else 20) * k, width - 20 * k, height - 60 * k
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    inset = 10 * k  # points on the first or last tick stay off the frame

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (left + inset + (x - x0) / (x1 - x0) * (right - left - 2 * inset),
                bottom - inset - (y - y0) / (y1 - y0) * (bottom - top - 2 * inset))

    # Grid, ticks and their labels
    for value, text in zip(y_ticks, y_labels):
        _, py = to_pixel(x0, value)
        draw.line([(left, py), (right, py)], fill=GRID)
        tw, th = _text_size(draw, text, small)
        draw.text((left - 8 * k - tw, py - th / 2 - 2 * k), text, fill=INK, font=small)
    for value in x_ticks:
        px, _ = to_pixel(value, y0)
        draw.line([(px, top), (px, bottom)], fill=GRID)
        text = short_number(value)
        tw, _ = _text_size(draw, text, small)
        draw.line([(px, bottom), (px, bottom + 5 * k)], fill=INK, width=k)
        draw.text((px - tw / 2, bottom + 8 * k), text, fill=INK, font=small)
    draw.rectangle([left, top, right, bottom], outline=INK, width=k)

    # Titles: x label centred below, y label rotated on the left
    if title:
        tw, _ = _text_size(draw, title, bold)
        draw.text(((width - tw) / 2, 14 * k), title, fill=INK, font=bold)
    if x_label:
        tw, _ = _text_size(draw, x_label, font)
        draw.text(((left + right - tw) / 2, height - 28 * k), x_label, fill=INK, font=font)
    if y_label:
        tw, th = _text_size(draw, y_label, font)
        label = Image.new("RGB", (tw + 4 * k, th + 8 * k), BACKGROUND)
        ImageDraw.Draw(label).text((2 * k, 0), y_label, fill=INK, font=font)
        label = label.rotate(90, expand=True)
        image.paste(label, (6 * k, int((top + bottom - label.height) / 2)))

    # The curves: a polyline and a marker per point, in the order given
    for index, s in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        pixels = [to_pixel(x, y) for x, y in sorted(zip(s.x, s.y))]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=3 * k, joint="curve")
        for px, py in pixels:
            draw.ellipse([px - 4 * k, py - 4 * k, px + 4 * k, py + 4 * k], fill=colour)

    # Legend, top right inside the axes
    rows = [(s.label, PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)]
    text_w = max(_text_size(draw, label, small)[0] for label, _ in rows)
    box_w, row_h = text_w + 44 * k, 20 * k
    bx, by = right - box_w - 10 * k, top + 10 * k
    draw.rectangle([bx, by, bx + box_w, by + row_h * len(rows) + 8 * k], fill=BACKGROUND, outline=GRID, width=k)
    for i, (label, colour) in enumerate(rows):
        cy = by + 4 * k + row_h * i + row_h / 2
        draw.line([(bx + 8 * k, cy), (bx + 30 * k, cy)], fill=colour, width=3 * k)
        _, th = _text_size(draw, label, small)
        draw.text((bx + 36 * k, cy - th / 2 - 3 * k), label, fill=INK, font=small)
    image = image.resize(size, Image.Resampling.LANCZOS)

    path = Path(path)
    atomic_write(path, lambda file: image.save(file, format="PNG"))
    return path
