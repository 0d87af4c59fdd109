"""Embedding an image collection in this process, resumably: ``remap index build --images``.

`embed_collection` runs an embedder (anything with ``.embed(list of paths) -> (n, dim)`` and
``.dim``, e.g. `remap_tf.serving.client.make_embedder`) over the images shard by shard and
writes the one descriptor format, `remap_tf.serving.embeddings` (the same folders ``remap
embed`` writes on Beam): each finished shard is committed with `embeddings.write_shard`, so a
crash or Ctrl-C loses at most the shard in progress, and a rerun with the same images and
folder skips every shard whose commit record is complete. Unreadable images (missing,
undecodable, rejected by the model) go to the dead letters with the reason; they never stop
the run. `embeddings.finalize` then writes the checksummed manifest.

`embed_skipping` is the per-batch step, shared with Beam's model handler, ``index add`` and
``evaluate``'s queries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np

from remap_tf.errors import InvalidInputError
from remap_tf.serving import embeddings


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
    paths: Sequence[str],
    ids: Sequence[str],
    out,
    shard_size: int = 512,
    batch_size: int = 32,
    progress: bool = True,
    source=None,
    model=None,
    command: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Embeds images into the descriptor folder ``out``, resuming a run stopped there.

    Args:
        embedder: ``.embed(list of paths) -> (n, dim)`` float descriptors and ``.dim``.
        paths: ``(num_images,)`` image files.
        ids: ``(num_images,)`` their unique ids, recorded with the rows.
        out: the descriptor folder (created; reused to resume).
        shard_size: images per shard (the most work a crash can lose).
        batch_size: images per ``embed`` call.
        progress: show a ``keras.utils.Progbar``.
        source, model: recorded in ``embed.json`` (a rerun must give the same model).
        command: claim ``out`` for ``remap <command>`` first (`embeddings.claim_output`;
            None: the caller claimed it, or it is a scratch folder).
        overwrite: take a folder holding other files (they are kept, never replaced).

    Returns:
        ``{"out", "count", "dim", "dead": [{"id", "image", "reason"}], "shards",
        "embedded_shards": [numbers run now], "skipped_shards": [finished before],
        "manifest"}``, as `remap_tf.serving.beam_embed.embed_images`.

    Raises:
        InvalidInputError: ``out`` holds another run (other images, shard size or model).
        FileFormatError: ``out`` is a folder of the retired format (how to convert it).
        OutputExistsError: ``out`` holds files remap did not write (see
            `embeddings.check_output`).
    """
    if batch_size < 1:
        raise InvalidInputError(f"the batch size must be >= 1, got {batch_size}")
    out = str(out)
    if command is not None:
        embeddings.claim_output(out, command, overwrite)
    run = embeddings.plan_run(out, ids, paths, shard_size, source=source, model=model)
    size = run["num_images"]
    bar = keras.utils.Progbar(size, unit_name="image") if progress and size else None
    done, pending = [], []
    for shard in range(run["num_shards"]):
        (done if embeddings.shard_complete(out, shard) else pending).append(shard)
    for shard in range(run["num_shards"]):
        start = shard * run["shard_size"]
        if shard in pending:
            plan = embeddings.read_plan(out, shard)
            _embed_shard(embedder, out, shard, plan, batch_size, bar, start)
        if bar is not None:
            bar.update(min(size, start + run["shard_size"]))
    return embeddings.finish_run(out, run, pending, done)


def _embed_shard(embedder, out: str, shard: int, plan: list, batch_size: int, bar, offset: int):
    """Embeds one shard's ``[[id, path], ...]`` batch by batch and commits it."""
    kept_ids, row_list, dead = [], [], []
    for start in range(0, len(plan), batch_size):
        part = plan[start : start + batch_size]
        kept, rows, skipped = embed_skipping(embedder, [path for _, path in part])
        kept_ids.extend(part[i][0] for i in kept)
        row_list.append(rows)
        dead.extend({"id": part[i][0], "image": part[i][1], "reason": r} for i, r in skipped)
        if bar is not None:
            bar.update(offset + start + len(part))
    rows = np.concatenate(row_list) if kept_ids else np.zeros((0, 0), np.float32)
    embeddings.write_shard(out, shard, kept_ids, rows, dead)
