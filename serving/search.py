"""Indexing and searching image collections: the library behind ``remap index`` and ``search``.

Every function takes an *embedder* (anything with ``.embed(images) -> (n, dim)`` and ``.dim``:
`remap_tf.serving.client.make_embedder` gives one for TF Serving or an exported SavedModel),
so they can be used, and tested, without TensorFlow Serving.

Ids are the paths of the images relative to the collection root (the folder given to
`build_index`, or the folder of its manifest), which the index records in its metadata with
the model it was built with.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from remap_tf import outputs
from remap_tf.errors import BadPathError, InvalidInputError
from remap_tf.serving import embeddings
from remap_tf.serving.collection import glob_base, is_glob, list_images
from remap_tf.serving.index import DurableIndex, Index, load_index, make_index, pending_changes
from remap_tf.serving.index.changelog import check_rebuild, save_rebuilt
from remap_tf.serving.index.files import INDEX_COMMAND, claim_index_output
from remap_tf.serving.index.rows import LazyRows
from remap_tf.serving.local_embed import embed_collection, embed_skipping

# Metadata keys an index built here records.
IMAGE_ROOT = "image_root"
MODEL = "model"
MODEL_VERSION = "model_version"  # the version MODEL resolved to at build time
MODEL_PROBE = "model_probe"  # its fingerprint: `remap_tf.serving.client` ``identity``
PROBE_TOLERANCE = 1e-3  # largest difference of a probe component within one model


def _collection(images, model) -> dict:
    """The images of a folder or manifest as a descriptor run records them."""
    paths, ids = list_images(images)
    return {"paths": paths, "ids": ids, "source": Path(images).resolve(), "model": model}


def default_embeddings_dir(out) -> Path:
    """Where ``index build --images`` keeps its descriptors: ``<out>.embeddings`` beside it."""
    out = Path(out)
    return out.parent / f"{out.name}.embeddings"


def check_outputs(out, embeddings_dirs=(), sources=()) -> None:
    """InvalidInputError unless the index folder ``out`` is none of the descriptor folders an
    index build writes (``embeddings_dirs``) or reads (``sources``), nor one at all (a
    folder with ``embed.json``): an index never goes into an embeddings folder."""
    target = Path(out).resolve()
    for flag, folders in (("--embeddings", embeddings_dirs), ("--from-embeddings", sources)):
        for folder in folders:
            if not embeddings.is_remote(folder) and Path(folder).resolve() == target:
                raise InvalidInputError(
                    f"--out {str(out)!r} is also the {flag} folder; an index cannot go into a "
                    "descriptor folder: give another --out"
                )
    marker = outputs.read_marker(out) or {}
    if embeddings.is_embeddings_folder(out) or marker.get("output") == embeddings.EMBEDDINGS_OUTPUT:
        raise InvalidInputError(
            f"--out {str(out)!r} is a descriptor folder (remap embed output); an index cannot "
            "go into it: give another --out"
        )


def build_index(
    embedder,
    images,
    out,
    embeddings_dir=None,
    kind: str = "scann",
    scann_config: dict | None = None,
    shard_size: int = 512,
    batch_size: int = 32,
    progress: bool = True,
    model: str | None = None,
    shards: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Embeds a folder or manifest of images (resumably), then builds an index of them.

    Embed, then build from embeddings: the descriptors go into a descriptor folder
    (`remap_tf.serving.embeddings`, the format ``remap embed`` writes) by
    `remap_tf.serving.local_embed.embed_collection`, and `build_index_from_embeddings` builds
    the index from it.

    Args:
        embedder: ``.embed(list of paths) -> (n, dim)`` and ``.dim``.
        images: an image folder (recursive) or a manifest (.txt / .csv with a path column).
        out: the index directory (written atomically).
        embeddings_dir: the descriptor folder, kept to resume an interrupted run (default
            ``<out>.embeddings`` beside the index).
        kind: "scann" or "exact".
        scann_config: ``remap_tf.serving.index.ScannConfig`` overrides.
        shard_size, batch_size: see `remap_tf.serving.local_embed.embed_collection`.
        progress: show a progress bar.
        model: the model (export folder or TF Serving address), recorded in the index so that
            later searches and additions use the same one.
        shards: split the index into this many shards by id hash, one Beam task each
            (`remap_tf.serving.beam_index`); None: one index.
        overwrite: write the index, and the descriptors, into folders holding other files
            (they are kept, never replaced; see `claim_index_output` and
            `remap_tf.serving.embeddings.claim_output`).

    Both folders are claimed (`remap_tf.outputs`) before any image is embedded.

    Returns:
        ``{"index": path, "count", "dim", "skipped": [{"id", "image", "reason"}], "config",
        "resumed_shards", "num_shards"}``.
    """
    collection = _collection(images, model)
    check_rebuild(out, foldable=shards is None)  # refused before the embedding, not after
    identity = model_metadata(embedder)
    folder = Path(embeddings_dir) if embeddings_dir else default_embeddings_dir(out)
    check_outputs(out, embeddings_dirs=[folder])
    claim_index_output(out, overwrite)
    embedded = embed_collection(
        embedder, collection["paths"], collection["ids"], folder, shard_size=shard_size,
        batch_size=batch_size, progress=progress, source=collection["source"], model=model,
        command=INDEX_COMMAND, overwrite=overwrite,
    )  # fmt: skip
    if not embedded["count"]:
        raise InvalidInputError(
            f"none of the {len(collection['paths'])} images under {images} could be embedded"
        )
    summary = build_index_from_embeddings(
        [folder], out, kind=kind, scann_config=scann_config, shards=shards,
        manifests=[embedded["manifest"]], model_fields=identity, overwrite=overwrite,
    )  # fmt: skip
    return summary | {
        "skipped": embedded["dead"],
        "resumed_shards": len(embedded["skipped_shards"]),
    }


