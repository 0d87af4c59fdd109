"""Makes ``model.fit`` work under ``tf.distribute.MultiWorkerMirroredStrategy`` in Keras 3.

keras-team/keras#20585 (open; reported since Keras 3.0 / TF 2.16, reproduced here on Keras
3.15.1 with TF 2.20, two worker processes on 127.0.0.1): ``model.fit`` under
MultiWorkerMirroredStrategy (MWMS) with more than one worker fails twice in
``keras/src/backend/tensorflow/trainer.py``:

1. ``TensorFlowTrainer._maybe_symbolic_build`` takes the first distributed batch and calls
   ``strategy.reduce("MEAN", batch, axis=None)`` on the whole ``(x, y)`` *structure* just to
   get a sample batch for shape inference. ``Strategy.reduce`` does not accept a nest
   (``distribute_lib.py``: "TODO: support `value` being a nest"); MirroredStrategy happens
   to tolerate it, but ``CollectiveAllReduceStrategy._reduce_to`` converts the tuple with
   ``convert_to_tensor`` and fails with ``ValueError: Attempt to convert a value
   (PerReplica:{...})``. (It would also be a cross-worker collective just to read shapes.)
2. ``reduce_per_replica(..., reduction="auto")``, which merges the step's logs, takes the
   multi-worker branch ``strategy.reduce("MEAN", v, axis=0)``. The logs are scalars (each
   replica's metric result), so ``axis=0`` fails with ``Invalid reduction dimension 0 for
   input with 0 dimensions``. The single-worker branch averages over *replicas* only
   (``tf.reduce_mean(local_results, axis=0)`` on the stacked results); the cross-worker
   equivalent is ``strategy.reduce("MEAN", v, axis=None)``.

`apply()` fixes both, only where needed: the new ``_maybe_symbolic_build`` takes the first
local replica's tensors (shapes and dtypes are all a symbolic build needs) and the new
``reduce_per_replica`` uses ``axis=None`` for the mean; in every other case (no strategy,
MirroredStrategy, one worker, other reductions) they call the original Keras code. The patch
is applied once (idempotent), only on affected Keras versions, and can be switched off with
the environment variable ``REMAP_TF_DISABLE_KERAS_PATCH=1`` (the test uses this to show the
original error). Remove this module once a Keras release fixes #20585 (set
`FIXED_IN` then).
"""

from __future__ import annotations

import os
import threading

DISABLE_ENV = "REMAP_TF_DISABLE_KERAS_PATCH"
# First Keras 3 release with the bug, and the first without it (None: not fixed yet). Only
# 3.15.1 was run here; on other 3.x releases the patch is applied because the issue is
# open, and it only changes behaviour in multi-worker mode, where unpatched fit fails.
AFFECTED_FROM = (3, 0, 0)
FIXED_IN: tuple[int, int, int] | None = None

_lock = threading.Lock()
_originals: dict[str, object] = {}


def _version_tuple(version: str) -> tuple[int, int, int]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def is_affected(version: str | None = None) -> bool:
    """Whether Keras ``version`` (default: the installed one) has keras-team/keras#20585."""
    if version is None:
        import keras

        version = keras.__version__
    current = _version_tuple(version)
    if current < AFFECTED_FROM or current[0] >= 4:
        return False
    return FIXED_IN is None or current < FIXED_IN


def is_applied() -> bool:
    """Whether `apply` has patched Keras in this process."""
    return bool(_originals)


def apply() -> bool:
    """Patches Keras' TensorFlow trainer for multi-worker ``fit`` if this version needs it.

    Safe to call many times (the second call does nothing) and from any module; call it
    before the first ``model.fit``. Does nothing when ``REMAP_TF_DISABLE_KERAS_PATCH`` is set
    to a non-empty value other than ``0``, or when Keras is not affected.

    Returns:
        True if the patch is in place after the call.
    """
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return is_applied()
    if not is_affected():
        return False
    with _lock:
        if _originals:
            return True
        from keras.src.backend.tensorflow import trainer as tf_trainer

        _originals["reduce_per_replica"] = tf_trainer.reduce_per_replica
        _originals["_maybe_symbolic_build"] = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
        # `_make_function` looks `reduce_per_replica` up in the module at trace time, so
        # replacing the module attribute reaches every train/test/predict step.
        tf_trainer.reduce_per_replica = _reduce_per_replica
        tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    return True


def _is_multi_worker(strategy) -> bool:
    from keras.src.backend.tensorflow import trainer as tf_trainer

    return strategy is not None and tf_trainer._collective_all_reduce_multi_worker(strategy)


def _reduce_per_replica(values, strategy, reduction):
    """Keras' ``reduce_per_replica`` with the multi-worker mean over replicas only."""
    import tensorflow as tf
    from keras.src import tree

    resolved = reduction
    if reduction == "auto" and not isinstance(strategy, tf.distribute.TPUStrategy):
        resolved = "mean"
    if resolved == "mean" and _is_multi_worker(strategy):
        # Same as the single-worker branch, mean over replicas, but across workers.
        return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
    return _originals["reduce_per_replica"](values, strategy, reduction)


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """Keras' ``_maybe_symbolic_build`` that reads one local replica's batch under MWMS."""
    strategy = self._distribute_strategy
    if iterator is None or not _is_multi_worker(strategy):
        return _originals["_maybe_symbolic_build"](self, iterator=iterator, data_batch=data_batch)
    import tensorflow as tf
    from keras.src import tree

    def first_local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    for _, _, epoch_iterator in iterator:
        data_batch = tree.map_structure(first_local, next(epoch_iterator))
        break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)
