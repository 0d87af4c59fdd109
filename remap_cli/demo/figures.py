"""Figures for the demo report, as standalone SVG files (no matplotlib, no TensorFlow).

Two figures:

* `training_curve_svg`: the triplet loss against the training step for several runs.
* `region_weights_svg`: REMAP's region weights drawn over the R-MAC region grid (Tolias,
  Sicre & Jégou, ICLR 2016; 40 regions on the default 24×32 reference map), one small panel
  per scale and one row per (layer, state). Regions of one scale overlap by about 40%, so a
  panel draws each region as a tile at its grid position (row, column of its centre) rather
  than as its true overlapping square, and prints the weight in it; the caption gives the
  true region side.

SVG keeps the text sharp at any zoom and is plain text, so figures are reproducible byte for
byte. `write_svg` writes atomically.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from remap_tf.errors import InvalidInputError
from remap_tf.io import atomic_write_text

# A perceptually ordered blue-green-yellow ramp (anchors of matplotlib's viridis, public
# domain), interpolated linearly.
_RAMP = np.array(
    [
        [68, 1, 84],
        [59, 82, 139],
        [33, 145, 140],
        [94, 201, 98],
        [253, 231, 37],
    ],
    dtype=np.float64,
)
# Line colours for up to 8 runs (Okabe & Ito's colour-blind-safe palette).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
_FONT = "font-family='DejaVu Sans, Arial, sans-serif'"


def ramp_colour(value: float) -> str:
    """The ramp colour of ``value`` in [0, 1] (clipped) as ``#rrggbb``."""
    x = float(np.clip(value, 0.0, 1.0)) * (len(_RAMP) - 1)
    i = min(int(x), len(_RAMP) - 2)
    rgb = _RAMP[i] + (x - i) * (_RAMP[i + 1] - _RAMP[i])
    return "#" + "".join(f"{int(round(c)):02x}" for c in rgb)


def _text_colour(value: float) -> str:
    return "#000000" if value > 0.55 else "#ffffff"


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not high > low:
        return [low]
    step = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(step))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step), default=step)
    start = math.ceil(low / step) * step
    ticks = []
    value = start
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.0e}"
    return f"{value:g}"


