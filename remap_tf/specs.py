"""What can be built, as data: backbones, poolings, triplet minings, whitening methods.

Configs and the ``remap`` command validate names against these tables without importing
TensorFlow; `remap_tf.backbones` and `remap_tf.model` build from them. Standard library only.

To add a backbone, add one `BackboneSpec` to `BACKBONES`; to add a pooling, see
docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import difflib

from remap_tf.errors import InvalidInputError

# Poolings of `remap_tf.model.REMAP`, all on one code path.
POOLINGS = ("remap", "rmac", "mac", "spoc", "gem")
# Display names, for tables and reports.
POOLING_NAMES = {"remap": "REMAP", "rmac": "R-MAC", "mac": "MAC", "spoc": "SPoC", "gem": "GeM"}
# Online triplet mining of `remap_tf.losses.TripletLoss`.
MININGS = ("batch_hard", "semi_hard", "batch_all")
# Initialisation of the whitening layer (`remap_tf.whitening.init_whitening`).
WHITENING_METHODS = ("learned", "pca")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    Attributes:
        constructor: name of the function in ``keras.applications``.
        taps: default layer names to tap, shallow to deep (the last two stages).
        preprocessing: an `remap_tf.layers.ImagePreprocessing` mode.
        constructor_kwargs: fixed extra arguments for the constructor.
    """

    constructor: str
    taps: tuple[str, ...]
    preprocessing: str
    constructor_kwargs: tuple[tuple[str, object], ...] = ()


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec("VGG16", ("block4_conv3", "block5_conv3"), "caffe"),
    "vgg19": BackboneSpec("VGG19", ("block4_conv4", "block5_conv4"), "caffe"),
    "resnet50": BackboneSpec("ResNet50", ("conv4_block6_out", "conv5_block3_out"), "caffe"),
    "resnet101": BackboneSpec("ResNet101", ("conv4_block23_out", "conv5_block3_out"), "caffe"),
    "resnet152": BackboneSpec("ResNet152", ("conv4_block36_out", "conv5_block3_out"), "caffe"),
    "mobilenet": BackboneSpec("MobileNet", ("conv_pw_11_relu", "conv_pw_13_relu"), "tf"),
    "mobilenet_v2": BackboneSpec("MobileNetV2", ("block_12_add", "out_relu"), "tf"),
    # EfficientNetV2 rescales 0-255 input itself (include_preprocessing=True).
    "efficientnet_v2_b0": BackboneSpec(
        "EfficientNetV2B0",
        ("block5e_add", "top_activation"),
        "none",
        (("include_preprocessing", True),),
    ),
    "efficientnet_v2_s": BackboneSpec(
        "EfficientNetV2S",
        ("block5i_add", "top_activation"),
        "none",
        (("include_preprocessing", True),),
    ),
}


def closest(name, known) -> str:
    """`` Did you mean 'x'?`` for the closest of ``known`` to ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_choice(what: str, value, choices) -> str:
    """``value`` if it is one of ``choices``; else InvalidInputError naming ``what``."""
    if value not in choices:
        raise InvalidInputError(
            f"Unknown {what} {value!r}; expected one of {sorted(choices)}.{closest(value, choices)}"
        )
    return value


def get_spec(name: str) -> BackboneSpec:
    """The `BackboneSpec` of ``name``; InvalidInputError listing the known names otherwise."""
    return BACKBONES[check_choice("backbone", name, BACKBONES)]
