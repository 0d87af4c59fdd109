"""keras.applications backbones with named multi-layer taps and in-graph preprocessing.

Each backbone is described once, in `remap_tf.specs.BACKBONES`: which ``keras.applications``
constructor builds it, which layers REMAP taps by default (the last two stages, the paper's
"layer 1+2"), and how raw RGB 0-255 is preprocessed for it. This module builds them.

Taps of clipped backbones. MobileNet v1 and v2 end their blocks with ReLU6, and a
max-based pooling (MAC, R-MAC, REMAP) of a clipped map saturates: many channels read 6 in
every region, which carries no information. The default taps are therefore the BatchNorm
outputs in front of the ReLU6, passed through a plain (unclipped) ReLU (`BackboneSpec
.relu_taps`). Measured with ImageNet MobileNet v1 (alpha 0.75) on real multi-view photos,
queries cropped to 25% of the area (issue 10; `python -m bench.quality` has the variants):
MAC 40 mAP on the ReLU6 output against 86 on BatchNorm + ReLU; two-layer R-MAC 89 against 91;
SPoC 91 either way. The ReLU matters: the BatchNorm output with its negatives gave R-MAC 88.7.
The layers: conv_pw_12 + conv_pw_13 gave R-MAC 89.2 where conv_pw_11 + conv_pw_13 gave 88.4,
so MobileNet taps conv_pw_12_bn and conv_pw_13_bn. MobileNetV2 has no ImageNet weights
offline here, so its taps were not measured: they follow the same rule, the last two
clipped activations of the stride-16 and stride-32 stages (block_13_expand_BN, Conv_1_bn).

ImageNet weights. ``weights="imagenet"`` downloads through keras.applications, except for
MobileNet v1 alpha 0.75, whose no-top weights ship inside the package (`remap_tf.specs
.BUNDLED_WEIGHTS`, remap_tf/weights/NOTICE): that default works offline.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import keras
import numpy as np

from remap_tf.errors import InvalidInputError
from remap_tf.specs import BUNDLED_DEFAULT, bundled_weights_file, get_spec

# The ImageNet weights that ship inside the package (see NOTICE there).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def build_backbone(
    name: str,
    weights: str | None = None,
    input_shape=(None, None, 3),
    **kwargs,
) -> keras.Model:
    """Builds a headless ``keras.applications`` backbone.

    Args:
        name: a key of `BACKBONES`.
        weights: None (random init), ``"imagenet"`` (the bundled file where there is one,
            else downloaded by Keras), or the path of a local ``.weights.h5``/``.h5`` file of
            the headless model.
        input_shape: ``(height, width, 3)``; None sizes accept any image size.
        **kwargs: passed to the constructor (e.g. ``alpha=0.75`` for MobileNet).

    Returns:
        the backbone ``keras.Model`` (expects preprocessed input; see `BackboneSpec`).
    """
    spec = get_spec(name)
    local_file = None
    if weights == "imagenet":
        bundled = bundled_weights_file(name, kwargs)
        local_file = str(WEIGHTS_DIR / bundled) if bundled else None
    elif weights is not None:
        local_file = os.fspath(weights)
        if not os.path.isfile(local_file):
            raise InvalidInputError(
                f"`weights` must be None, 'imagenet' or an existing weights file; "
                f"received {weights!r}, which is not a file."
            )
    constructor = getattr(keras.applications, spec.constructor)
    arguments = {**dict(spec.constructor_kwargs), **kwargs}
    download = weights if weights == "imagenet" and local_file is None else None
    try:
        model = constructor(
            include_top=False, weights=download, input_shape=tuple(input_shape), **arguments
        )
    except Exception as error:  # Keras reports a failed download as a plain Exception
        if download is None:
            raise
        raise InvalidInputError(
            f"Could not get the ImageNet weights of {name!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); keras.applications downloads them. Offline, "
            f"use the weights that ship with remap-tf: {BUNDLED_DEFAULT}."
        ) from None
    if local_file:
        try:
            model.load_weights(local_file)
        except Exception as error:  # Keras raises several types for a mismatched file.
            raise InvalidInputError(
                f"Could not load backbone weights {local_file!r} into {name!r} "
                f"({spec.constructor} with {arguments or 'default arguments'}): {error}"
            ) from error
    return model


def tap_model(
    backbone: keras.Model, taps, name: str | None = None, relu: bool = False
) -> keras.Model:
    """A model returning the outputs of the ``taps`` layers of ``backbone``, in order.

    Args:
        backbone: a ``keras.Model``.
        taps: layer names, shallow to deep.
        name: the model's name (default ``<backbone>_taps``).
        relu: pass every tap through a plain ReLU (`keras.layers.ReLU`, serialisable), as
            for BatchNorm outputs tapped in front of a ReLU6.
    """
    taps = tuple(taps)
    if not taps:
        raise InvalidInputError("`taps` must name at least one layer, received an empty list.")
    names = [layer.name for layer in backbone.layers]
    outputs = []
    for tap in taps:
        if tap not in names:
            close = difflib.get_close_matches(str(tap), names, n=3)
            raise InvalidInputError(
                f"Unknown tap layer {tap!r} in backbone {backbone.name!r}; close names: {close}."
            )
        output = backbone.get_layer(tap).output
        if relu:
            output = keras.layers.ReLU(name=f"{tap}_relu_unclipped")(output)
        outputs.append(output)
    return keras.Model(backbone.inputs, outputs, name=name or f"{backbone.name}_taps")


def batch_norm_layers(model: keras.Model) -> list:
    """Every BatchNormalization layer of ``model``, nested models included."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found.extend(batch_norm_layers(layer))
    return found


def recalibrate_batch_norm(model: keras.Model, images, batch_size: int = 32) -> int:
    """Sets every BatchNorm's moving mean and variance to the statistics of ``images``.

    A randomly initialised backbone has moving statistics of 0 and 1, which in inference
    mode let activations shrink layer after layer (a random-init MobileNet's last stage
    outputs values near 1e-15), so descriptors and KL region weights computed from it are
    noise. Running the images through the model in training mode, with the BatchNorm
    momentum set so that the moving statistics become the running average over the batches,
    makes inference reproduce training-mode normalisation. Use it on random-init models
    before initialising region weights, and after a short training run; do not use it on
    ImageNet weights unless the data set is large and representative.

    Args:
        model: any Keras model.
        images: ``(num_images, height, width, 3)`` inputs of the model.
        batch_size: images per forward pass (at least 8 gives usable statistics).

    Returns:
        the number of BatchNormalization layers recalibrated.
    """
    layers = batch_norm_layers(model)
    images = np.asarray(images)
    if not layers or len(images) == 0:
        return len(layers)
    saved = [layer.momentum for layer in layers]
    try:
        for step, start in enumerate(range(0, len(images), batch_size), start=1):
            for layer in layers:
                layer.momentum = (step - 1) / step  # running mean over the batches so far
            model(images[start : start + batch_size], training=True)
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum
    return len(layers)
