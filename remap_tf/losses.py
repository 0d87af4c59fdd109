"""Metric-learning losses with online mining on L2-normalised descriptors: triplet and
contrastive, as pure functions and Keras losses.

**Triplet loss.** Distances are **squared Euclidean** distances, ``d(a, b) = ||a - b||^2``
(``= 2 - 2 a.b`` for unit vectors, so in ``[0, 4]``), computed in float32 whatever the
descriptors' dtype. The loss of an anchor ``a`` with a positive ``p`` (same label) and a
negative ``n`` (other label) is

    max(0, margin + d(a, p) - d(a, n))

as in Gordo et al., "End-to-end learning of deep visual representations for image retrieval"
(IJCV 2017), whose training REMAP follows (Husain & Bober, IEEE TIP 2019, Sec. IV: triplet loss,
margin 0.1). Three ways to choose the triplets inside a batch:

- ``"batch_hard"`` (Hermans, Beyer & Leibe, "In defense of the triplet loss", 2017): for each
  anchor, its farthest positive and its closest negative; one triplet per anchor.
- ``"semi_hard"`` (Schroff et al., "FaceNet", CVPR 2015): for each (anchor, positive) pair, the
  closest negative that is still farther than the positive (``d(a, n) > d(a, p)``); when no
  negative is farther, the farthest negative (the easiest, as ``tfa.losses.TripletSemiHardLoss``
  does). An anchor's loss is the mean over its positives.
- ``"batch_all"``: every valid (anchor, positive, negative) triplet; an anchor's loss is the mean
  over its triplets.

**Contrastive loss** (Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human
annotation", TPAMI 2018; cirtorch's ``contrastive_loss``). On the **Euclidean** (not squared)
distance ``e(a, b) = ||a - b||``, a positive pair costs ``0.5 e^2`` and a negative pair
``0.5 max(0, margin - e)^2`` (cirtorch's default margin 0.7). Two minings:

- ``"batch_all"`` (the default): an anchor's loss is the mean of ``0.5 e^2`` over its positives
  plus the mean of ``0.5 (margin - e)^2`` over its *active* negatives (``e < margin``; 0 when
  none is). cirtorch's tuples pair a query with its positive and a few mined hard negatives, so
  every pair it scores is a positive or a negative that may still be active; averaging over all
  in-batch negatives would dilute those few under the many already beyond the margin.
- ``"batch_hard"``: its farthest positive and its closest negative.

"semi_hard" is a triplet notion and is refused for the contrastive loss.

In every mode the batch loss is the mean over the anchors that have at least one positive and
one negative in the batch, and 0 when no anchor has both.
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf

from remap_tf.contract import KERAS_PACKAGE
from remap_tf.errors import InvalidInputError
from remap_tf.specs import LOSSES, MININGS, check_loss_mining, get_loss_spec

__all__ = [
    "CONTRASTIVE_MININGS",
    "ContrastiveLoss",
    "MININGS",
    "TripletLoss",
    "contrastive_loss",
    "hardest_negative_indices",
    "hardest_positive_indices",
    "make_loss",
    "pairwise_distances",
    "semi_hard_negative_indices",
    "triplet_loss",
]

CONTRASTIVE_MININGS = LOSSES["contrastive"].minings
# Below this squared distance the Euclidean distance is taken as sqrt(_MIN_SQUARED): the
# gradient of sqrt is infinite at 0 (duplicate descriptors), that of the clipped one is 0.
_MIN_SQUARED = 1e-12


def _check_margin(margin) -> float:
    try:
        value = float(margin)
    except (TypeError, ValueError):
        raise InvalidInputError(f"`margin` must be a number >= 0, received {margin!r}.") from None
    if not value >= 0.0:  # also rejects NaN
        raise InvalidInputError(f"`margin` must be a number >= 0, received {margin!r}.")
    return value


def _labels_vector(labels):
    """Labels ``(batch,)`` or ``(batch, 1)`` of any numeric dtype -> int64 ``(batch,)``."""
    labels = tf.convert_to_tensor(labels)
    if labels.dtype.is_floating:
        labels = tf.round(labels)
    return tf.reshape(tf.cast(labels, tf.int64), [-1])


def pairwise_distances(anchors, candidates=None):
    """Squared Euclidean distances between rows, in float32.

    Args:
        anchors: ``(num_anchors, dim)`` descriptors.
        candidates: ``(num_candidates, dim)`` descriptors; default ``anchors``.

    Returns:
        float32 ``(num_anchors, num_candidates)``, ``||a_i - c_j||^2``, clipped at 0 against
        rounding.
    """
    a = tf.cast(anchors, tf.float32)
    c = a if candidates is None else tf.cast(candidates, tf.float32)
    sq_a = tf.reduce_sum(tf.square(a), axis=1, keepdims=True)
    sq_c = tf.reduce_sum(tf.square(c), axis=1, keepdims=True)
    distances = sq_a - 2.0 * tf.matmul(a, c, transpose_b=True) + tf.transpose(sq_c)
    return tf.maximum(distances, 0.0)


def _masks(anchor_labels, candidate_labels, anchor_positions):
    """Positive and negative masks ``(num_anchors, num_candidates)``.

    ``anchor_positions[i]`` is the column of anchor ``i`` itself among the candidates, which is
    never its own positive.
    """
    same = tf.equal(anchor_labels[:, None], candidate_labels[None, :])
    columns = tf.range(tf.shape(candidate_labels, out_type=tf.int64)[0])
    itself = tf.equal(anchor_positions[:, None], columns[None, :])
    return tf.logical_and(same, tf.logical_not(itself)), tf.logical_not(same)


def _local_problem(labels, descriptors):
    labels = _labels_vector(labels)
    distances = pairwise_distances(descriptors)
    positions = tf.range(tf.shape(labels, out_type=tf.int64)[0])
    positive, negative = _masks(labels, labels, positions)
    return distances, positive, negative


def _masked_argmax(values, mask):
    """Per row, the column of the largest ``values`` where ``mask``; -1 for an empty row."""
    filled = tf.where(mask, values, tf.fill(tf.shape(values), -float("inf")))
    index = tf.argmax(filled, axis=1, output_type=tf.int64)
    return tf.where(tf.reduce_any(mask, axis=1), index, -1)


def _masked_argmin(values, mask):
    filled = tf.where(mask, values, tf.fill(tf.shape(values), float("inf")))
    index = tf.argmin(filled, axis=1, output_type=tf.int64)
    return tf.where(tf.reduce_any(mask, axis=1), index, -1)


def hardest_positive_indices(labels, descriptors):
    """For each anchor, the index of its farthest same-label descriptor (batch-hard positive).

    Args:
        labels: ``(batch,)`` or ``(batch, 1)`` integer labels.
        descriptors: ``(batch, dim)`` descriptors.

    Returns:
        int64 ``(batch,)``; -1 where the anchor has no other descriptor with its label.
    """
    distances, positive, _ = _local_problem(labels, descriptors)
    return _masked_argmax(distances, positive)


def hardest_negative_indices(labels, descriptors):
    """For each anchor, the index of its closest other-label descriptor (batch-hard negative).

    Returns:
        int64 ``(batch,)``; -1 where every descriptor in the batch has the anchor's label.
    """
    distances, _, negative = _local_problem(labels, descriptors)
    return _masked_argmin(distances, negative)


def _semi_hard_choice(distances, positive, negative):
    """Semi-hard negatives ``(anchors, candidates)`` for every (anchor, positive) pair.

    Returns the chosen negative's column and its distance to the anchor, both
    ``(num_anchors, num_candidates)`` indexed by ``[anchor, positive]``.
    """
    d_ap = distances[:, :, None]  # (a, p, 1)
    d_an = distances[:, None, :]  # (a, 1, n)
    negative3 = tf.broadcast_to(negative[:, None, :], tf.shape(d_ap - d_an))
    outside = tf.logical_and(negative3, d_an > d_ap)
    has_outside = tf.reduce_any(outside, axis=2)
    d_an3 = tf.broadcast_to(d_an, tf.shape(negative3))
    closest_outside = _masked_argmin_3d(d_an3, outside)
    farthest = _masked_argmax(distances, negative)  # (a,)
    farthest = tf.broadcast_to(farthest[:, None], tf.shape(has_outside))
    index = tf.where(has_outside, closest_outside, farthest)
    valid = tf.logical_and(positive, tf.reduce_any(negative, axis=1, keepdims=True))
    index = tf.where(valid, index, -1)
    chosen = tf.gather(distances, tf.maximum(index, 0), batch_dims=1)
    return index, chosen


def _masked_argmin_3d(values, mask):
    filled = tf.where(mask, values, tf.fill(tf.shape(values), float("inf")))
    return tf.argmin(filled, axis=2, output_type=tf.int64)


def semi_hard_negative_indices(labels, descriptors, margin=0.1):
    """For each (anchor, positive) pair, the index of its semi-hard negative.

    The negative is the closest one with ``d(a, n) > d(a, p)``; when no negative is that far, the
    farthest negative (see the module docstring). ``margin`` does not change the choice (a
    negative farther than ``d(a, p) + margin`` simply gives a zero loss); it is accepted so the
    signature matches `triplet_loss`.

    Args:
        labels: ``(batch,)`` or ``(batch, 1)`` integer labels.
        descriptors: ``(batch, dim)`` descriptors.

    Returns:
        int64 ``(batch, batch)``: entry ``[a, p]`` is the chosen negative for the pair, -1 where
        ``p`` is not a positive of ``a`` or ``a`` has no negative.
    """
    _check_margin(margin)
    distances, positive, negative = _local_problem(labels, descriptors)
    index, _ = _semi_hard_choice(distances, positive, negative)
    return index


def _anchor_losses(distances, positive, negative, margin: float, mining: str):
    """Per-anchor losses ``(num_anchors,)`` and validity ``(num_anchors,)`` (has both)."""
    has_positive = tf.reduce_any(positive, axis=1)
    valid = tf.logical_and(has_positive, tf.reduce_any(negative, axis=1))
    zeros = tf.zeros_like(distances)
    if mining == "batch_hard":
        d_ap = tf.reduce_max(tf.where(positive, distances, zeros), axis=1)
        d_an = tf.reduce_min(
            tf.where(negative, distances, tf.fill(tf.shape(distances), float("inf"))), axis=1
        )
        losses = tf.nn.relu(margin + d_ap - tf.where(valid, d_an, zeros[:, 0]))
    elif mining == "semi_hard":
        _, d_an = _semi_hard_choice(distances, positive, negative)
        pair_losses = tf.nn.relu(margin + distances - d_an)
        pair_mask = tf.cast(tf.logical_and(positive, valid[:, None]), tf.float32)
        count = tf.reduce_sum(pair_mask, axis=1)
        losses = tf.math.divide_no_nan(tf.reduce_sum(pair_losses * pair_mask, axis=1), count)
    else:  # batch_all
        triplet = tf.logical_and(positive[:, :, None], negative[:, None, :])
        values = tf.nn.relu(margin + distances[:, :, None] - distances[:, None, :])
        mask = tf.cast(triplet, tf.float32)
        count = tf.reduce_sum(mask, axis=[1, 2])
        losses = tf.math.divide_no_nan(tf.reduce_sum(values * mask, axis=[1, 2]), count)
    return tf.where(valid, losses, tf.zeros_like(losses)), valid


def _mean_over_valid(losses, valid):
    count = tf.reduce_sum(tf.cast(valid, tf.float32))
    return tf.math.divide_no_nan(tf.reduce_sum(losses), count)


def _per_anchor_values(losses, valid):
    """Per-anchor values whose mean over the batch is the mean over the valid anchors.

    Keras reduces a loss's per-sample values with ``sum / batch`` (and, under a strategy, divides
    by the replica count); a scalar would skip that division. Scaling each valid anchor's loss
    by ``batch / num_valid`` makes the plain mean equal to the mean over valid anchors.
    """
    count = tf.reduce_sum(tf.cast(valid, tf.float32))
    size = tf.cast(tf.size(losses), tf.float32)
    return losses * tf.math.divide_no_nan(size, count)


def triplet_loss(
    labels, descriptors, margin=LOSSES["triplet"].margin, mining=LOSSES["triplet"].mining
):
    """Triplet loss of a batch with online mining (squared Euclidean distances, float32).

    Args:
        labels: ``(batch,)`` or ``(batch, 1)`` integer class labels (floats are rounded).
        descriptors: ``(batch, dim)`` L2-normalised descriptors, any float dtype.
        margin: the triplet margin ``m >= 0`` (REMAP and Gordo et al. use 0.1).
        mining: ``"batch_hard"``, ``"semi_hard"`` or ``"batch_all"`` (see the module docstring).

    Returns:
        float32 scalar: the mean over anchors that have a positive and a negative in the batch of
        their loss; 0 when no anchor has both.

    Example:
        >>> triplet_loss([0, 0, 1, 1], [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        <tf.Tensor: shape=(), dtype=float32, numpy=0.0>
    """
    anchor_losses = _triplet_losses(margin, mining)
    losses, valid = anchor_losses(*_local_problem(labels, descriptors))
    return _mean_over_valid(losses, valid)


def _triplet_losses(margin, mining):
    """The checked triplet per-anchor loss ``(distances, positive, negative) -> (losses,
    valid)``."""
    return functools.partial(
        _anchor_losses, margin=_check_margin(margin), mining=check_loss_mining("triplet", mining)
    )


def _contrastive_anchor_losses(distances, positive, negative, margin: float, mining: str):
    """Contrastive per-anchor losses ``(num_anchors,)`` and validity (has both), from squared
    distances ``(num_anchors, num_candidates)`` and the masks."""
    has_positive = tf.reduce_any(positive, axis=1)
    valid = tf.logical_and(has_positive, tf.reduce_any(negative, axis=1))
    zeros = tf.zeros_like(distances)
    euclidean = tf.sqrt(tf.maximum(distances, _MIN_SQUARED))
    if mining == "batch_hard":
        far_positive = tf.reduce_max(tf.where(positive, distances, zeros), axis=1)
        inf = tf.fill(tf.shape(distances), float("inf"))
        near_negative = tf.reduce_min(tf.where(negative, euclidean, inf), axis=1)
        near_negative = tf.where(valid, near_negative, margin)  # no inf into the arithmetic
        losses = 0.5 * far_positive + 0.5 * tf.square(tf.nn.relu(margin - near_negative))
    else:  # batch_all: all positives, the active negatives
        positive_mask = tf.cast(positive, tf.float32)
        positive_term = tf.math.divide_no_nan(
            tf.reduce_sum(0.5 * distances * positive_mask, axis=1),
            tf.reduce_sum(positive_mask, axis=1),
        )
        hinge = tf.nn.relu(margin - euclidean)
        active = tf.cast(tf.logical_and(negative, hinge > 0.0), tf.float32)
        negative_term = tf.math.divide_no_nan(
            tf.reduce_sum(0.5 * tf.square(hinge) * active, axis=1), tf.reduce_sum(active, axis=1)
        )
        losses = positive_term + negative_term
    return tf.where(valid, losses, tf.zeros_like(losses)), valid


def _contrastive_losses(margin, mining):
    """The checked contrastive per-anchor loss, as `_triplet_losses`."""
    return functools.partial(
        _contrastive_anchor_losses,
        margin=_check_margin(margin),
        mining=check_loss_mining("contrastive", mining),
    )


def contrastive_loss(
    labels, descriptors, margin=LOSSES["contrastive"].margin, mining=LOSSES["contrastive"].mining
):
    """Contrastive loss of a batch with online mining (Euclidean distances, float32).

    Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human annotation"
    (TPAMI 2018): a positive pair costs ``0.5 e^2``, a negative pair
    ``0.5 max(0, margin - e)^2``, ``e`` the Euclidean distance.

    Args:
        labels: ``(batch,)`` or ``(batch, 1)`` integer class labels (floats are rounded).
        descriptors: ``(batch, dim)`` L2-normalised descriptors, any float dtype.
        margin: ``m >= 0`` on the Euclidean distance (cirtorch's default 0.7).
        mining: ``"batch_all"`` (the default, closest to cirtorch: every positive and every
            active negative, the module docstring says why) or ``"batch_hard"`` (farthest
            positive, closest negative).

    Returns:
        float32 scalar: the mean over anchors that have a positive and a negative in the batch of
        their loss; 0 when no anchor has both.

    Example:
        >>> contrastive_loss([0, 0, 1, 1], [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        <tf.Tensor: shape=(), dtype=float32, numpy=0.0>
    """
    anchor_losses = _contrastive_losses(margin, mining)
    losses, valid = anchor_losses(*_local_problem(labels, descriptors))
    return _mean_over_valid(losses, valid)


def _cross_replica_losses(labels, descriptors, anchor_losses, context):
    """Losses and validity ``(local_batch,)`` of this replica's anchors, mined against the batch
    gathered from every replica; ``anchor_losses(distances, positive, negative)`` is the
    loss's per-anchor function.

    ``ReplicaContext.all_gather`` is differentiable: its gradient sums the upstream gradients of
    all replicas and hands each replica its own slice, so after the strategy sums the replicas'
    gradients the update equals the gradient of the global-batch loss.
    """
    labels = _labels_vector(labels)
    local = tf.cast(descriptors, tf.float32)
    size = tf.shape(labels, out_type=tf.int64)[:1]
    sizes = context.all_gather(size, axis=0)
    all_labels = context.all_gather(labels, axis=0)
    all_descriptors = context.all_gather(local, axis=0)
    replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
    offset = tf.reduce_sum(sizes[:replica])
    positions = offset + tf.range(size[0])
    distances = pairwise_distances(local, all_descriptors)
    positive, negative = _masks(labels, all_labels, positions)
    return anchor_losses(distances, positive, negative)


class _MinedLoss(keras.losses.Loss):
    """A Keras loss over a checked per-anchor loss function (a ``functools.partial`` holding
    ``margin`` and ``mining``): the ``call`` and ``get_config`` every loss here shares (one
    value per anchor, local or cross-replica mining)."""

    def __init__(self, anchor_losses, cross_replica, name, **kwargs):
        super().__init__(name=name, **kwargs)
        self._anchor_losses = anchor_losses
        self.margin = anchor_losses.keywords["margin"]
        self.mining = anchor_losses.keywords["mining"]
        self.cross_replica = bool(cross_replica)

    def call(self, y_true, y_pred):
        context = tf.distribute.get_replica_context() if tf.distribute.has_strategy() else None
        if self.cross_replica and context is not None and context.num_replicas_in_sync > 1:
            losses, valid = _cross_replica_losses(y_true, y_pred, self._anchor_losses, context)
        else:
            losses, valid = self._anchor_losses(*_local_problem(y_true, y_pred))
        return _per_anchor_values(losses, valid)

    def get_config(self):
        return {
            **super().get_config(),
            "margin": self.margin,
            "mining": self.mining,
            "cross_replica": self.cross_replica,
        }


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class TripletLoss(_MinedLoss):
    """Triplet loss with online mining, for ``model.compile(loss=TripletLoss())``.

    A thin wrapper over `triplet_loss`: ``y_true`` are the class labels ``(batch,)`` or
    ``(batch, 1)``, ``y_pred`` the L2-normalised descriptors ``(batch, dim)``. With the default
    reduction the value equals `triplet_loss` (the mean over anchors with a positive and a
    negative). ``call`` returns one value per anchor, each valid anchor's loss scaled by
    ``batch / num_valid_anchors`` (invalid anchors 0), so that Keras' ``sum / batch`` reduction,
    its division by the replica count under a strategy, and per-anchor ``sample_weight`` all
    apply as for any Keras loss.

    Args:
        margin: triplet margin (squared Euclidean distances; 0.1 as in REMAP).
        mining: ``"batch_hard"``, ``"semi_hard"`` or ``"batch_all"``.
        cross_replica: under a ``tf.distribute`` strategy with several replicas, gather labels
            and descriptors from all replicas and mine this replica's anchors against the global
            batch (positives and negatives may come from other replicas). Gradients reach every
            replica's descriptors. Outside a strategy, or with one replica, same as False.
        name: loss name.

    Example:
        >>> model.compile(optimizer="adam", loss=TripletLoss(margin=0.1, mining="semi_hard"))
        >>> model.fit(dataset_of_images_and_labels, steps_per_epoch=100)
    """

    def __init__(
        self,
        margin: float = LOSSES["triplet"].margin,
        mining: str = LOSSES["triplet"].mining,
        cross_replica: bool = False,
        name: str = "triplet_loss",
        **kwargs,
    ):
        anchor_losses = _triplet_losses(margin, mining)
        super().__init__(anchor_losses, cross_replica, name, **kwargs)


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class ContrastiveLoss(_MinedLoss):
    """Contrastive loss with online mining, for ``model.compile(loss=ContrastiveLoss())``.

    A thin wrapper over `contrastive_loss` (Radenović et al., TPAMI 2018; cirtorch's
    ``ContrastiveLoss``), with `TripletLoss`'s contract: ``y_true`` the class labels,
    ``y_pred`` the L2-normalised descriptors ``(batch, dim)``, one value per anchor so that
    Keras' reduction, the replica count and ``sample_weight`` apply, and the same
    ``cross_replica`` option.

    Args:
        margin: margin on the Euclidean distance (cirtorch's default 0.7).
        mining: ``"batch_all"`` (default, closest to cirtorch's tuples of a positive and hard
            negatives: the active negatives are averaged, see the module docstring) or
            ``"batch_hard"``.
        cross_replica: mine over the batch gathered from every replica (see `TripletLoss`).
        name: loss name.

    Example:
        >>> model.compile(optimizer="adam", loss=ContrastiveLoss(margin=0.7))
    """

    def __init__(
        self,
        margin: float = LOSSES["contrastive"].margin,
        mining: str = LOSSES["contrastive"].mining,
        cross_replica: bool = False,
        name: str = "contrastive_loss",
        **kwargs,
    ):
        anchor_losses = _contrastive_losses(margin, mining)
        super().__init__(anchor_losses, cross_replica, name, **kwargs)


# Loss kind (`remap_tf.specs.LOSSES`) -> its Keras loss.
_LOSS_CLASSES = {"triplet": TripletLoss, "contrastive": ContrastiveLoss}


def make_loss(kind: str = "triplet", margin=None, mining=None, cross_replica: bool = False):
    """The Keras loss of ``kind`` (``"triplet"`` or ``"contrastive"``, `remap_tf.specs.LOSSES`).

    Args:
        kind: the loss kind; InvalidInputError naming it otherwise.
        margin: its margin; None: the kind's default (0.1 triplet, 0.7 contrastive).
        mining: its mining; None: the kind's default (batch_hard triplet, batch_all
            contrastive).
        cross_replica: as `TripletLoss`.

    Example:
        >>> make_loss("contrastive").margin
        0.7
    """
    spec = get_loss_spec(kind)
    return _LOSS_CLASSES[kind](
        margin=spec.margin if margin is None else margin,
        mining=spec.mining if mining is None else mining,
        cross_replica=cross_replica,
    )
