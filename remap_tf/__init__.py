"""remap_tf: REMAP global image descriptors (Husain & Bober, IEEE TIP 2019) in Keras 3.

``REMAP(backbone=...)`` builds a ``keras.Model`` from RGB 0-255 images ``(batch, h, w, 3)``
to L2-normalised descriptors ``(batch, dim)``; ``rmac_regions(height, width, levels)`` is the
R-MAC region grid. This package imports none of ``training``, ``export`` or ``serving``.
"""

from remap_tf.backbones import BACKBONES, build_backbone, recalibrate_batch_norm
from remap_tf.layers import (
    GeMPooling,
    ImagePreprocessing,
    L2Normalization,
    MACPooling,
    RegionMaxPooling,
    RegionWeighting,
    SPoCPooling,
    Whitening,
)
from remap_tf.model import (
    POOLINGS,
    REMAP,
    get_region_weights,
    pre_whitening_model,
    region_model,
    set_region_weights,
)
from remap_tf.region_weights import init_region_weights, kl_divergence_per_region
from remap_tf.regions import relative_regions, rmac_regions
from remap_tf.whitening import init_whitening, learned_whitening, pca_whitening, set_whitening

__version__ = "0.1.0"

__all__ = [
    "BACKBONES",
    "POOLINGS",
    "REMAP",
    "GeMPooling",
    "ImagePreprocessing",
    "L2Normalization",
    "MACPooling",
    "RegionMaxPooling",
    "RegionWeighting",
    "SPoCPooling",
    "Whitening",
    "build_backbone",
    "get_region_weights",
    "init_region_weights",
    "init_whitening",
    "kl_divergence_per_region",
    "learned_whitening",
    "pca_whitening",
    "pre_whitening_model",
    "recalibrate_batch_norm",
    "region_model",
    "relative_regions",
    "rmac_regions",
    "set_region_weights",
    "set_whitening",
]
