"""Keras callbacks for REMAP training: retrieval mAP, a wall-clock limit, atomic checkpoints.

All are ordinary ``keras.callbacks.Callback`` objects, usable with any ``model.fit``. Put
`RetrievalEvaluation` before ``TensorBoard``/``ModelCheckpoint`` in the callback list: it
adds ``logs["val_map"]`` in ``on_epoch_end`` and the later callbacks see it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from remap_tf.errors import InvalidInputError
from remap_tf.evaluation import label_map
from remap_tf.io import atomic_save, atomic_write_text
from remap_tf.training.config import CONFIG_FILE
from remap_tf.training.pipeline import embed_dataset

VAL_MAP = "val_map"


class RetrievalEvaluation(keras.callbacks.Callback):
    """Computes retrieval mAP on a labelled validation set and logs it as ``val_map``.

    Every validation image is a query against all the others; its positives are the images
    with the same label (`remap_tf.evaluation.label_map`). Descriptors are computed with the
    model in inference mode, batch by batch, so the set never has to fit in memory.

    Args:
        data: either a pair ``(images, labels)`` of arrays, ``(num_images, height, width, 3)``
            RGB 0-255 and ``(num_images,)``, or a finite ``tf.data.Dataset`` of
            ``(images, labels)`` batches (e.g. `training.pipeline.make_eval_dataset`).
        every: evaluate after every ``every`` epochs (and always after the last).
        batch_size: batch size when ``data`` is arrays.
        at_train_begin: also evaluate before the first step (``initial_map``: the mAP of
            the model as it enters training), printed and kept on the callback.
        verbose: print one line per evaluation.
        before_evaluate: optional callable run before each evaluation (e.g. a BatchNorm
            recalibration, `remap_tf.recalibrate_batch_norm`, for random-init backbones).

    Rows with a negative label (bad files, see `training.pipeline.make_eval_dataset`) are
    left out.

    Attributes:
        initial_map: mAP before training (None if ``at_train_begin`` is False).
        history: list of ``(epoch, mAP)``, epochs counted from 1.
    """

    def __init__(
        self,
        data,
        every: int = 1,
        batch_size: int = 16,
        at_train_begin: bool = True,
        verbose: int = 1,
        before_evaluate=None,
    ):
        super().__init__()
        self.before_evaluate = before_evaluate
        if every < 1:
            raise InvalidInputError(f"`every` must be >= 1, received {every!r}.")
        if isinstance(data, tf.data.Dataset):
            self._dataset = data
        else:
            images, labels = data
            images = np.asarray(images)
            labels = np.asarray(labels)
            if images.ndim < 2 or len(images) != len(labels) or len(images) < 2:
                raise InvalidInputError(
                    "RetrievalEvaluation needs inputs (N, ...) and labels (N,) with N >= 2, "
                    f"received {images.shape} and {labels.shape}."
                )
            self._dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
        self.every = every
        self.at_train_begin = at_train_begin
        self.verbose = verbose
        self.initial_map: float | None = None
        self.history: list[tuple[int, float]] = []

    def evaluate(self) -> float:
        """mAP of the current model on the validation set."""
        if self.before_evaluate is not None:
            self.before_evaluate()
        descriptors, labels = embed_dataset(self.model, self._dataset)
        keep = labels >= 0
        if keep.sum() < 2:
            raise InvalidInputError("The validation set has fewer than two readable images.")
        return float(label_map(descriptors[keep], labels[keep]))

    def on_train_begin(self, logs=None):
        if self.at_train_begin:
            self.initial_map = self.evaluate()
            if self.verbose:
                print(f"Validation mAP before training: {self.initial_map:.4f}", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        last = self.params.get("epochs") if self.params else None
        if (epoch + 1) % self.every and epoch + 1 != last:
            return
        value = self.evaluate()
        self.history.append((epoch + 1, value))
        if logs is not None:
            logs[VAL_MAP] = value
        if self.verbose:
            print(f"Epoch {epoch + 1}: validation mAP {value:.4f}", flush=True)


class TimeLimit(keras.callbacks.Callback):
    """Stops training cleanly once ``seconds`` of wall-clock time have passed.

    Checked after every batch; the current step finishes, the epoch-end callbacks run
    (checkpoints, evaluation), and ``fit`` returns normally. ``stopped`` tells whether the
    limit was hit. Not for MultiWorkerMirroredStrategy: workers would stop at different
    steps and the collectives would hang (`training.config` rejects the combination).

    Args:
        seconds: the budget, measured from ``on_train_begin``.
    """

    def __init__(self, seconds: float):
        super().__init__()
        if not seconds > 0:
            raise InvalidInputError(f"`seconds` must be > 0, received {seconds!r}.")
        self.seconds = float(seconds)
        self.stopped = False
        self._start = None

    def on_train_begin(self, logs=None):
        self._start = time.monotonic()
        self.stopped = False

    def on_train_batch_end(self, batch, logs=None):
        if self._start is not None and time.monotonic() - self._start >= self.seconds:
            self.stopped = True
            self.model.stop_training = True


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that writes each file aside and renames it, plus ``config.yaml``.

    A kill while saving leaves the previous checkpoints intact. After each save, the
    resolved training config (``config``, a `training.config.TrainConfig`) is written
    atomically as ``config.yaml`` in the checkpoint folder.

    Args:
        filepath, **kwargs: as ``keras.callbacks.ModelCheckpoint``.
        config: the `TrainConfig` to write beside the checkpoints, or None.
    """

    def __init__(self, filepath, config=None, **kwargs):
        super().__init__(filepath, **kwargs)
        self._train_config = config

    def _save_model(self, epoch, batch, logs):
        filepath = self._get_file_path(epoch, batch, logs)
        if not self._should_save_model(epoch, batch, logs, filepath):
            return
        if self.save_weights_only:
            atomic_save(filepath, lambda tmp: self.model.save_weights(tmp, overwrite=True))
        else:
            atomic_save(filepath, lambda tmp: self.model.save(tmp, overwrite=True))
        if self._train_config is not None:
            self._train_config.save(Path(filepath).parent / CONFIG_FILE)
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: saved {filepath}", flush=True)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` whose weights and metadata files are replaced atomically.

    Keras' version overwrites ``latest.weights.h5`` in place, so a SIGKILL during the write
    can leave a corrupt file. Here each file is written aside and renamed; the previous
    state is also kept (``double_checkpoint``). The resolved config is written beside it.
    On restart, ``fit`` resumes at the start of the epoch in progress when the backup was
    written, with the weights and optimizer state (step count, so the learning-rate
    schedule too) of that backup.
    """

    def __init__(self, backup_dir, config=None, **kwargs):
        kwargs.setdefault("double_checkpoint", True)
        super().__init__(backup_dir, **kwargs)
        self._train_config = config

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        if self.double_checkpoint and os.path.exists(self._weights_path):
            # Copies, so that a kill at any point leaves at least one complete state.
            shutil.copyfile(self._weights_path, self._prev_weights_path)
            if os.path.exists(self._training_metadata_path):
                shutil.copyfile(self._training_metadata_path, self._prev_training_metadata_path)
        atomic_save(self._weights_path, lambda tmp: self.model.save_weights(tmp, overwrite=True))
        metadata = json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen})
        atomic_write_text(self._training_metadata_path, metadata)
        if self._train_config is not None:
            self._train_config.save(Path(self.backup_dir) / CONFIG_FILE)

    def on_train_begin(self, logs=None):
        # Keras only falls back to the previous backup on OSError; a truncated file can
        # also raise ValueError from h5py.
        try:
            super().on_train_begin(logs)
        except ValueError:
            if not os.path.exists(self._prev_weights_path):
                raise
            os.replace(self._prev_weights_path, self._weights_path)
            if os.path.exists(self._prev_training_metadata_path):
                os.replace(self._prev_training_metadata_path, self._training_metadata_path)
            self._load_model()


def backup_epoch(backup_dir) -> int | None:
    """The epoch a backup in ``backup_dir`` resumes at, or None if there is no backup."""
    path = Path(backup_dir) / "training_metadata.json"
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (ValueError, KeyError, TypeError):
        return None
