"""Embedding an image collection on Apache Beam: ``remap embed``.

The pipeline, for the shards not finished yet (a rerun skips finished ones)::

    Create(shard numbers) -> expand each to its images (lists/shard-N.json)
      -> Reshuffle (spread the images over workers)
      -> ReadImage: bytes through Beam's FileSystems (local, gs://, s3://, hdfs://...);
                    unreadable / empty files -> dead letters
      -> RunInference(KeyedModelHandler(RemapModelHandler)): batches of encoded images
                    through the exported ``serving_default`` signature, which decodes and
                    guards them exactly as TF Serving would (format check, pixel limit);
                    a rejected image -> dead letter with the model's reason
      -> GroupByKey(shard) -> WriteShard: .npy + ids + commit record per shard

then, on the launching machine, `remap_tf.serving.embeddings.finalize` writes
``dead_letter.jsonl`` and the checksummed ``manifest.json``.

`RemapModelHandler` is the project's own ``ModelHandler``: Beam's stock TensorFlow handler
loads through ``tf.keras.models.load_model``, which cannot read Keras 3 exports
(apache/beam#30616), so this one loads with ``tf.saved_model.load`` (through
`remap_tf.serving.client.make_embedder`, which also accepts a TF Serving address). Beam keeps
the loaded model in a ``shared.Shared`` handle, which needs an object that takes a weak
reference: the embedder object, never a tuple.

Runner: by default Beam's in-process Python runner, chosen explicitly (``FnApiRunner``; with
``workers > 1`` it starts that many SDK worker processes), so nothing tries to download a
runner binary (plain ``DirectRunner`` first tries the Prism binary). Any other runner comes
from Beam's standard options (``--runner=DataflowRunner --project ... --region ...``);
docs/search.md has the command lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)
from apache_beam.options.pipeline_options import PipelineOptions

from remap_tf.contract import IMAGE_EXTENSIONS
from remap_tf.errors import BadPathError, InvalidInputError
from remap_tf.serving import embeddings
from remap_tf.serving.collection import glob_base, is_glob, list_images
from remap_tf.serving.local_embed import embed_skipping

MAX_IMAGE_BYTES = 256 * 1024 * 1024  # larger files go to the dead letters unread


# --- the image list --------------------------------------------------------------------------


def list_sources(source: str) -> tuple[list[str], list[str]]:
    """``(paths, ids)`` of a folder, a glob or a list file, local or on any Beam filesystem.

    - a local folder or a local ``.txt`` / ``.csv`` list: as `collection.list_images`
      (ids relative to the folder, or as written in the list);
    - a glob (``photos/**.jpg``, ``gs://bucket/photos/*/*.png``): ids relative to the folder
      before the first wildcard;
    - a folder or list file on another filesystem (``gs://bucket/photos``).
    """
    source = str(source)
    if is_glob(source):
        paths = _match(source)
        if not paths:
            raise BadPathError(f"the pattern {source} matches no files")
        base = glob_base(source)
        return paths, [p[len(base) :].lstrip("/") for p in paths]
    if not embeddings.is_remote(source):
        return list_images(source)
    if source.lower().endswith((".txt", ".lst")):
        text = embeddings.read_bytes(source).decode("utf-8")
        entries = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]
        base = source.rpartition("/")[0]
        paths = [e if embeddings.is_remote(e) else f"{base}/{e}" for e in entries]
        return paths, entries
    folder = source.rstrip("/")
    paths = [p for p in _match(folder + "/**") if p.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        raise BadPathError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {source}")
    return paths, [p[len(folder) + 1 :] for p in paths]


def _match(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


# --- the model handler -----------------------------------------------------------------------


class RemapModelHandler(ModelHandler):
    """RunInference on an exported REMAP model: encoded image bytes in, descriptors out.

    Args:
        model: an export folder (``models/remap``, its highest version; a ``gs://``-style
            folder is copied to a local temporary folder first) or ``host:port[/name]`` of
            TF Serving.
        batch_size: images per inference call (Beam batches up to this many).
        threads: TensorFlow intra-op threads per worker process (None: TensorFlow's default,
            all cores); cores / workers when several local workers share a machine.

    ``run_inference`` returns one ``PredictionResult`` per image whose ``inference`` is the
    ``(dim,)`` float32 descriptor, or a string: why the model rejected the image.
    """

    def __init__(self, model: str, batch_size: int = 16, threads: int | None = None):
        super().__init__()
        self._model = str(model)
        self._batch_size = int(batch_size)
        self._threads = threads

    def load_model(self):
        import tensorflow as tf

        from remap_tf.serving.client import make_embedder

        if self._threads:
            # Intra-op only: the signature's map_fn runs images concurrently on inter-op
            # threads, and one inter-op thread made a worker ~1.5x slower (measured).
            with contextlib.suppress(RuntimeError):  # TensorFlow already started here
                tf.config.threading.set_intra_op_parallelism_threads(self._threads)
        model = _local_copy(self._model) if embeddings.is_remote(self._model) else self._model
        return make_embedder(model, chunk_size=self._batch_size)

    def run_inference(self, batch: Sequence[bytes], model, inference_args=None):
        kept, rows, skipped = embed_skipping(model, list(batch))
        out: list = [None] * len(batch)
        for position, row in zip(kept, rows, strict=True):
            out[position] = row
        for position, reason in skipped:
            out[position] = str(reason)
        return [PredictionResult(x, y) for x, y in zip(batch, out, strict=True)]

    def get_num_bytes(self, batch) -> int:
        return sum(len(x) for x in batch)

    def get_metrics_namespace(self) -> str:
        return "remap_embed"

    def batch_elements_kwargs(self):
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}


def _local_copy(model: str) -> str:
    """Copies an export folder on another filesystem (all its versions' files) to a local
    temporary folder, once per process and model; returns the local folder."""
    target = Path(tempfile.gettempdir()) / (
        "remap-model-" + hashlib.sha256(model.encode()).hexdigest()[:16]
    )
    if (target / ".complete").is_file():
        return str(target)
    base = model.rstrip("/")
    for path in _match(base + "/**"):
        local = target / path[len(base) + 1 :]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(embeddings.read_bytes(path))
    (target / ".complete").write_text("")
    return str(target)


# --- the pipeline ----------------------------------------------------------------------------


def _expand(shard: int, out: str):
    """The ((shard, row, id), path) elements of one shard, from its plan file."""
    for row, (image_id, path) in enumerate(embeddings.read_plan(out, shard)):
        yield (shard, row, image_id), path


class ReadImage(beam.DoFn):
    """``(key, path)`` -> ``(key, bytes)``; unreadable or empty files to the ``dead`` output."""

    def process(self, element):
        key, path = element
        try:
            size = embeddings.size_of(path)
            if size is None:
                raise FileNotFoundError("file not found")
            if size > MAX_IMAGE_BYTES:
                raise ValueError(f"{size} bytes is over the {MAX_IMAGE_BYTES}-byte limit")
            data = embeddings.read_bytes(path)
            if not data:
                raise ValueError("empty file")
        except Exception as error:  # any filesystem's error is this image's problem
            yield beam.pvalue.TaggedOutput("dead", (key, f"unreadable: {error}"))
            return
        yield key, data


def _as_row(element):
    """``((shard, row, id), PredictionResult)`` -> ``(shard, (row, id, descriptor|reason))``."""
    (shard, row, image_id), result = element
    return shard, (row, image_id, result.inference)


class WriteShard(beam.DoFn):
    """``(shard, [(row, id, descriptor or reason)])`` -> writes the shard; yields its number."""

    def __init__(self, out: str):
        self._out = out

    def process(self, element):
        shard, items = element
        plan = embeddings.read_plan(self._out, shard)
        items = sorted(items, key=lambda item: item[0])
        good = [(i, x) for _, i, x in items if not isinstance(x, str)]
        dead = [
            {"id": i, "image": plan[row][1], "reason": x}
            for row, i, x in items
            if isinstance(x, str)
        ]
        rows = np.stack([x for _, x in good]) if good else np.zeros((0, 0), np.float32)
        embeddings.write_shard(self._out, shard, [i for i, _ in good], rows, dead)
        yield shard


def runs_locally(beam_args: Sequence[str]) -> bool:
    """True unless the Beam options name a runner (then the pipeline runs elsewhere)."""
    return not any(a == "--runner" or a.startswith("--runner=") for a in beam_args)


def pipeline_options(beam_args: Sequence[str] = (), workers: int = 1) -> PipelineOptions:
    """Beam options: ``beam_args`` as given when they name a runner, else the in-process
    ``FnApiRunner`` with ``workers`` worker processes (in memory for 1)."""
    args = list(beam_args)
    if runs_locally(args):
        mode = "multi_processing" if workers > 1 else "in_memory"
        args += [
            "--runner=FnApiRunner",
            f"--direct_num_workers={workers}",
            f"--direct_running_mode={mode}",
        ]
    return PipelineOptions(args)


def build_pipeline(pipeline, out: str, pending: Sequence[int], handler: RemapModelHandler):
    """Adds the embedding stages for the ``pending`` shards to ``pipeline``."""
    read = (
        pipeline
        | "Shards" >> beam.Create(list(pending))
        | "Images" >> beam.FlatMap(_expand, out=out)
        | "Spread" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(ReadImage()).with_outputs("dead", main="ok")
    )
    embedded = (
        read.ok
        | "Embed" >> RunInference(KeyedModelHandler(handler))
        | "ByShard" >> beam.Map(_as_row)
    )
    dead = read.dead | "DeadByShard" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[0][2], kv[1])))
    return (
        (embedded, dead)
        | "Merge" >> beam.Flatten()
        | "Group" >> beam.GroupByKey()
        | "Write" >> beam.ParDo(WriteShard(out))
    )


def _plan(source, model, out: str, shard_size: int) -> dict:
    """Lists the images, checks or writes ``embed.json`` and the per-shard lists."""
    paths, ids = list_sources(source)
    return embeddings.plan_run(out, ids, paths, shard_size, source=source, model=model)


def embed_images(
    source,
    model: str,
    out,
    shard_size: int = 1000,
    batch_size: int = 16,
    workers: int = 1,
    threads: int | None = None,
    beam_args: Sequence[str] = (),
    command: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Embeds a folder, glob or list of images with Beam into ``out`` (see the module doc).

    Args:
        source: a folder, a glob or a .txt/.csv list (local or on a Beam filesystem).
        model: an export folder or ``host:port[/name]`` of TF Serving.
        out: the output folder (local or on a Beam filesystem); reused to resume.
        shard_size: images per output shard (the unit a rerun skips or redoes).
        batch_size: images per inference call.
        workers: worker processes of the local runner (ignored when ``beam_args`` name a
            runner).
        threads: TensorFlow threads per worker (default: cores / workers locally).
        beam_args: Beam pipeline options (``--runner=DataflowRunner``, ``--project``, ...).
        command: claim a local ``out`` for ``remap <command>`` first
            (`embeddings.claim_output`; None: the caller's folder as it is).
        overwrite: take a folder holding other files (they are kept, never replaced).

    Returns:
        ``{"out", "count", "dim", "dead": [{"id", "image", "reason"}], "shards",
        "embedded_shards": [numbers run now], "skipped_shards": [finished before],
        "manifest"}``.
    """
    if shard_size < 1 or batch_size < 1 or workers < 1:
        raise InvalidInputError("shard_size, batch_size and workers must be >= 1")
    out = str(out) if embeddings.is_remote(out) else str(Path(out).resolve())
    if not embeddings.is_remote(model) and ":" not in model and not os.path.exists(model):
        raise BadPathError(f"--model {model} is neither an export folder nor host:port[/name]")
    if command is not None:
        embeddings.claim_output(out, command, overwrite)
    run = _plan(source, model, out, shard_size)
    done = [s for s in range(run["num_shards"]) if embeddings.shard_complete(out, s)]
    pending = sorted(set(range(run["num_shards"])) - set(done))
    if pending:
        if threads is None and runs_locally(beam_args) and workers > 1:
            threads = max(1, (os.cpu_count() or 1) // workers)
        handler = RemapModelHandler(run["model"], batch_size, threads)
        with beam.Pipeline(options=pipeline_options(beam_args, workers)) as pipeline:
            build_pipeline(pipeline, out, pending, handler)
    return embeddings.finish_run(out, run, pending, done)