def upgrade_embeddings(embeddings_dir, images, model: str | None = None) -> dict:
    """Converts a descriptor folder of the retired ``store.json`` format (written by ``index
    build --images`` before there was one format) in place; the next ``index build`` with
    the same images and model resumes from it. See
    `remap_tf.serving.embeddings.upgrade_retired`."""
    collection = _collection(images, model)
    result = embeddings.upgrade_retired(
        embeddings_dir, collection["ids"], collection["paths"], source=collection["source"],
        model=model,
    )  # fmt: skip
    # The folder was index build's before markers: claimed for it now, so the next index
    # build resumes it (its embed.json, checked to be the same run, is taken over then).
    outputs.claim(embeddings_dir, INDEX_COMMAND, embeddings.EMBEDDINGS_OUTPUT, overwrite=True)
    return result


def _image_root(source: str | None) -> str | None:
    """Where ids lead back to files: a local folder, a list's folder, a glob's fixed part."""
    if not source or embeddings.is_remote(source):
        return None
    if is_glob(source):
        source = glob_base(source) or "."
    path = Path(source).resolve()
    return str(path if path.is_dir() else path.parent)


def build_index_from_embeddings(
    folders,
    out,
    kind: str = "scann",
    scann_config: dict | None = None,
    shards: int | None = None,
    memory_budget: int | None = None,
    workers: int = 1,
    beam_args=(),
    manifests=None,
    model_fields: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Builds an index of descriptor folders (`remap_tf.serving.embeddings`): one index, or
    sharded (``shards`` or a ``memory_budget`` in bytes per shard build) with one Beam task
    per shard.

    The index records the model and image root of the (first) folder, and ``model_fields``
    (`model_metadata`: the model's version and fingerprint) when the caller has them.
    ``manifests``: the folders' manifests when the caller has them (each is read once per
    command). ``overwrite``: ``out`` may hold other files (kept; `claim_index_output`); it may
    never be a descriptor folder (`check_outputs`).

    A rebuild over an index with a change log beside it (changes a ``remap serve``
    acknowledged) folds them in (`remap_tf.serving.index.changelog.save_rebuilt`); a sharded
    one refuses instead.

    Returns:
        ``{"index", "count", "dim", "config", "num_shards", "folded_changes"}`` (num_shards
        None: one index; folded_changes only then).
    """
    folders = [str(f) for f in ([folders] if isinstance(folders, str | os.PathLike) else folders)]
    check_outputs(out, sources=folders)
    claim_index_output(out, overwrite)
    manifests = manifests or [embeddings.read_manifest(f) for f in folders]
    first = manifests[0]
    metadata = {
        "images": first.get("source"),
        IMAGE_ROOT: _image_root(first.get("source")),
        MODEL: first.get("model"),
        "embeddings": [str(Path(f).resolve()) for f in folders],
        "skipped": sum(m["dead"] for m in manifests),
    } | (model_fields or {})
    sharded = shards is not None or memory_budget is not None
    check_rebuild(out, foldable=not sharded)  # before the work: a service's changes are kept
    if sharded:
        from remap_tf.serving.beam_index import build_sharded_index  # Beam loads only here

        return build_sharded_index(
            folders, out, num_shards=shards, memory_budget=memory_budget, kind=kind,
            scann_config=scann_config, workers=workers, beam_args=beam_args, metadata=metadata,
            manifests=manifests,
        )  # fmt: skip
    # Streamed: a ScaNN build reads the shards one at a time (`ScannIndex.build`).
    ids, readers, info = embeddings.shard_readers(folders, manifests)
    index = make_index(kind, info["dim"], **(scann_config or {}))
    index.add_lazily(ids, [LazyRows(count, read, name) for name, count, read in readers])
    index.metadata = metadata
    # Keeps the changes a `remap serve` logged beside it.
    folded = save_rebuilt(index, out, same_model=_same_recorded_model)
    return {
        "index": str(out),
        "count": len(index),
        "dim": index.dim,
        "config": index.config,
        "num_shards": None,
        "folded_changes": folded,
    }


def image_path(index: Index, image_id: str) -> str:
    """The file of an indexed image: its id under the index's recorded image root."""
    root = index.metadata.get(IMAGE_ROOT)
    if root is None or os.path.isabs(image_id):
        return image_id
    return str(Path(root) / image_id)


def image_id(index: Index, path) -> str:
    """The id an image file gets in ``index``: its path relative to the image root.

    Raises:
        InvalidInputError: the file is outside the index's image root (its id would not
            lead back to it).
    """
    root = index.metadata.get(IMAGE_ROOT)
    resolved = Path(path).resolve()
    if root is None:
        return str(resolved)
    try:
        return resolved.relative_to(Path(root)).as_posix()
    except ValueError:
        raise InvalidInputError(
            f"{str(path)!r} is outside the collection root {root!r} of this index; copy it "
            "there first, so that its id leads back to the file"
        ) from None


def recorded_model(index: Index) -> str | None:
    """The model an index was built with (an export folder or a TF Serving address)."""
    return index.metadata.get(MODEL)


def model_metadata(embedder) -> dict:
    """What an index records of the model it is built with, beside `MODEL`: the version
    (`MODEL_VERSION`) and fingerprint (`MODEL_PROBE`) from the embedder's ``identity``
    (`remap_tf.serving.client`; one model call); ``{}`` for an embedder without one."""
    identity = getattr(embedder, "identity", None)
    if identity is None:
        return {}
    version, probe = identity()
    return {MODEL_VERSION: version, MODEL_PROBE: probe}


def check_embedder(index: Index, embedder) -> None:
    """InvalidInputError unless the embedder's descriptors fit the index: their size, and,
    when the index recorded the model's fingerprint (`model_metadata`), that the model gives
    the descriptors the index was built with (one model call). Older indexes, which record
    no fingerprint, are checked by size only."""
    if int(embedder.dim) != index.dim:
        raise InvalidInputError(
            f"the model gives {embedder.dim}-d descriptors but the index holds {index.dim}-d "
            "ones; use the model the index was built with"
        )
    recorded = index.metadata.get(MODEL_PROBE)
    if recorded is None or getattr(embedder, "identity", None) is None:
        return
    version, probe = embedder.identity()
    if same_model(recorded, probe):
        return
    raise InvalidInputError(_other_model(index, embedder.describe(), version))


def _same_recorded_model(old: dict, new: dict) -> bool:
    """Whether two indexes' metadata name the same model (True when either has no
    fingerprint: nothing tells them apart)."""
    a, b = old.get(MODEL_PROBE), new.get(MODEL_PROBE)
    return a is None or b is None or same_model(a, b)


def same_model(recorded, probe) -> bool:
    """Whether two fingerprints (`MODEL_PROBE`) name models with the same descriptors."""
    a, b = np.asarray(recorded, np.float64), np.asarray(probe, np.float64)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= PROBE_TOLERANCE))


