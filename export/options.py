"""How images become model input in an exported graph: `ExportOptions`, checked once.

Standard library only, so ``remap export`` checks its flags before it loads TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math

from remap_tf.contract import DEFAULT_IMAGE_SIZE, DEFAULT_MAX_PIXELS, MIN_IMAGE_SIZE
from remap_tf.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """How images are turned into model input in the exported graph (validated once).

    Attributes:
        image_size: long side, in pixels, that every image is resized to (aspect kept; the
            short side is at least `MIN_IMAGE_SIZE`). Ignored when the model has a fixed input size.
        scales: factors of ``image_size`` at which each image is embedded; descriptors are
            summed then L2-normalised. ``(1.0,)`` is single-scale.
        max_pixels: largest ``height * width`` accepted, read from the file header before
            decoding.
        fixed_size: ``(height, width)`` when the model's input size is fixed, else None.
    """

    image_size: int = DEFAULT_IMAGE_SIZE
    scales: tuple[float, ...] = (1.0,)
    max_pixels: int = DEFAULT_MAX_PIXELS
    fixed_size: tuple[int, int] | None = None

    def __post_init__(self):
        if isinstance(self.image_size, bool) or int(self.image_size) != self.image_size:
            raise InvalidInputError(
                f"`image_size` must be an integer, received {self.image_size!r}."
            )
        if self.image_size < MIN_IMAGE_SIZE:
            raise InvalidInputError(
                f"`image_size` must be >= {MIN_IMAGE_SIZE}, received {self.image_size}."
            )
        scales = tuple(float(s) for s in self.scales)
        if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise InvalidInputError(f"`scales` must be positive numbers, received {self.scales!r}.")
        if len(set(scales)) != len(scales):
            raise InvalidInputError(f"`scales` must not repeat a value, received {self.scales!r}.")
        for s in scales:
            if round(self.image_size * s) < MIN_IMAGE_SIZE:
                raise InvalidInputError(
                    f"Scale {s} of image_size {self.image_size} gives a side below "
                    f"{MIN_IMAGE_SIZE} px."
                )
        object.__setattr__(self, "scales", scales)
        if isinstance(self.max_pixels, bool) or int(self.max_pixels) != self.max_pixels:
            raise InvalidInputError(
                f"`max_pixels` must be an integer, received {self.max_pixels!r}."
            )
        if self.max_pixels < 1:
            raise InvalidInputError(f"`max_pixels` must be >= 1, received {self.max_pixels}.")
        if self.fixed_size is not None and len(self.scales) > 1:
            raise InvalidInputError(
                f"Multi-scale export needs a model with a variable input size; this model's is "
                f"fixed at {self.fixed_size}."
            )

    def sizes(self) -> list[int]:
        """The long side at every scale."""
        return [int(round(self.image_size * s)) for s in self.scales]
