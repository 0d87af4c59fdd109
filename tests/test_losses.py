"""Triplet and contrastive losses and online mining against hand-computed values and a NumPy
reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from remap_tf.errors import InvalidInputError
from remap_tf.losses import (
    CONTRASTIVE_MININGS,
    MININGS,
    ContrastiveLoss,
    TripletLoss,
    contrastive_loss,
    hardest_negative_indices,
    hardest_positive_indices,
    semi_hard_negative_indices,
    triplet_loss,
)

# A 1-D batch whose squared distances are read off by hand:
#   x = [0, 1, 5, 2, 7], labels [0, 0, 0, 1, 1]
#   d(0,1)=1  d(0,2)=25 d(0,3)=4  d(0,4)=49
#   d(1,2)=16 d(1,3)=1  d(1,4)=36
#   d(2,3)=9  d(2,4)=4  d(3,4)=25
HAND_X = np.array([[0.0], [1.0], [5.0], [2.0], [7.0]], np.float32)
HAND_LABELS = np.array([0, 0, 0, 1, 1])


def numpy_triplet_loss(labels, x, margin, mining):
    """Loop-by-loop reference in float64, written from the definitions in the module docstring."""
    x = np.asarray(x, np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    per_anchor = []
    for a in range(len(labels)):
        pos = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [n for n in range(len(labels)) if labels[n] != labels[a]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            per_anchor.append(max(0.0, margin + max(d[a, pos]) - min(d[a, neg])))
        elif mining == "semi_hard":
            values = []
            for p in pos:
                outside = [d[a, n] for n in neg if d[a, n] > d[a, p]]
                d_an = min(outside) if outside else max(d[a, neg])
                values.append(max(0.0, margin + d[a, p] - d_an))
            per_anchor.append(np.mean(values))
        else:
            values = [max(0.0, margin + d[a, p] - d[a, n]) for p in pos for n in neg]
            per_anchor.append(np.mean(values))
    return float(np.mean(per_anchor)) if per_anchor else 0.0


@pytest.mark.parametrize("mining", MININGS)
def test_perfectly_separated_batch_has_exactly_zero_loss(mining):
    """Same-class descriptors coincide (d_ap = 0), classes are orthogonal (d_an = 2):
    0.1 + 0 - 2 < 0 for every triplet, so the loss is exactly 0."""
    x = np.repeat(np.eye(3, dtype=np.float32), 2, axis=0)
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert float(triplet_loss(labels, x, margin=0.1, mining=mining)) == 0.0
    assert float(TripletLoss(mining=mining)(labels, x)) == 0.0


def test_batch_hard_picks_the_hand_computed_indices_and_value():
    """Farthest positive / closest negative per anchor (distances in HAND_X's comment):
    a0: pos {1:1, 2:25} -> 2, neg {3:4, 4:49} -> 3, loss 0.1+25-4 = 21.1
    a1: pos {0:1, 2:16} -> 2, neg {3:1, 4:36} -> 3, loss 0.1+16-1 = 15.1
    a2: pos {0:25, 1:16} -> 0, neg {3:9, 4:4} -> 4, loss 0.1+25-4 = 21.1
    a3: pos {4:25} -> 4, neg {0:4, 1:1, 2:9} -> 1, loss 0.1+25-1 = 24.1
    a4: pos {3:25} -> 3, neg {0:49, 1:36, 2:4} -> 2, loss 0.1+25-4 = 21.1
    mean = 102.5 / 5 = 20.5"""
    np.testing.assert_array_equal(hardest_positive_indices(HAND_LABELS, HAND_X), [2, 2, 0, 4, 3])
    np.testing.assert_array_equal(hardest_negative_indices(HAND_LABELS, HAND_X), [3, 3, 4, 1, 2])
    loss = triplet_loss(HAND_LABELS, HAND_X, margin=0.1, mining="batch_hard")
    np.testing.assert_allclose(float(loss), 20.5, rtol=1e-6)


def test_semi_hard_picks_the_closest_negative_beyond_the_positive():
    """For each (a, p): the closest negative with d_an > d_ap, else the farthest negative.
    (0,1) d_ap=1: {3:4, 4:49} -> 3        (0,2) d_ap=25: {4:49} -> 4
    (1,0) d_ap=1: 3 is at 1, not beyond -> 4   (1,2) d_ap=16: {4:36} -> 4
    (2,0) d_ap=25 and (2,1) d_ap=16: none beyond -> farthest, 3 (d=9)
    (3,4) d_ap=25: none beyond -> farthest, 2 (d=9)   (4,3) d_ap=25: {0:49, 1:36} -> 1
    Losses: only (2,0) 0.1+25-9 = 16.1, (2,1) 0.1+16-9 = 7.1, (3,4) 16.1 are positive;
    per anchor a2 = 11.6, a3 = 16.1, others 0; mean = 27.7 / 5 = 5.54."""
    expected = np.full((5, 5), -1)
    for (a, p), n in {
        (0, 1): 3,
        (0, 2): 4,
        (1, 0): 4,
        (1, 2): 4,
        (2, 0): 3,
        (2, 1): 3,
        (3, 4): 2,
        (4, 3): 1,
    }.items():
        expected[a, p] = n
    np.testing.assert_array_equal(semi_hard_negative_indices(HAND_LABELS, HAND_X), expected)
    loss = triplet_loss(HAND_LABELS, HAND_X, margin=0.1, mining="semi_hard")
    np.testing.assert_allclose(float(loss), 5.54, rtol=1e-6)


def test_anchors_without_positive_or_negative_are_left_out():
    """labels [0, 1, 1]: anchor 0 has no positive (-1) and does not count in the mean;
    anchors 1, 2 at x = 1, 3 with the negative at 0: loss(1) = 0.1+4-1 = 3.1,
    loss(2) = 0.1+4-9 < 0 -> 0; mean over the 2 valid anchors = 1.55."""
    x = np.array([[0.0], [1.0], [3.0]], np.float32)
    labels = [0, 1, 1]
    np.testing.assert_array_equal(hardest_positive_indices(labels, x), [-1, 2, 1])
    np.testing.assert_allclose(float(triplet_loss(labels, x)), 1.55, rtol=1e-6)
    np.testing.assert_allclose(float(TripletLoss()(np.array(labels), x)), 1.55, rtol=1e-6)
    # One class only: no negatives anywhere, loss 0 and gradients 0 (not NaN).
    same = tf.Variable(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = triplet_loss([5, 5, 5, 5], same)
    np.testing.assert_array_equal(hardest_negative_indices([5, 5, 5, 5], same), [-1] * 4)
    assert float(loss) == 0.0
    assert np.all(np.isfinite(tape.gradient(loss, same).numpy()))


@pytest.mark.parametrize("mining", MININGS)
def test_equals_numpy_reference_on_random_batches(mining):
    rng = np.random.default_rng(7)
    for trial in range(4):
        size = int(rng.integers(6, 20))
        labels = rng.integers(0, 4, size)
        labels[0] = 9  # a singleton class: an anchor without a positive
        x = rng.normal(size=(size, 5)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        margin = float(rng.uniform(0.05, 0.5))
        want = numpy_triplet_loss(labels, x, margin, mining)
        got = float(triplet_loss(labels, x, margin=margin, mining=mining))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"trial {trial}")
        # The Keras loss (labels as float (batch, 1), as compile may pass them) agrees.
        keras_value = TripletLoss(margin=margin, mining=mining)(
            labels.astype(np.float32)[:, None], x
        )
        np.testing.assert_allclose(float(keras_value), want, rtol=1e-5, atol=1e-6)


def test_distances_and_loss_are_float32_under_half_precision_inputs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(4), 2)
    loss16 = triplet_loss(labels, tf.constant(x, tf.float16), mining="batch_all")
    assert loss16.dtype == tf.float32
    np.testing.assert_allclose(
        float(loss16), float(triplet_loss(labels, x, mining="batch_all")), atol=2e-3
    )


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="hardest"):
        triplet_loss([0, 1], np.eye(2), mining="hardest")
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(margin=-1.0)
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(margin="big")


def test_keras_loss_config_round_trip_and_compiled_model_reloads(tmp_path):
    loss = TripletLoss(margin=0.3, mining="semi_hard", cross_replica=True, name="tl")
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, TripletLoss)
    assert (again.margin, again.mining, again.cross_replica, again.name) == (
        0.3,
        "semi_hard",
        True,
        "tl",
    )

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4), keras.layers.UnitNormalization()]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    x = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    y = np.repeat(np.arange(4), 4).astype(np.int32)
    before = float(triplet_loss(y, model(x), margin=0.3, mining="semi_hard"))
    history = model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], before, rtol=1e-5)
    assert history.history["loss"][-1] < before

    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert isinstance(loaded.loss, TripletLoss)
    assert loaded.loss.get_config() == loss.get_config()


# --- contrastive loss ------------------------------------------------------------------------

# A 1-D batch whose Euclidean distances are read off by hand (margin 0.7):
#   x = [0, 0.3, 1.1, 0.5], labels [0, 0, 1, 1]
#   e(0,1)=0.3  e(0,2)=1.1  e(0,3)=0.5  e(1,2)=0.8  e(1,3)=0.2  e(2,3)=0.6
CONTRASTIVE_X = np.array([[0.0], [0.3], [1.1], [0.5]], np.float32)
CONTRASTIVE_LABELS = np.array([0, 0, 1, 1])


def numpy_contrastive_loss(labels, x, margin, mining):
    """Loop-by-loop reference in float64 from the module docstring's definitions."""
    x = np.asarray(x, np.float64)
    e = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    per_anchor = []
    for a in range(len(labels)):
        pos = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [n for n in range(len(labels)) if labels[n] != labels[a]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            hinge = max(0.0, margin - min(e[a, neg]))
            per_anchor.append(0.5 * max(e[a, pos]) ** 2 + 0.5 * hinge**2)
        else:
            active = [0.5 * (margin - e[a, n]) ** 2 for n in neg if e[a, n] < margin]
            negative = np.mean(active) if active else 0.0
            per_anchor.append(np.mean([0.5 * e[a, p] ** 2 for p in pos]) + negative)
    return float(np.mean(per_anchor)) if per_anchor else 0.0


@pytest.mark.parametrize(
    ("mining", "expected"),
    [
        # a0: 0.5*0.3^2 = 0.045 + active negative 3 only (0.5*0.2^2 = 0.02)      -> 0.065
        # a1: 0.045 + active negative 3 only (0.5*0.5^2 = 0.125; 2 at 0.8 is not) -> 0.17
        # a2: 0.5*0.6^2 = 0.18, negatives at 1.1 and 0.8: none active              -> 0.18
        # a3: 0.18 + mean(0.02, 0.125) = 0.0725                                    -> 0.2525
        # mean = 0.6675 / 4
        ("batch_all", 0.6675 / 4),
        # farthest positive, closest negative: a0 0.065, a1 0.17, a2 0.18 + 0 (0.8 > 0.7),
        # a3 0.18 + 0.125 (negative 1 at 0.2) = 0.305; mean = 0.72 / 4
        ("batch_hard", 0.72 / 4),
    ],
)
def test_contrastive_hand_computed_values(mining, expected):
    got = contrastive_loss(CONTRASTIVE_LABELS, CONTRASTIVE_X, margin=0.7, mining=mining)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    keras_value = ContrastiveLoss(margin=0.7, mining=mining)(CONTRASTIVE_LABELS, CONTRASTIVE_X)
    np.testing.assert_allclose(float(keras_value), expected, rtol=1e-5)
    want = numpy_contrastive_loss(CONTRASTIVE_LABELS, CONTRASTIVE_X, 0.7, mining)
    np.testing.assert_allclose(want, expected, rtol=1e-6)  # x is float32: 0.3 is not exact


def test_contrastive_default_mining_is_batch_all_and_margin_cirtorchs():
    loss = ContrastiveLoss()
    assert (loss.margin, loss.mining) == (0.7, "batch_all")
    np.testing.assert_allclose(
        float(contrastive_loss(CONTRASTIVE_LABELS, CONTRASTIVE_X)), 0.6675 / 4, rtol=1e-5
    )


@pytest.mark.parametrize("mining", CONTRASTIVE_MININGS)
def test_contrastive_is_zero_when_positives_coincide_and_negatives_are_beyond_margin(mining):
    """Same-class descriptors coincide (e = 0), classes are orthogonal (e = sqrt 2 > 0.7):
    every positive costs 0 and no negative is active, so the loss is exactly 0."""
    x = np.repeat(np.eye(3, dtype=np.float32), 2, axis=0)
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert float(contrastive_loss(labels, x, mining=mining)) == 0.0
    assert float(ContrastiveLoss(mining=mining)(labels, x)) == 0.0


@pytest.mark.parametrize("mining", CONTRASTIVE_MININGS)
def test_contrastive_equals_numpy_reference_on_random_batches(mining):
    rng = np.random.default_rng(11)
    for trial in range(4):
        size = int(rng.integers(6, 20))
        labels = rng.integers(0, 4, size)
        labels[0] = 9  # a singleton class: an anchor without a positive
        x = rng.normal(size=(size, 5)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        margin = float(rng.uniform(0.5, 1.5))  # some negatives active, some not
        want = numpy_contrastive_loss(labels, x, margin, mining)
        got = float(contrastive_loss(labels, x, margin=margin, mining=mining))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"trial {trial}")
        keras_value = ContrastiveLoss(margin=margin, mining=mining)(
            labels.astype(np.float32)[:, None], x
        )
        np.testing.assert_allclose(float(keras_value), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mining", CONTRASTIVE_MININGS)
def test_contrastive_gradient_is_finite_with_duplicate_descriptors(mining):
    """Rows 0 and 2 are the same vector with other labels (a negative at e = 0, where the
    gradient of sqrt is infinite), rows 0 and 1 the same vector with one label: the loss is
    positive and every gradient finite."""
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    variable = tf.Variable(x)
    with tf.GradientTape() as tape:
        loss = contrastive_loss([0, 0, 1, 1], variable, mining=mining)
    gradient = tape.gradient(loss, variable).numpy()
    assert float(loss) > 0.0
    assert np.all(np.isfinite(gradient))
    with tf.GradientTape() as tape:
        loss = ContrastiveLoss(mining=mining)(np.array([0, 0, 1, 1]), variable)
    assert np.all(np.isfinite(tape.gradient(loss, variable).numpy()))


def test_contrastive_bad_arguments_raise_one_line_errors():
    with pytest.raises(InvalidInputError, match=r"'semi_hard' .*contrastive") as error:
        ContrastiveLoss(mining="semi_hard")
    assert "\n" not in str(error.value)
    with pytest.raises(InvalidInputError, match="semi_hard.*contrastive"):
        contrastive_loss([0, 1], np.eye(2), mining="semi_hard")
    with pytest.raises(InvalidInputError, match="hardest"):
        contrastive_loss([0, 1], np.eye(2), mining="hardest")
    for margin in (-0.5, "big", float("nan")):
        with pytest.raises(InvalidInputError, match="margin") as error:
            ContrastiveLoss(margin=margin)
        assert "\n" not in str(error.value)


def test_contrastive_config_round_trip_and_one_fit_step(tmp_path):
    loss = ContrastiveLoss(margin=0.85, mining="batch_hard", cross_replica=True, name="cl")
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, ContrastiveLoss)
    assert (again.margin, again.mining, again.cross_replica, again.name) == (
        0.85,
        "batch_hard",
        True,
        "cl",
    )
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4), keras.layers.UnitNormalization()]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=ContrastiveLoss())
    x = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    y = np.repeat(np.arange(4), 4).astype(np.int32)
    before = float(contrastive_loss(y, model(x)))
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], before, rtol=1e-5)
    assert history.history["loss"][-1] < before
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert isinstance(loaded.loss, ContrastiveLoss)
    assert loaded.loss.get_config() == model.loss.get_config()