def training_curve_svg(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "Training loss",
    x_label: str = "training step",
    y_label: str = "triplet loss",
    width: int = 640,
    height: int = 320,
) -> str:
    """An SVG line chart of one curve per run.

    Args:
        curves: run name -> ``(steps, values)``, two sequences of equal length.
        title, x_label, y_label: captions.
        width, height: size in pixels.

    Returns:
        the SVG document as a string.

    Raises:
        ValueError: no curve, or a curve whose steps and values differ in length.
    """
    series = _curve_series(curves)
    all_x = np.concatenate([s for _, s, _ in series] + [np.zeros(1)])
    all_y = np.concatenate([v for _, _, v in series] + [np.zeros(1)])
    box = _PlotBox(64, 36, width - 64 - 150, height - 36 - 48)
    # The legend sits right of the plot: widen the figure so the longest name fits
    # (about 7 px per character at font-size 12, plus the colour swatch).
    width = max(width, int(box.left + box.width + 14 + 28 + 7 * max(len(n) for n, _, _ in series)))
    box.x_max = float(all_x.max()) or 1.0
    box.y_max = float(all_y.max()) * 1.05 or 1.0
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' {_FONT} font-size='12'>",
        f"<rect width='{width}' height='{height}' fill='white'/>",
        f"<text x='{box.left}' y='22' font-size='15' font-weight='bold'>"
        f"{html.escape(title)}</text>",
        *_axes(box, height, x_label, y_label),
    ]
    for i, (name, steps, values) in enumerate(series):
        parts.extend(_series_line(box, i, name, steps, values))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _curve_series(curves) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, steps, values)`` per curve, non-finite points dropped; checked lengths."""
    if not curves:
        raise InvalidInputError("`curves` is empty: nothing to plot.")
    series = []
    for name, (steps, values) in curves.items():
        steps = np.asarray(steps, dtype=np.float64).reshape(-1)
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if steps.shape != values.shape:
            raise InvalidInputError(
                f"Curve {name!r} has {steps.size} steps but {values.size} values."
            )
        keep = np.isfinite(steps) & np.isfinite(values)
        series.append((str(name), steps[keep], values[keep]))
    return series


class _PlotBox:
    """The plotting area and its data-to-pixel mapping (y grows upwards)."""

    def __init__(self, left: float, top: float, width: float, height: float):
        self.left, self.top, self.width, self.height = left, top, width, height
        self.x_max = self.y_max = 1.0

    def sx(self, x) -> float:
        return self.left + self.width * x / self.x_max

    def sy(self, y) -> float:
        return self.top + self.height * (1 - y / self.y_max)


def _axes(box: _PlotBox, height: int, x_label: str, y_label: str) -> list[str]:
    """Grid lines, ticks, frame and axis labels."""
    left, top, plot_w, plot_h = box.left, box.top, box.width, box.height
    parts = []
    for tick in _nice_ticks(0.0, box.y_max):
        y = box.sy(tick)
        parts.append(
            f"<line x1='{left}' y1='{y:.1f}' x2='{left + plot_w}' y2='{y:.1f}' stroke='#e5e5e5'/>"
        )
        parts.append(
            f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end'>{_fmt_tick(tick)}</text>"
        )
    for tick in _nice_ticks(0.0, box.x_max):
        x = box.sx(tick)
        parts.append(
            f"<line x1='{x:.1f}' y1='{top + plot_h}' x2='{x:.1f}' y2='{top + plot_h + 4}' "
            "stroke='#333'/>"
        )
        parts.append(
            f"<text x='{x:.1f}' y='{top + plot_h + 17}' text-anchor='middle'>"
            f"{_fmt_tick(tick)}</text>"
        )
    parts.append(
        f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='none' stroke='#333'/>"
    )
    parts.append(
        f"<text x='{left + plot_w / 2:.1f}' y='{height - 8}' text-anchor='middle'>"
        f"{html.escape(x_label)}</text>"
    )
    parts.append(
        f"<text transform='translate(16 {top + plot_h / 2:.1f}) rotate(-90)' "
        f"text-anchor='middle'>{html.escape(y_label)}</text>"
    )
    return parts


def _series_line(box: _PlotBox, i: int, name: str, steps, values) -> list[str]:
    """One curve and its legend entry, in the i-th palette colour."""
    colour = PALETTE[i % len(PALETTE)]
    parts = []
    if steps.size:
        points = " ".join(
            f"{box.sx(x):.1f},{box.sy(y):.1f}" for x, y in zip(steps, values, strict=True)
        )
        parts.append(
            f"<polyline points='{points}' fill='none' stroke='{colour}' stroke-width='2'/>"
        )
        if steps.size == 1:
            parts.append(
                f"<circle cx='{box.sx(steps[0]):.1f}' cy='{box.sy(values[0]):.1f}' r='3' "
                f"fill='{colour}'/>"
            )
    y = box.top + 10 + 20 * i
    x = box.left + box.width + 14
    parts.append(
        f"<line x1='{x}' y1='{y}' x2='{x + 22}' y2='{y}' stroke='{colour}' stroke-width='3'/>"
    )
    parts.append(f"<text x='{x + 28}' y='{y + 4}'>{html.escape(name)}</text>")
    return parts


def region_layout(regions: np.ndarray) -> list[dict]:
    """Groups R-MAC regions by scale and gives each its tile position in the scale's grid.

    Args:
        regions: ``(num_regions, 4)`` ``(top, left, bottom, right)`` in any unit (cells of
            `remap_tf.regions.rmac_regions`, or fractions), ordered by scale then top then
            left, as `rmac_regions` returns them; every region of one scale has the same side.

    Returns:
        one dict per scale, in order: ``{"indices": [region indices], "rows": r, "cols": c,
        "positions": [(row, col), ...], "side": (height, width) of its regions}``.
    """
    regions = np.asarray(regions, dtype=np.float64)
    if regions.ndim != 2 or regions.shape[1] != 4 or len(regions) == 0:
        raise InvalidInputError(f"`regions` must be (num_regions, 4), received {regions.shape}.")
    sides = np.round(regions[:, 2:] - regions[:, :2], 9)
    scales: list[list[int]] = []
    for i in range(len(regions)):
        if scales and np.array_equal(sides[i], sides[scales[-1][0]]):
            scales[-1].append(i)
        else:
            scales.append([i])
    layout = []
    for indices in scales:
        tops = sorted(set(np.round(regions[indices, 0], 9)))
        lefts = sorted(set(np.round(regions[indices, 1], 9)))
        positions = [
            (tops.index(round(regions[i, 0], 9)), lefts.index(round(regions[i, 1], 9)))
            for i in indices
        ]
        layout.append(
            {
                "indices": indices,
                "rows": len(tops),
                "cols": len(lefts),
                "positions": positions,
                "side": tuple(float(v) for v in sides[indices[0]]),
            }
        )
    return layout


def region_weights_svg(
    rows: Sequence[tuple[str, np.ndarray]],
    regions: np.ndarray,
    grid_shape: tuple[int, int] = (24, 32),
    title: str = "Region weights",
    panel_width: int = 180,
) -> str:
    """An SVG heatmap of region weights: one row per entry, one panel per scale.

    Colours share one scale, from the smallest to the largest weight of all rows, so rows
    (e.g. before and after training) compare directly and the small spread of weights that
    average 1 stays visible; each weight is also printed in its tile.

    Args:
        rows: ``(label, weights (num_regions,))`` per row, e.g. ``("layer 1\nlearned", w)``;
            a newline in a label starts a second line.
        regions: ``(num_regions, 4)`` region boxes in cells of the reference map
            (`remap_tf.regions.rmac_regions(*grid_shape, levels)`).
        grid_shape: the reference map ``(height, width)`` the regions are drawn on.
        title: the figure title.
        panel_width: width of one scale's panel in pixels.

    Returns:
        the SVG document as a string.
    """
    layout = region_layout(regions)
    checked = _weight_rows(rows, len(np.asarray(regions)))
    low = min(float(w.min()) for _, w in checked)
    high = max(float(w.max()) for _, w in checked)
    gh, gw = grid_shape
    geometry = _Panels(panel_width, panel_width * gh / gw, len(layout), len(checked))
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{geometry.width}' "
        f"height='{geometry.height}' viewBox='0 0 {geometry.width} {geometry.height}' "
        f"{_FONT} font-size='11'>",
        f"<rect width='{geometry.width}' height='{geometry.height}' fill='white'/>",
        f"<text x='8' y='20' font-size='15' font-weight='bold'>{html.escape(title)}</text>",
    ]
    for s, scale in enumerate(layout):
        x0 = geometry.x(s)
        side_w = scale["side"][1]
        parts.append(
            f"<text x='{x0 + panel_width / 2:.1f}' y='{geometry.head - 8}' text-anchor='middle' "
            f"font-weight='bold'>scale {s + 1}: {len(scale['indices'])} regions</text>"
        )
        parts.append(
            f"<text x='{x0 + panel_width / 2:.1f}' y='{geometry.below + 16:.1f}' "
            f"text-anchor='middle' fill='#555'>side {side_w / gw:.0%} of width</text>"
        )
    for r, (label, weights) in enumerate(checked):
        parts.extend(_weight_row(geometry, r, label, weights, layout, low, high))
    parts.extend(_colour_bar(geometry, low, high))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _weight_rows(rows, count: int) -> list[tuple[str, np.ndarray]]:
    if not rows:
        raise InvalidInputError("`rows` is empty: nothing to draw.")
    checked = []
    for label, weights in rows:
        weights = np.asarray(weights, dtype=np.float64).reshape(-1)
        if weights.shape != (count,):
            raise InvalidInputError(
                f"Row {label!r} has {weights.size} weights for {count} regions."
            )
        checked.append((str(label), weights))
    return checked


class _Panels:
    """Where the panels of `region_weights_svg` go: one column per scale, one row per entry."""

    label_w, gap, head, caption = 170, 14, 44, 34

    def __init__(self, panel_w: float, panel_h: float, scales: int, rows: int):
        self.panel_w, self.panel_h = panel_w, panel_h
        self.width = int(self.label_w + scales * (panel_w + self.gap) + self.gap)
        self.row_h = panel_h + self.caption
        self.below = self.head + (rows - 1) * self.row_h + panel_h  # bottom of the last row
        self.height = int(self.below + 60)

    def x(self, scale: int) -> float:
        return self.label_w + scale * (self.panel_w + self.gap)

    def y(self, row: int) -> float:
        return self.head + row * self.row_h


def _weight_row(geometry: _Panels, r: int, label: str, weights, layout, low, high) -> list[str]:
    """One entry: its label, then a panel of tiles per scale."""
    spread = high - low if high > low else 1.0
    y0 = geometry.y(r)
    lines = label.split("\n")
    first = y0 + geometry.panel_h / 2 - 7 * (len(lines) - 1)
    parts = [
        f"<text x='8' y='{first + 14 * n:.1f}' font-weight='bold'>{html.escape(line)}</text>"
        for n, line in enumerate(lines)
    ]
    parts.append(
        f"<text x='8' y='{first + 14 * len(lines) + 2:.1f}' fill='#555'>"
        f"min {weights.min():.2f} · max {weights.max():.2f}</text>"
    )
    for s, scale in enumerate(layout):
        x0 = geometry.x(s)
        tile_w = geometry.panel_w / scale["cols"]
        tile_h = geometry.panel_h / scale["rows"]
        for index, (row, col) in zip(scale["indices"], scale["positions"], strict=True):
            value = (weights[index] - low) / spread
            x, y = x0 + col * tile_w, y0 + row * tile_h
            parts.append(
                f"<rect x='{x:.1f}' y='{y:.1f}' width='{tile_w:.1f}' height='{tile_h:.1f}' "
                f"fill='{ramp_colour(value)}' stroke='white' stroke-width='1'>"
                f"<title>region {index}: weight {weights[index]:.3f}</title></rect>"
            )
            if tile_w >= 24:
                parts.append(
                    f"<text x='{x + tile_w / 2:.1f}' y='{y + tile_h / 2 + 4:.1f}' "
                    f"text-anchor='middle' fill='{_text_colour(value)}'>"
                    f"{weights[index]:.2f}</text>"
                )
        parts.append(
            f"<rect x='{x0}' y='{y0}' width='{geometry.panel_w}' "
            f"height='{geometry.panel_h:.1f}' fill='none' stroke='#333'/>"
        )
    return parts


def _colour_bar(geometry: _Panels, low: float, high: float) -> list[str]:
    """The colour scale, from the smallest to the largest weight."""
    bar_y, bar_x = geometry.height - 12, geometry.label_w
    bar_w = min(240, geometry.width - geometry.label_w - 8)
    parts = [
        f"<rect x='{bar_x + i * bar_w / 24:.1f}' y='{bar_y - 8}' "
        f"width='{bar_w / 24 + 0.5:.1f}' height='8' fill='{ramp_colour(i / 23)}'/>"
        for i in range(24)
    ]
    parts.append(
        f"<text x='{bar_x - 6}' y='{bar_y}' text-anchor='end' fill='#555'>{low:.2f}</text>"
        f"<text x='{bar_x + bar_w + 6}' y='{bar_y}' fill='#555'>{high:.2f}</text>"
    )
    return parts


def write_svg(path, svg: str) -> Path:
    """Writes ``svg`` to ``path`` atomically (temporary file, then rename)."""
    return atomic_write_text(path, svg)
