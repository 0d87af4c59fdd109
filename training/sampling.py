"""Class-balanced ``P x K`` batches of manifest indices, and their split over workers.

Each batch holds ``P`` classes (``classes_per_batch``) and ``K`` images of each
(``images_per_class``), as in Hermans et al., "In defense of the triplet loss" (2017): every
anchor has positives and negatives in its batch. The batches are indices into a manifest; the
pipeline (`training.pipeline.make_train_dataset`) decodes them.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from remap_tf.errors import InvalidInputError


def balanced_batch_indices(labels, classes_per_batch: int, images_per_class: int, seed: int = 0):
    """An infinite dataset of class-balanced index batches, each int64 ``(P * K,)``.

    Batch ``t`` takes ``P`` distinct classes at random, then ``K`` images of each: a random
    permutation of the class's images, cycled when the class has fewer than ``K``. All choices
    use stateless random ops seeded by ``(seed, t)``, so the stream is reproducible. Classes
    with no image are never picked.

    Args:
        labels: int ``(num_images,)`` class labels.
        classes_per_batch: ``P``; at most the number of classes present.
        images_per_class: ``K``.
        seed: the stream's seed.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    order = np.argsort(labels, kind="stable")
    classes, lengths = np.unique(labels[order], return_counts=True)
    if classes_per_batch > classes.size:
        raise InvalidInputError(
            f"`classes_per_batch`={classes_per_batch} but the data has only {classes.size} "
            "usable classes."
        )
    members = tf.RaggedTensor.from_row_lengths(
        tf.constant(order, tf.int64), tf.constant(lengths, tf.int64)
    )
    num_classes = int(classes.size)
    p, k = int(classes_per_batch), int(images_per_class)

    def batch(step):
        seeds = tf.random.experimental.stateless_split(
            tf.stack([tf.constant(seed, tf.int64), step]), num=2
        )
        keys = tf.random.stateless_uniform([num_classes], seeds[0])
        chosen = tf.argsort(keys)[:p]
        rows = tf.gather(members, chosen)
        values = rows.flat_values
        noise = tf.random.stateless_uniform(tf.shape(values), seeds[1], dtype=tf.float64)
        shuffled = tf.gather(values, tf.argsort(tf.cast(rows.value_rowids(), tf.float64) + noise))
        starts = rows.row_starts()
        offsets = tf.range(k, dtype=tf.int64)[None, :] % rows.row_lengths()[:, None]
        return tf.reshape(tf.gather(shuffled, starts[:, None] + offsets), [-1])

    return tf.data.Dataset.counter(dtype=tf.int64).map(batch)


def shard_batches(index_batches, batch: int, shard) -> tuple[tf.data.Dataset, int]:
    """Keeps slice ``index`` of every global index batch, for one input pipeline per worker.

    Args:
        index_batches: a dataset of int64 ``(batch,)`` global index batches.
        batch: the global batch size.
        shard: ``(num_shards, index)``; ``batch`` must be divisible by ``num_shards``.

    Returns:
        ``(index batches of batch // num_shards, batch // num_shards)``.
    """
    try:
        num_shards, index = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"`shard` must be (num_shards, index), received {shard!r}."
        ) from None
    if num_shards < 1 or not 0 <= index < num_shards or batch % num_shards:
        raise InvalidInputError(
            f"`shard` {shard!r} needs 0 <= index < num_shards and the batch of {batch} images "
            "divisible by num_shards."
        )
    size = batch // num_shards
    return index_batches.map(lambda row: row[index * size : (index + 1) * size]), size