def _other_model(index: Index, now: str, version: int | None) -> str:
    """The one line `check_embedder` refuses another model with, and how to go on."""
    built, old = index.metadata.get(MODEL) or "another model", index.metadata.get(MODEL_VERSION)
    was = f"{built} version {old}" if old is not None else built
    serves = (
        f"{now} now serves version {version}, whose descriptors differ"
        if version is not None
        else f"{now} gives other descriptors"
    )
    if old is None:
        fix = "pass the model it was built with"
    elif embeddings.is_remote(built) or not os.path.isdir(built):
        fix = f"serve version {old} again"  # a TF Serving address
    else:
        fix = f"pass --model {built if Path(built).name == str(old) else f'{built}/{old}'}"
    return f"the index was built with {was}; {serves}: rebuild the index or {fix}"


def add_images(index_dir, embedder, paths) -> dict:
    """Embeds image files and adds them to a saved index under their ids, then saves it.

    Args:
        index_dir: a directory written by `build_index`.
        embedder: the model the index was built with.
        paths: image files under the index's image root.

    Returns:
        ``{"added": [ids], "skipped": [{"image", "reason"}], "count": size after}``.

    Raises:
        InvalidInputError: an image outside the image root, or an id already indexed.
        remap_tf.serving.index.changelog.LogInUseError: a `remap serve` has the index open.
    """
    with DurableIndex.open(index_dir) as store:  # folds in changes a service logged
        index = store.index
        check_embedder(index, embedder)
        paths = [str(p) for p in paths]
        ids = [image_id(index, p) for p in paths]
        present = [i for i in ids if i in index]
        if present:
            raise InvalidInputError(
                f"already in the index (delete them first): {', '.join(present[:5])}"
            )
        kept, descriptors, skipped = embed_skipping(embedder, paths)
        if kept:
            index.add([ids[i] for i in kept], descriptors)
            store.compact()
    return {
        "added": [ids[i] for i in kept],
        "skipped": [{"image": paths[i], "reason": reason} for i, reason in skipped],
        "count": len(index),
    }


