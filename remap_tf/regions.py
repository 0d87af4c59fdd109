"""The R-MAC multi-scale region grid (Tolias, Sicre & Jégou, ICLR 2016).

A region grid is a pure function of the feature-map shape and the number of scales. It is
computed once, in NumPy, never inside a traced graph.

How other input sizes map onto the grid
---------------------------------------
REMAP learns one weight per (layer, region), so region ``i`` must mean the same part of the
image for every input. The model therefore fixes the grid once, on a *reference* feature-map
shape (default 24×32, the map of a 1024×768 landscape image at stride 32, which gives the
40 regions the REMAP paper found best with L=4), and expresses it in relative coordinates
(`relative_regions`). At run time those fractions are scaled to whatever map arrives
(`scale_regions`): a 16×16 map from a square image or a 32×24 map from a portrait image gets
the same 40 regions, stretched to its aspect ratio, each covering at least one cell. Region
count and order never depend on the input size.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from remap_tf.checks import check_int
from remap_tf.errors import InvalidInputError

# Candidate region counts along the long side of the map at the coarsest scale, minus one
# (R-MAC tries 2..7 regions and keeps the count whose overlap is closest to 40%).
_STEPS = np.arange(2, 8, dtype=np.float64)
_TARGET_OVERLAP = 0.4


def rmac_regions(height: int, width: int, levels: int = 4) -> np.ndarray:
    """Returns the R-MAC multi-scale overlapping square regions of a feature map.

    Scale ``l = 1..levels`` uses squares of side ``floor(2·min(H, W) / (l + 1))`` (at least 1),
    ``l + m`` of them along the width and ``l + n`` along the height, evenly spaced from edge
    to edge; ``m`` (or ``n``) is the extra count along the long side that makes consecutive
    coarsest-scale regions overlap as close to 40% as possible, and is 0 on a square map.
    Follows the reference implementation of Tolias et al. (also cirtorch's ``rmac``) except
    that a side that would round to 0 on a tiny map is kept at 1, so the count never changes.

    Args:
        height: feature-map height in cells, >= 1.
        width: feature-map width in cells, >= 1.
        levels: number of scales ``L``, >= 1.

    Returns:
        int32 array of shape ``(num_regions, 4)``; each row is ``(top, left, bottom, right)``
        with bottom and right exclusive. Rows are ordered by scale, then top, then left.

    Example:
        >>> rmac_regions(24, 32, 4).shape   # a 1024x768 image at stride 32
        (40, 4)
    """
    height = check_int("height", height, minimum=1)
    width = check_int("width", width, minimum=1)
    levels = check_int("levels", levels, minimum=1)

    short = min(height, width)
    extra = 0
    if height != width:
        step = (max(height, width) - short) / (_STEPS - 1)
        overlap = (short**2 - short * step) / short**2
        extra = int(np.argmin(np.abs(overlap - _TARGET_OVERLAP))) + 1
    extra_w = extra if width > height else 0
    extra_h = extra if height > width else 0

    rows = []
    for level in range(1, levels + 1):
        side = max(1, math.floor(2 * short / (level + 1)))
        half = math.floor(side / 2 - 1)
        tops = _starts(height, side, level + extra_h, half)
        lefts = _starts(width, side, level + extra_w, half)
        for top in tops:
            for left in lefts:
                rows.append((top, left, top + side, left + side))
    return np.asarray(rows, dtype=np.int32)


def _starts(size: int, side: int, count: int, half: int) -> list[int]:
    """Evenly spaced region starts from 0 to ``size - side`` (R-MAC's centre rounding)."""
    step = 0.0 if count == 1 else (size - side) / (count - 1)
    return [int(math.floor(half + i * step) - half) for i in range(count)]


def num_regions(levels: int, grid_shape: tuple[int, int] = (24, 32)) -> int:
    """Number of regions for ``levels`` scales on a reference map of ``grid_shape``."""
    return int(rmac_regions(grid_shape[0], grid_shape[1], levels).shape[0])


def relative_regions(levels: int = 4, grid_shape: tuple[int, int] = (24, 32)) -> np.ndarray:
    """The grid of `rmac_regions` on ``grid_shape`` as fractions of the map.

    Returns:
        float64 array ``(num_regions, 4)`` of ``(top, left, bottom, right)`` in [0, 1].
    """
    if len(grid_shape) != 2:
        raise InvalidInputError(f"`grid_shape` must be (height, width), received {grid_shape!r}.")
    h, w = (check_int("grid_shape", v, minimum=1) for v in grid_shape)
    regions = rmac_regions(h, w, levels).astype(np.float64)
    return regions / np.array([h, w, h, w], dtype=np.float64)


# Absorbs float error in fraction * size (8/24 * 24 = 7.9999...), so that the reference shape
# maps back onto exactly the integer grid it came from.
ROUNDING_SLACK = 1e-6


def scale_regions(relative: np.ndarray, height: int, width: int) -> np.ndarray:
    """Maps relative regions onto a ``height × width`` map; every region keeps >= 1 cell.

    Args:
        relative: ``(num_regions, 4)`` fractions from `relative_regions`.
        height, width: the map size in cells.

    Returns:
        int32 ``(num_regions, 4)`` of ``(top, left, bottom, right)``, bottom/right exclusive.
    """
    height = check_int("height", height, minimum=1)
    width = check_int("width", width, minimum=1)
    size = np.array([height, width, height, width], dtype=np.float64)
    scaled = np.asarray(relative, dtype=np.float64) * size
    start = np.floor(scaled[:, :2] + ROUNDING_SLACK)
    end = np.ceil(scaled[:, 2:] - ROUNDING_SLACK)
    start = np.minimum(start, size[:2] - 1)
    end = np.clip(np.maximum(end, start + 1), 1, size[:2])
    return np.concatenate([start, end], axis=1).astype(np.int32)


def distinct_regions(relative: np.ndarray, height: int, width: int) -> int:
    """How many of the ``relative`` regions differ once mapped onto a ``height x width`` map.

    On small maps several regions land on the same cells: their vectors are identical, so
    their weights act as one and training cannot tell them apart.
    """
    return int(len(np.unique(scale_regions(relative, height, width), axis=0)))


@functools.lru_cache(maxsize=32)
def min_distinct_long_side(
    levels: int = 4, grid_shape: tuple[int, int] = (24, 32), max_aspect: float = 2.0
) -> int:
    """The smallest long side, in cells, from which every map keeps all regions distinct.

    Every map whose long side is at least this and whose aspect ratio is within
    ``max_aspect`` (either orientation) has ``num_regions(levels, grid_shape)`` distinct
    regions. For the default grid (L=4 on 24x32): 9 cells, i.e. 288 px at stride 32 (an
    8x6 map has 36 distinct regions of 40, a 3x3 map 15).
    """
    relative = relative_regions(levels, tuple(grid_shape))
    total = len(relative)
    worst = 1
    # From the reference map's size on, scaling only spreads distinct regions further apart.
    for long_side in range(1, max(grid_shape) + 1):
        shortest = max(1, math.ceil(long_side / max_aspect))
        for short_side in range(shortest, long_side + 1):
            for h, w in ((short_side, long_side), (long_side, short_side)):
                if distinct_regions(relative, h, w) < total:
                    worst = long_side + 1
    return worst
