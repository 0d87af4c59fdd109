"""Offline hard-negative mining: hand-computed negatives, tuples and the per-epoch callback."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
from PIL import Image

from remap_tf.losses import ContrastiveLoss, TripletLoss
from remap_tf.training.data import load_manifest
from remap_tf.training.images import BadFileLog
from remap_tf.training.mining import (
    OfflineHardNegativeMining,
    make_tuple_dataset,
    mine_hard_negatives,
)

# 1-D descriptors; squared distances by hand:
#   x = [0, 1, 1.5, 3.5, 10], labels [0, 1, 1, 2, 3]
#   a0: 1:1  2:2.25  3:12.25  4:100      a1: 0:1  3:6.25  4:81     a2: 0:2.25  3:4  4:72.25
#   a3: 0:12.25  1:6.25  2:4  4:42.25    a4: 0:100  1:81  2:72.25  3:42.25
X = np.array([[0.0], [1.0], [1.5], [3.5], [10.0]], np.float32)
LABELS = np.array([0, 1, 1, 2, 3])


def test_hardest_negatives_by_hand():
    """Plain: the 2 closest other-class points. Distinct classes: a0 takes 1 (class 1) and
    then 3 (class 2), skipping 2, the second class-1 point; a3 takes 2 (class 1), then 0."""
    plain = mine_hard_negatives(X, LABELS, num_negatives=2, distinct_classes=False)
    np.testing.assert_array_equal(plain, [[1, 2], [0, 3], [0, 3], [2, 1], [3, 2]])
    distinct = mine_hard_negatives(X, LABELS, num_negatives=2)
    np.testing.assert_array_equal(distinct, [[1, 3], [0, 3], [0, 3], [2, 0], [3, 2]])
    assert distinct.dtype == np.int64
    # A separate pool (here the same points, shuffled) and small chunks give the same answer.
    order = np.array([4, 2, 0, 3, 1])
    pooled = mine_hard_negatives(
        X, LABELS, 2, seed=5, pool_descriptors=X[order], pool_labels=LABELS[order], chunk_size=2
    )
    np.testing.assert_array_equal(order[pooled], distinct)


def test_matches_brute_force_on_random_descriptors():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    labels = rng.integers(0, 12, 60)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    got = mine_hard_negatives(x, labels, 4, distinct_classes=False, chunk_size=7)
    got_distinct = mine_hard_negatives(x, labels, 4, chunk_size=7)
    for a in range(60):
        order = [j for j in np.argsort(d[a]) if labels[j] != labels[a]]
        np.testing.assert_array_equal(got[a], order[:4])
        first_per_class = []
        for j in order:
            if labels[j] not in {labels[k] for k in first_per_class}:
                first_per_class.append(j)
        np.testing.assert_array_equal(got_distinct[a], first_per_class[:4])


def test_ties_are_broken_by_the_seed_and_errors_are_clear():
    pool = np.array([[1.0], [1.0]], np.float32)  # two candidates at the same distance
    picks = {
        int(
            mine_hard_negatives([[0.0]], [0], 1, seed=s, pool_descriptors=pool, pool_labels=[1, 2])[
                0, 0
            ]
        )
        for s in range(16)
    }
    assert picks == {0, 1}
    with pytest.raises(ValueError, match="only 1 candidate negative classes"):
        mine_hard_negatives(X[:3], [0, 0, 1], num_negatives=2)
    with pytest.raises(ValueError, match="one label each"):
        mine_hard_negatives(X, LABELS[:3])
    with pytest.raises(ValueError, match="pool_labels"):
        mine_hard_negatives(X, LABELS, pool_descriptors=X)


# Solid-colour classes; a mean-colour "model" embeds each as its normalised colour, so the
# hardest negatives are known: red's closest other classes are orange (d=0.054) then pink
# (d=0.28); blue and green are at d=2.
COLOURS = [(255, 0, 0), (255, 60, 0), (255, 0, 150), (0, 0, 255), (0, 255, 0)]


def _colour_manifest(folder):
    for c, colour in enumerate(COLOURS):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 16), colour).save(folder / f"c{c}" / f"{i}.png")
    (folder / "c4" / "zero.png").write_bytes(b"")
    return load_manifest(folder)


def _colour_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((None, None, 3)),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, kernel_initializer="identity"),
            keras.layers.UnitNormalization(),
        ]
    )


def test_mined_tuples_and_their_batches(tmp_path):
    manifest = _colour_manifest(tmp_path)
    zero = manifest.paths.index(str(tmp_path / "c4" / "zero.png"))
    log = BadFileLog()
    miner = OfflineHardNegativeMining(
        manifest,
        image_size=16,
        tuples_per_batch=3,
        num_negatives=2,
        num_anchors=16,
        pool_size=16,
        augment=False,
        bad_files=log,
    )
    tuples = miner.mine(_colour_model(), epoch=0)
    assert log.paths == [manifest.paths[zero]]
    assert tuples.shape == (15, 4)  # 16 files, the bad one left out
    assert zero not in tuples
    labels = manifest.labels
    for anchor, positive, *negatives in tuples:
        assert labels[positive] == labels[anchor] and positive != anchor
        assert labels[anchor] not in labels[negatives]
        assert len(set(labels[negatives])) == 2
        if labels[anchor] == 0:
            np.testing.assert_array_equal(labels[negatives], [1, 2])

    images, batch_labels = next(iter(miner.dataset()))
    assert images.shape[0] == 12 and max(images.shape[1:3]) == 16  # aspect geometry
    assert images.shape[1:3] in ((12, 16), (16, 16), (16, 12))
    np.testing.assert_array_equal(batch_labels, labels[tuples[:3].reshape(-1)])
    for image, label in zip(images.numpy(), batch_labels.numpy(), strict=True):
        np.testing.assert_allclose(image[6, 6], COLOURS[label], atol=1e-3)

    again = make_tuple_dataset(
        manifest, _colour_model(), image_size=16, tuples_per_batch=1, num_negatives=2
    )
    assert again.element_spec[0].shape.as_list() == [4, None, None, 3]


@pytest.mark.parametrize("loss_class", [TripletLoss, ContrastiveLoss])
def test_callback_re_mines_every_epoch_inside_fit(tmp_path, caplog, loss_class):
    """The tuples are labelled batches: either loss trains on them unchanged."""
    manifest = _colour_manifest(tmp_path)
    miner = OfflineHardNegativeMining(
        manifest, image_size=16, tuples_per_batch=2, num_negatives=2, num_anchors=6, pool_size=10
    )
    with pytest.raises(Exception, match="No tuples mined yet"):
        next(iter(miner.dataset()))
    model = _colour_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_class())
    with caplog.at_level(logging.INFO, logger="remap.training"):
        history = model.fit(
            miner.dataset(),
            steps_per_epoch=2,
            epochs=2,
            callbacks=[miner],
            shuffle=False,
            verbose=0,
        )
    assert len(history.history["loss"]) == 2
    assert np.all(np.isfinite(history.history["loss"]))
    assert "Epoch 1: mined" in caplog.text and "Epoch 2: mined" in caplog.text
    assert miner.tuples is not None and miner.tuples.shape[1] == 4


def test_callback_checks_its_arguments(tmp_path):
    manifest = _colour_manifest(tmp_path)
    with pytest.raises(ValueError, match="num_negatives"):
        OfflineHardNegativeMining(manifest, num_negatives=5)
    with pytest.raises(ValueError, match="tuples_per_batch"):
        OfflineHardNegativeMining(manifest, tuples_per_batch=0)
