"""remap_tf: REMAP global image descriptors (Husain & Bober, IEEE TIP 2019) in Keras 3.

``REMAP(backbone=...)`` builds a ``keras.Model`` from RGB 0-255 images ``(batch, h, w, 3)``
to L2-normalised descriptors ``(batch, dim)``; ``rmac_regions(height, width, levels)`` is the
R-MAC region grid.

The package is layered (docs/architecture.md): this core imports nothing else of the project;
`remap_tf.training`, `remap_tf.export` and `remap_tf.serving` import only the core, never each
other; the ``remap`` command and the demo (`remap_cli`) sit on top.

Importing ``remap_tf`` is cheap: it does not import TensorFlow. The model API below is loaded
on first use (``remap_tf.REMAP`` imports `remap_tf.model`), and the modules that only state the
shared contract (`remap_tf.contract`, `remap_tf.errors`, `remap_tf.io`, `remap_tf.specs`,
`remap_tf.evaluation`, `remap_tf.datasets`) never import TensorFlow at all. The project's Keras
objects (layers, losses) are registered for deserialisation the moment Keras is imported, or
at once if it already is, so every model the project writes loads after ``import remap_tf``::

    import keras, remap_tf
    model = keras.saving.load_model("run/model.keras", safe_mode=True)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import wrapt

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access).
_API = {
    "BACKBONES": "remap_tf.specs",
    "POOLINGS": "remap_tf.specs",
    "REMAP": "remap_tf.model",
    "GeMPooling": "remap_tf.layers",
    "ImagePreprocessing": "remap_tf.layers",
    "L2Normalization": "remap_tf.layers",
    "MACPooling": "remap_tf.layers",
    "RegionGeMPooling": "remap_tf.layers",
    "RegionMaxPooling": "remap_tf.layers",
    "RegionWeighting": "remap_tf.layers",
    "SPoCPooling": "remap_tf.layers",
    "Whitening": "remap_tf.layers",
    "TripletLoss": "remap_tf.losses",
    "ContrastiveLoss": "remap_tf.losses",
    "build_backbone": "remap_tf.backbones",
    "recalibrate_batch_norm": "remap_tf.backbones",
    "get_region_weights": "remap_tf.model",
    "set_region_weights": "remap_tf.model",
    "pre_whitening_model": "remap_tf.model",
    "region_model": "remap_tf.model",
    "init_region_weights": "remap_tf.region_weights",
    "kl_divergence_per_region": "remap_tf.region_weights",
    "kl_region_weights_from_stream": "remap_tf.region_weights",
    "relative_regions": "remap_tf.regions",
    "rmac_regions": "remap_tf.regions",
    "init_whitening": "remap_tf.whitening",
    "learned_whitening": "remap_tf.whitening",
    "learned_whitening_from_stream": "remap_tf.whitening",
    "pca_whitening": "remap_tf.whitening",
    "pca_whitening_from_stream": "remap_tf.whitening",
    "set_whitening": "remap_tf.whitening",
}
# Every module that registers Keras serializables (`keras.saving.register_keras_serializable`).
SERIALIZABLE_MODULES = ("remap_tf.layers", "remap_tf.losses")

__all__ = [
    "BACKBONES",
    "ContrastiveLoss",
    "GeMPooling",
    "ImagePreprocessing",
    "L2Normalization",
    "MACPooling",
    "POOLINGS",
    "REMAP",
    "RegionGeMPooling",
    "RegionMaxPooling",
    "RegionWeighting",
    "SPoCPooling",
    "TripletLoss",
    "Whitening",
    "build_backbone",
    "get_region_weights",
    "init_region_weights",
    "init_whitening",
    "kl_divergence_per_region",
    "kl_region_weights_from_stream",
    "learned_whitening",
    "learned_whitening_from_stream",
    "pca_whitening",
    "pca_whitening_from_stream",
    "pre_whitening_model",
    "recalibrate_batch_norm",
    "region_model",
    "register_serializables",
    "relative_regions",
    "rmac_regions",
    "set_region_weights",
    "set_whitening",
]


def register_serializables() -> None:
    """Registers every Keras object the project saves in a model (layers, losses).

    Runs by itself when Keras is imported; calling it again does nothing more.
    """
    for module in SERIALIZABLE_MODULES:
        importlib.import_module(module)


@wrapt.when_imported("keras")
def _register_when_keras_is_imported(keras_module) -> None:
    register_serializables()


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'remap_tf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted({*globals(), *_API})


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from remap_tf.backbones import build_backbone, recalibrate_batch_norm
    from remap_tf.layers import (
        GeMPooling,
        ImagePreprocessing,
        L2Normalization,
        MACPooling,
        RegionGeMPooling,
        RegionMaxPooling,
        RegionWeighting,
        SPoCPooling,
        Whitening,
    )
    from remap_tf.losses import ContrastiveLoss, TripletLoss
    from remap_tf.model import (
        REMAP,
        get_region_weights,
        pre_whitening_model,
        region_model,
        set_region_weights,
    )
    from remap_tf.region_weights import (
        init_region_weights,
        kl_divergence_per_region,
        kl_region_weights_from_stream,
    )
    from remap_tf.regions import relative_regions, rmac_regions
    from remap_tf.specs import BACKBONES, POOLINGS
    from remap_tf.whitening import (
        init_whitening,
        learned_whitening,
        learned_whitening_from_stream,
        pca_whitening,
        pca_whitening_from_stream,
        set_whitening,
    )