def delete_images(index_dir, ids) -> dict:
    """Removes ids from a saved index, then saves it. ``{"deleted": [ids], "count"}``."""
    ids = list(ids)
    with DurableIndex.open(index_dir) as store:  # folds in changes a service logged
        store.index.delete(ids)
        store.compact()
        return {"deleted": ids, "count": len(store)}


def index_info(index_dir) -> dict:
    """What a saved index holds: kind, size, configuration, metadata, bytes on disk, and the
    changes logged beside it that are not in it yet."""
    index = load_index(index_dir)
    directory = Path(index_dir)
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return {
        "index": str(directory),
        "kind": index.kind,
        "count": len(index),
        "dim": index.dim,
        "config": index.config,
        "metadata": dict(index.metadata),
        "bytes": size,
        # Changes a `remap serve` logged that the snapshot does not hold yet (count and
        # configuration above are the snapshot's); `remap index compact` folds them in.
        "pending_changes": pending_changes(index_dir, index),
    }


def search_images(index: Index, embedder, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Embeds query images and searches the index.

    Args:
        index: a `remap_tf.serving.index.Index`.
        embedder: the model the index was built with.
        queries: (num_queries,) image paths or encoded bytes.
        k: results per query.

    Returns:
        ``(ids, scores)`` as ``Index.search``: (num_queries, k) each.
    """
    check_embedder(index, embedder)
    missing = [q for q in queries if isinstance(q, str | Path) and not os.path.isfile(q)]
    if missing:
        raise BadPathError(f"query image(s) not found: {', '.join(map(str, missing))}")
    descriptors = np.asarray(embedder.embed(list(queries)), dtype=np.float32)
    return index.search(descriptors, k=k)
