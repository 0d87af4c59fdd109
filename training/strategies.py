"""tf.distribute strategies by name, for `remap train --strategy`.

Batch sizes in this project are per replica: the dataset is built with
``classes_per_batch * num_replicas`` classes per global batch, and Keras splits each global
batch into one slice per replica (see `training.fit`).
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from remap_tf.checks import check_choice
from remap_tf.errors import InvalidInputError
from remap_tf.training import keras_compat
from remap_tf.training.config import STRATEGIES


def make_strategy(name: str = "default", devices=None, tpu: str | None = None):
    """Builds a ``tf.distribute.Strategy``.

    Args:
        name: ``"default"`` (TensorFlow's default strategy: one device, no distribution),
            ``"one_device"`` (``OneDeviceStrategy`` on ``devices[0]``, default the first GPU
            or the CPU), ``"mirrored"`` (``MirroredStrategy`` over ``devices``, default all
            local GPUs, or the CPU), ``"multi_worker"`` (``MultiWorkerMirroredStrategy``;
            the cluster comes from the ``TF_CONFIG`` environment variable) or ``"tpu"``
            (``TPUStrategy`` through ``TPUClusterResolver(tpu)``; not tested in this project,
            no TPU was at hand).
        devices: device strings for ``one_device``/``mirrored``, e.g. ``["/cpu:0", "/cpu:1"]``.
        tpu: TPU name or address for ``TPUClusterResolver`` (None: from the environment).

    Returns:
        the strategy. Keras models must be built and compiled inside ``strategy.scope()``.

    Raises:
        ValueError: unknown name, devices given where they make no sense, or a
            ``multi_worker`` run without a usable ``TF_CONFIG``.
    """
    check_choice("strategy", name, STRATEGIES)
    if devices is not None and name not in ("one_device", "mirrored"):
        raise InvalidInputError(f"`devices` only applies to one_device and mirrored, not {name!r}.")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        if devices is not None and len(devices) != 1:
            raise InvalidInputError(f"one_device takes exactly one device, received {devices!r}.")
        device = devices[0] if devices else _first_device(tf)
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=list(devices) if devices else None)
    if name == "multi_worker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        keras_compat.apply()  # keras-team/keras#20585
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _first_device(tf) -> str:
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else "/cpu:0"


def check_tf_config(text: str | None) -> dict:
    """Parses ``TF_CONFIG`` for a multi-worker run; ValueError naming what is wrong.

    A missing ``TF_CONFIG`` is allowed (MultiWorkerMirroredStrategy then runs as one
    worker); returns ``{}`` in that case.
    """
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"TF_CONFIG is not valid JSON ({error}): {text[:200]!r}") from error
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        raise InvalidInputError(f"TF_CONFIG has no 'cluster' mapping: {text[:200]!r}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise InvalidInputError(f"TF_CONFIG has no 'task' with 'type' and 'index': {text[:200]!r}")
    members = cluster.get(task["type"])
    if not isinstance(members, list) or not 0 <= int(task["index"]) < len(members):
        raise InvalidInputError(
            f"TF_CONFIG task {task!r} is not in the cluster {sorted(cluster)}: {text[:200]!r}"
        )
    return config


def is_chief(strategy=None) -> bool:
    """Whether this process should write shared outputs (model.keras, config, TensorBoard).

    True outside multi-worker runs; under MultiWorkerMirroredStrategy, True on the chief
    (``task_type`` "chief", or worker 0 when there is no chief).
    """
    if strategy is None:
        return True
    resolver = getattr(strategy, "cluster_resolver", None)
    extended = getattr(strategy, "extended", None)
    if resolver is None or not getattr(extended, "_in_multi_worker_mode", lambda: False)():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in cluster