# Runs in a fresh interpreter: logical devices must be configured before TensorFlow starts.
_CROSS_REPLICA_SCRIPT = textwrap.dedent(
    """
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from remap_tf.losses import (CONTRASTIVE_MININGS, MININGS, ContrastiveLoss, TripletLoss,
                                 contrastive_loss, triplet_loss)

    rng = np.random.default_rng(0)
    # Replica 0 gets rows 0-5, replica 1 rows 6-11. Every label appears once per replica, so
    # each anchor's only positive is on the other replica: local mining finds no triplet.
    labels = np.array([0, 1, 2, 3, 4, 5] * 2, np.int32)
    features = rng.normal(size=(12, 8)).astype(np.float32)
    kernel = rng.normal(size=(8, 4)).astype(np.float32)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    out = {}

    def embed(f, w):
        return tf.math.l2_normalize(tf.matmul(f, w), axis=1)

    cases = [(TripletLoss, triplet_loss, m) for m in MININGS]
    cases += [(ContrastiveLoss, contrastive_loss, m) for m in CONTRASTIVE_MININGS]
    for loss_class, loss_function, mining in cases:
        key = f"{loss_class.__name__}_{mining}"
        w1 = tf.Variable(kernel)
        with tf.GradientTape() as tape:
            single = loss_function(labels, embed(features, w1), mining=mining)
        single_grad = tape.gradient(single, w1)

        with strategy.scope():
            w2 = tf.Variable(kernel)
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx: (
                features[6 * ctx.replica_id_in_sync_group : 6 * ctx.replica_id_in_sync_group + 6],
                labels[6 * ctx.replica_id_in_sync_group : 6 * ctx.replica_id_in_sync_group + 6],
            )
        )

        @tf.function
        def step(f, y, cross):
            with tf.GradientTape() as tape:
                loss = loss_class(mining=mining, cross_replica=cross)(y, embed(f, w2))
            # The Keras loss already divides by the replica count; the strategy sums grads.
            return loss, tape.gradient(loss, w2)

        for cross in (True, False):
            loss, grad = strategy.run(step, args=(*values, cross))
            total = strategy.reduce("SUM", loss, axis=None)
            grad = strategy.reduce("SUM", grad, axis=None)
            out[f"{key}_{cross}"] = [float(total), float(single),
                                        float(np.abs(grad.numpy() - single_grad.numpy()).max()),
                                        float(np.abs(single_grad.numpy()).max())]

    # model.fit with the cross-replica loss; lr 0 keeps the weights, so the reported loss of
    # the first epoch is the global-batch loss.
    for name, loss_class, loss_function in (("fit", TripletLoss, triplet_loss),
                                            ("fit_contrastive", ContrastiveLoss, contrastive_loss)):
        with strategy.scope():
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, use_bias=False),
                                      keras.layers.UnitNormalization()])
            model.layers[0].set_weights([kernel])
            model.compile(optimizer=keras.optimizers.SGD(0.0),
                          loss=loss_class(mining="batch_hard", cross_replica=True))
        dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(12).repeat()
        history = model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0)
        out[name] = [history.history["loss"][0],
                     float(loss_function(labels, model.predict(features, verbose=0),
                                         mining="batch_hard"))]
    print("RESULT" + json.dumps(out))
    """
)


def test_cross_replica_mining_equals_single_device_loss_and_gradient():
    """Two logical CPUs under MirroredStrategy: with cross_replica=True, the sum of the
    replicas' (already 1/2-scaled) losses and gradients equals the single-device loss and
    gradient over the global batch, for the triplet and the contrastive loss and each of their
    minings; with cross_replica=False each replica finds no positive, so the loss is 0 (the
    test can fail)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, "-c", _CROSS_REPLICA_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT") :])
    keys = [f"TripletLoss_{mining}" for mining in MININGS]
    keys += [f"ContrastiveLoss_{mining}" for mining in CONTRASTIVE_MININGS]
    for key in keys:
        total, single, grad_error, grad_scale = out[f"{key}_True"]
        assert single > 0.0
        np.testing.assert_allclose(total, single, rtol=1e-5, err_msg=key)
        assert grad_error <= 1e-5 * max(1.0, grad_scale), key
        local_total, _, _, _ = out[f"{key}_False"]
        assert local_total == 0.0, key
    for name in ("fit", "fit_contrastive"):
        fit_loss, global_loss = out[name]
        np.testing.assert_allclose(fit_loss, global_loss, rtol=1e-5, err_msg=name)
