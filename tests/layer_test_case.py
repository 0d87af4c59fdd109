"""One shared check for every layer (STYLE habit 5), modelled on keras-hub's TestCase.

`run_layer_test` checks, for a layer class and constructor arguments: the config round
trip, a symbolic and an eager call with the expected output shape, one `fit` step inside a
model, a `.keras` save and reload (``safe_mode=True``) with equal outputs, and the dtypes
under ``mixed_float16``.
"""

from __future__ import annotations

import keras
import numpy as np


def _model_around(layer, input_shape):
    inputs = keras.Input(shape=input_shape[1:])
    outputs = layer(inputs)
    # A scalar per example, so any output rank can be fitted against a target.
    flat = keras.layers.Flatten()(outputs) if len(outputs.shape) > 2 else outputs
    score = keras.layers.Dense(1, dtype="float32")(flat)
    return keras.Model(inputs, score)


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_output_shape,
    tmp_path,
    input_range=(0.0, 1.0),
    expected_num_trainable_weights=None,
):
    """Runs every generic check on ``layer_cls(**init_kwargs)``.

    Args:
        layer_cls: the layer class.
        init_kwargs: constructor arguments.
        input_shape: a concrete input shape including batch.
        expected_output_shape: the concrete output shape for that input.
        tmp_path: a pytest temporary folder.
        input_range: inputs are uniform in this range.
        expected_num_trainable_weights: checked when given.
    """
    rng = np.random.default_rng(0)
    data = rng.uniform(*input_range, size=input_shape).astype("float32")

    # Config round trip: every argument survives.
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    for key, value in init_kwargs.items():
        got = config[key]
        assert (list(got) if isinstance(got, tuple) else got) == (
            list(value) if isinstance(value, tuple) else value
        ), f"{layer_cls.__name__}.get_config() lost {key!r}: {got!r} != {value!r}"
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config

    # Symbolic call.
    symbolic = layer(keras.KerasTensor(input_shape))
    assert tuple(symbolic.shape) == tuple(expected_output_shape)

    # Eager call.
    eager = layer(data)
    assert tuple(eager.shape) == tuple(expected_output_shape)
    assert np.all(np.isfinite(np.asarray(eager)))
    if expected_num_trainable_weights is not None:
        assert len(layer.trainable_weights) == expected_num_trainable_weights

    # One fit step inside a model.
    model = _model_around(layer_cls(**init_kwargs), input_shape)
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(data, np.ones((input_shape[0], 1)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    # Save and reload with safe_mode=True: equal outputs.
    path = tmp_path / f"{layer_cls.__name__}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        np.asarray(reloaded(data)), np.asarray(model(data)), rtol=1e-6, atol=1e-6
    )

    # Mixed precision: computes in float16, keeps float32 variables.
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = layer_cls(**init_kwargs)
        output = mixed(data)
        assert mixed.compute_dtype == "float16"
        assert keras.backend.standardize_dtype(output.dtype) == "float16"
        assert np.all(np.isfinite(np.asarray(output, dtype=np.float32)))
        for weight in mixed.weights:
            assert weight.dtype == "float32", f"{weight.path} is {weight.dtype}"
    finally:
        keras.config.set_dtype_policy("float32")
