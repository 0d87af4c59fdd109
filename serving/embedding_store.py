"""Resumable embedding of an image collection into descriptor shards on disk.

``embed_collection`` runs an embedder (anything with ``.embed(list of paths) -> (n, dim)``
and ``.dim``, e.g. ``remap_tf.serving.client.make_embedder(...)``) over a list of images in fixed
shards of ``shard_size`` images. Each finished shard is written atomically as
``shard-00000.npy`` (float32 ``(num_embedded, dim)`` rows, ``allow_pickle=False``) and then
``shard-00000.json`` (the images it holds, in row order, and the ones it skipped), the JSON
being the shard's commit mark. A crash or Ctrl-C loses at most the shard in progress: the
next run with the same image list and ``out_dir`` skips every committed shard.

Unreadable images (missing, undecodable, rejected by the model) are skipped, recorded with
the reason, and listed in the result; they never stop the run.

Layout of ``out_dir``::

    store.json          {"format_version", "dim", "shard_size", "num_images", "images_sha256"}
    shard-00000.npy     (n_0, dim) float32
    shard-00000.json    {"images": [...], "skipped": [{"image", "reason"}]}
    ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from remap_tf.errors import FileFormatError, InvalidInputError
from remap_tf.io import atomic_write, atomic_write_json

STORE_VERSION = 1


@dataclasses.dataclass
class EmbeddedCollection:
    """The result of ``embed_collection``.

    Attributes:
        images: (num_embedded,) the images that were embedded, in input order.
        descriptors: (num_embedded, dim) float32 rows matching ``images``.
        skipped: ``[{"image": ..., "reason": ...}]`` for images that could not be embedded.
        resumed_shards: shards found complete on disk and not recomputed.
    """

    images: list[str]
    descriptors: np.ndarray
    skipped: list[dict]
    resumed_shards: int = 0


def _list_sha256(images: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(images).encode("utf-8")).hexdigest()


def embed_skipping(embedder, items: Sequence) -> tuple[list[int], np.ndarray, list[tuple]]:
    """Embeds ``items`` (paths or encoded bytes), leaving out any the embedder cannot read.

    A batch that fails on one image is retried without it: ``remap_tf.serving.client``'s
    ``ImageRejectedError`` names the image's index; other per-image errors (ValueError,
    OSError) fall back to one image at a time. A ``ConnectionError`` (server down) is raised,
    not blamed on the images.

    Returns:
        ``(kept, descriptors, skipped)``: positions of the embedded items (increasing), their
        (len(kept), dim) float32 rows, and ``[(position, reason)]`` of the others.
    """
    dim = int(embedder.dim)
    kept, rows, skipped = [], [], []
    todo = []
    for position, item in enumerate(items):
        if isinstance(item, str | os.PathLike) and not os.path.isfile(item):
            skipped.append((position, "file not found"))
        else:
            todo.append(position)
    while todo:
        try:
            out = np.asarray(embedder.embed([items[p] for p in todo]), dtype=np.float32)
        except (ValueError, OSError) as error:
            if isinstance(error, ConnectionError):
                raise
            index = getattr(error, "index", None)
            if len(todo) == 1:
                skipped.append((todo[0], getattr(error, "reason", None) or str(error)))
                break
            if index is None or not 0 <= index < len(todo):
                for position in todo:  # culprit unknown: one at a time
                    sub_kept, sub_rows, sub_skipped = embed_skipping(embedder, [items[position]])
                    if sub_kept:
                        kept.append(position)
                        rows.append(sub_rows)
                    skipped.extend((position, reason) for _, reason in sub_skipped)
                break
            skipped.append((todo[index], getattr(error, "reason", None) or str(error)))
            if index:
                head = todo[:index]
                sub_kept, sub_rows, sub_skipped = embed_skipping(embedder, [items[p] for p in head])
                kept.extend(head[i] for i in sub_kept)
                rows.append(sub_rows)
                skipped.extend((head[i], reason) for i, reason in sub_skipped)
            todo = todo[index + 1 :]
            continue
        if out.shape != (len(todo), dim):
            raise InvalidInputError(
                f"the embedder returned {out.shape} for {len(todo)} images of dim {dim}"
            )
        kept.extend(todo)
        rows.append(out)
        break
    descriptors = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
    order = np.argsort(kept, kind="stable")
    skipped.sort()
    return [kept[i] for i in order], descriptors[order].astype(np.float32), skipped


def embed_collection(
    embedder,
    images: Sequence[str],
    out_dir,
    shard_size: int = 512,
    batch_size: int = 32,
    progress: bool = True,
) -> EmbeddedCollection:
    """Embeds ``images`` into resumable shards under ``out_dir``.

    Args:
        embedder: ``.embed(list of paths) -> (n, dim)`` float descriptors and ``.dim``.
        images: (num_images,) image paths, in the order of the result.
        out_dir: the shard folder (created; reused to resume).
        shard_size: images per shard (the most work a crash can lose).
        batch_size: images per ``embed`` call.
        progress: show a ``keras.utils.Progbar``.

    Returns:
        An ``EmbeddedCollection`` (descriptors of every readable image, and the skipped ones).

    Raises:
        ValueError: ``out_dir`` holds shards of a different image list, shard size or
            descriptor dimension (use another folder or delete it).
    """
    images = [str(i) for i in images]
    if len(set(images)) != len(images):
        raise InvalidInputError("the image list contains duplicates")
    if shard_size < 1 or batch_size < 1:
        raise InvalidInputError(
            f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}"
        )
    out_dir = Path(out_dir)
    dim = int(embedder.dim)
    _open_store(out_dir, dim, shard_size, images)
    bar = keras.utils.Progbar(len(images), unit_name="image") if progress and images else None
    all_images, all_rows, all_skipped, resumed = [], [], [], 0
    for shard, start in enumerate(range(0, len(images), shard_size)):
        chunk = images[start : start + shard_size]
        npy = out_dir / f"shard-{shard:05d}.npy"
        meta = out_dir / f"shard-{shard:05d}.json"
        loaded = _read_shard(npy, meta, chunk, dim)
        if loaded is not None:
            done, rows, skipped = loaded
            resumed += 1
        else:
            done, rows, skipped = _embed_shard(embedder, chunk, dim, batch_size, bar, start)
            atomic_write(npy, lambda h, rows=rows: np.save(h, rows, allow_pickle=False))
            atomic_write_json(meta, {"images": done, "skipped": skipped}, indent=1)
        if bar is not None:
            bar.update(start + len(chunk))
        all_images.extend(done)
        all_rows.append(rows)
        all_skipped.extend(skipped)
    descriptors = np.concatenate(all_rows) if all_rows else np.zeros((0, dim), np.float32)
    return EmbeddedCollection(all_images, descriptors, all_skipped, resumed)


def _open_store(out_dir: Path, dim: int, shard_size: int, images: list[str]) -> None:
    """Creates ``store.json``, or checks that the one there describes the same run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {
        "format_version": STORE_VERSION,
        "dim": dim,
        "shard_size": int(shard_size),
        "num_images": len(images),
        "images_sha256": _list_sha256(images),
    }
    store_file = out_dir / "store.json"
    if not store_file.is_file():
        atomic_write_json(store_file, header, indent=1)
        return
    try:
        existing = json.loads(store_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise FileFormatError(f"{store_file} is not valid JSON ({error})") from None
    if existing != header:
        changed = sorted(k for k in header if existing.get(k) != header[k])
        raise InvalidInputError(
            f"{out_dir} holds embeddings of another run (different {', '.join(changed)}); "
            "use another folder or delete it to start over"
        )


def _embed_shard(embedder, chunk: list[str], dim: int, batch_size: int, bar, offset: int):
    """``(embedded images, rows (n, dim), skipped)`` of one shard, batch by batch."""
    done, row_list, skipped = [], [], []
    for start in range(0, len(chunk), batch_size):
        part = chunk[start : start + batch_size]
        part_kept, part_rows, part_skipped = embed_skipping(embedder, part)
        done.extend(part[i] for i in part_kept)
        row_list.append(part_rows)
        skipped.extend({"image": part[i], "reason": reason} for i, reason in part_skipped)
        if bar is not None:
            bar.update(offset + start + len(part))
    rows = np.concatenate(row_list) if row_list else np.zeros((0, dim), np.float32)
    return done, rows, skipped


def _read_shard(npy: Path, meta: Path, chunk: list[str], dim: int):
    """A committed shard's (images, rows, skipped), or None when it must be (re)computed."""
    if not meta.is_file() or not npy.is_file():
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        rows = np.load(npy, allow_pickle=False)
    except (OSError, ValueError):
        return None
    done, skipped = info.get("images", []), info.get("skipped", [])
    covered = sorted(done + [s["image"] for s in skipped])
    if covered != sorted(chunk) or rows.shape != (len(done), dim):
        return None
    return done, rows.astype(np.float32, copy=False), skipped
