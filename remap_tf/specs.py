"""What can be built, as data: backbones, poolings, losses and their minings, whitening methods.

Configs and the ``remap`` command validate names against these tables without importing
TensorFlow; `remap_tf.backbones` and `remap_tf.model` build from them. Standard library only.

To add a backbone, add one `BackboneSpec` to `BACKBONES`; to add a pooling, see
docs/architecture.md.
"""

from __future__ import annotations

import dataclasses

from remap_tf.checks import check_choice
from remap_tf.errors import InvalidInputError

# Poolings of `remap_tf.model.REMAP`, all on one code path.
POOLINGS = ("remap", "rmac", "mac", "spoc", "gem")
# Display names, for tables and reports.
POOLING_NAMES = {"remap": "REMAP", "rmac": "R-MAC", "mac": "MAC", "spoc": "SPoC", "gem": "GeM"}
# Per-region pooling of the "remap" and "rmac" poolings: "max" (R-MAC's and the REMAP
# paper's, the default) or "gem" (regional GeM, a learnable exponent per tap, initialised at
# 3). Max stays the default: bench.quality on MobileNet v1 0.75 (multiview + holidays +
# ukbench val, mean mAP whole / crops) put regional GeM within noise of max, off the shelf
# (R-MAC 93.45 / 79.27, regional GeM 92.94 / 79.50; REMAP with KL weights 92.92 / 79.22 and
# 93.05 / 79.45). An independent ResNet50 measurement on data outside the project gave it
# +0.7 to +1.0 (issue 18); the ResNet50 rows were not run here (docs/benchmarks.md).
REGION_POOLINGS = ("max", "gem")
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
        relu_taps: pass each tap through a plain (unclipped) ReLU. Set where the taps are
            the BatchNorm outputs in front of a ReLU6: clipping at 6 saturates max pooling
            (see `remap_tf.backbones`).
    """

    constructor: str
    taps: tuple[str, ...]
    preprocessing: str
    constructor_kwargs: tuple[tuple[str, object], ...] = ()
    relu_taps: bool = False


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec("VGG16", ("block4_conv3", "block5_conv3"), "caffe"),
    "vgg19": BackboneSpec("VGG19", ("block4_conv4", "block5_conv4"), "caffe"),
    # ResNet50: the last stride-16 and stride-32 stage outputs. Measured against the last tap
    # alone (bench.quality --backbone resnet50, multiview + holidays + ukbench val, GeM,
    # mAP whole / crops, mean of the three): 94.77 / 88.73 with both, 94.39 / 88.55 alone.
    "resnet50": BackboneSpec("ResNet50", ("conv4_block6_out", "conv5_block3_out"), "caffe"),
    "resnet101": BackboneSpec("ResNet101", ("conv4_block23_out", "conv5_block3_out"), "caffe"),
    "resnet152": BackboneSpec("ResNet152", ("conv4_block36_out", "conv5_block3_out"), "caffe"),
    # MobileNets clip at 6 (ReLU6): tap the BatchNorm outputs, then a plain ReLU.
    "mobilenet": BackboneSpec(
        "MobileNet", ("conv_pw_12_bn", "conv_pw_13_bn"), "tf", relu_taps=True
    ),
    "mobilenet_v2": BackboneSpec(
        "MobileNetV2", ("block_13_expand_BN", "Conv_1_bn"), "tf", relu_taps=True
    ),
    # EfficientNet (v1) B0 rescales and normalises 0-255 input inside the model. Taps: the
    # last stride-16 stage and the final activation. Measured (bench.quality --backbone
    # efficientnetb0, multiview + holidays + ukbench val, mean mAP whole / crops): GeM
    # 90.19 / 81.71 with these, 88.40 / 78.89 with top_activation alone, 90.37 / 81.43 with
    # block6d_add instead of block5c_add; REMAP with KL weights 92.50 / 81.89, 92.49 / 81.43
    # and 92.53 / 81.57: these taps are best or within 0.2 on every row, and best on crops.
    "efficientnetb0": BackboneSpec("EfficientNetB0", ("block5c_add", "top_activation"), "none"),
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


# ImageNet weights that ship inside the package (remap_tf/weights/, see NOTICE): backbone ->
# (constructor arguments they fit, file name). `weights="imagenet"` uses them with no download.
BUNDLED_WEIGHTS = {
    "mobilenet": ({"alpha": 0.75}, "mobilenet_v1_0.75_224_imagenet_notop.weights.h5"),
}
BUNDLED_DEFAULT = "REMAP('mobilenet', weights='imagenet', backbone_kwargs={'alpha': 0.75})"


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A metric-learning loss of `remap_tf.losses`, as data.

    Attributes:
        margin: the default margin.
        minings: the online minings it accepts (a subset of `MININGS`).
        mining: the default mining.
    """

    margin: float
    minings: tuple[str, ...]
    mining: str


# Loss kinds of `remap_tf.losses` (`TripletLoss`, `ContrastiveLoss`), by config name. The
# triplet's margin is REMAP's (squared distances); the contrastive one's is cirtorch's default
# (Euclidean distances; their ResNet101 recipe uses 0.85). "semi_hard" is a triplet notion
# (a negative beyond the positive), so contrastive has no such mining.
LOSSES: dict[str, LossSpec] = {
    "triplet": LossSpec(0.1, MININGS, "batch_hard"),
    "contrastive": LossSpec(0.7, ("batch_all", "batch_hard"), "batch_all"),
}


def get_loss_spec(kind: str, name: str = "loss") -> LossSpec:
    """The `LossSpec` of loss ``kind``; InvalidInputError naming ``name`` (how the caller's
    user knows the value) and listing the known kinds otherwise."""
    return LOSSES[check_choice(name, kind, LOSSES)]


def check_loss_mining(kind: str, mining, name: str = "mining") -> str:
    """``mining`` if loss ``kind`` accepts it; one-line InvalidInputError otherwise.

    ``name`` is how the caller's user knows the value (``loss.mining``, ``--mining``).
    """
    spec = get_loss_spec(kind)
    if mining in MININGS and mining not in spec.minings:
        raise InvalidInputError(
            f"{name} {mining!r} is not defined for the {kind} loss; use one of {spec.minings}."
        )
    return check_choice(name, mining, spec.minings)


def bundled_weights_file(backbone: str, constructor_kwargs: dict) -> str | None:
    """The bundled weights file name for this backbone and arguments, or None."""
    entry = BUNDLED_WEIGHTS.get(backbone)
    if entry is None:
        return None
    arguments, file_name = entry
    kwargs = dict(constructor_kwargs)
    fits = all(kwargs.get(key) == value for key, value in arguments.items())
    return file_name if fits and set(kwargs) <= set(arguments) else None


def get_spec(name: str) -> BackboneSpec:
    """The `BackboneSpec` of ``name``; InvalidInputError listing the known names otherwise."""
    return BACKBONES[check_choice("backbone", name, BACKBONES)]
