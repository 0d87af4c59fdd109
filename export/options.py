"""How images become model input in an exported graph: `ExportOptions`, checked once.

Standard library only, so ``remap export`` checks its flags before it loads TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math

from remap_tf.checks import check_int
from remap_tf.contract import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_PIXELS,
    MAX_IMAGE_SIZE,
    MAX_PIXELS_LIMIT,
    MIN_IMAGE_SIZE,
)
from remap_tf.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """How images are turned into model input in the exported graph (validated once).

    Attributes:
        image_size: long side, in pixels, that every image is resized to (aspect kept; the
            short side is at least `MIN_IMAGE_SIZE`), from `MIN_IMAGE_SIZE` to
            `MAX_IMAGE_SIZE`. Ignored when the model has a fixed input size.
        scales: factors of ``image_size`` at which each image is embedded; descriptors are
            summed then L2-normalised. ``(1.0,)`` is single-scale. Every scaled long side
            lies from `MIN_IMAGE_SIZE` to `MAX_IMAGE_SIZE` too.
        max_pixels: largest ``height * width`` accepted, read from the file header before
            decoding; at most `MAX_PIXELS_LIMIT`.
        fixed_size: ``(height, width)`` when the model's input size is fixed, else None.
    """

    image_size: int = DEFAULT_IMAGE_SIZE
    scales: tuple[float, ...] = (1.0,)
    max_pixels: int = DEFAULT_MAX_PIXELS
    fixed_size: tuple[int, int] | None = None

    def __post_init__(self):
        check_int("`image_size`", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        object.__setattr__(self, "scales", _check_scales(self.image_size, self.scales))
        check_int("`max_pixels`", self.max_pixels, 1, MAX_PIXELS_LIMIT)
        if self.fixed_size is not None and len(self.scales) > 1:
            raise InvalidInputError(
                f"Multi-scale export needs a model with a variable input size; this model's is "
                f"fixed at {self.fixed_size}."
            )

    def sizes(self) -> list[int]:
        """The long side at every scale."""
        return [int(round(self.image_size * s)) for s in self.scales]


def _check_scales(image_size: int, given) -> tuple[float, ...]:
    """``given`` as floats if each is positive, none repeats and each scaled side is in range."""
    scales = tuple(float(s) for s in given)
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise InvalidInputError(f"`scales` must be positive numbers, received {given!r}.")
    if len(set(scales)) != len(scales):
        raise InvalidInputError(f"`scales` must not repeat a value, received {given!r}.")
    for s in scales:
        side = round(image_size * s)
        if side < MIN_IMAGE_SIZE:
            raise InvalidInputError(
                f"Scale {s} of image_size {image_size} gives a side below {MIN_IMAGE_SIZE} px."
            )
        if side > MAX_IMAGE_SIZE:
            raise InvalidInputError(
                f"Scale {s} of image_size {image_size} gives a side of {side} px, above the "
                f"{MAX_IMAGE_SIZE} px limit."
            )
    return scales
