"""Retrieval quality of a model on a benchmark: the library behind ``remap evaluate``.

`evaluate_retrieval` embeds a `remap_tf.datasets.RetrievalDataset` (revisited Oxford/Paris,
Holidays, UKBench, class folders, groups) with any embedder, ranks the database exhaustively
and scores every protocol with `remap_tf.evaluation`; `metrics_table`, `metrics_json` and
`write_evaluation_report` present the result.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from remap_tf import evaluation
from remap_tf.datasets import query_image
from remap_tf.errors import InvalidInputError
from remap_tf.evaluation import DEFAULT_KAPPAS
from remap_tf.serving import embeddings
from remap_tf.serving.local_embed import embed_collection, embed_skipping
from remap_tf.serving.report import write_report


def evaluate_retrieval(
    embedder,
    dataset,
    kappas=DEFAULT_KAPPAS,
    query_expansion: int = 0,
    qe_alpha: float = 3.0,
    database_augmentation: int = 0,
    dba_alpha: float = 3.0,
    embeddings_dir=None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """mAP and mP@k of a model on a retrieval dataset, per protocol.

    The database is embedded (resumably, into ``embeddings_dir`` when given), queries are
    cropped to their box where the dataset has one, the database is ranked exhaustively by
    dot product, optionally after database-side augmentation (DBA) and α query expansion
    (αQE; Radenović, Tolias & Chum, TPAMI 2018). Database images that cannot be read are
    never retrieved (a positive among them counts as missed); queries that cannot be read
    are left out and counted in ``skipped_queries``.

    Args:
        embedder: ``.embed(images) -> (n, dim)``, ``.dim``.
        dataset: a ``remap_tf.datasets.RetrievalDataset``.
        kappas: k values of mP@k.
        query_expansion: αQE neighbours (0 = off); ``qe_alpha`` its exponent.
        database_augmentation: DBA neighbours (0 = off); ``dba_alpha`` its exponent.
        embeddings_dir: keep the database descriptor shards here (resumable).
        batch_size: images per embed call.
        progress: show progress bars.

    Returns:
        ``{"protocols": {name: {"mAP", "mP@k"..., "num_queries", "num_skipped", "ap"}},
        "rankings": (num_evaluated_queries, num_database) int, "query_index": the dataset
        indices of the evaluated queries, "skipped_database": [...], "skipped_queries": [...]}``.
    """
    database, db_rows, skipped_database = _embed_database(
        embedder, dataset, embeddings_dir, batch_size, progress
    )
    queries, kept, skipped_queries = _embed_queries(embedder, dataset, batch_size)
    if database_augmentation:
        database = evaluation.database_augmentation(database, database_augmentation, dba_alpha)
    if query_expansion:
        queries = evaluation.alpha_query_expansion(queries, database, query_expansion, qe_alpha)
    rankings = db_rows[evaluation.rank_database(queries, database)]
    protocols = {}
    for protocol in dataset.protocols:
        positives = [dataset.queries[i].groundtruth[protocol][0] for i in kept]
        junk = [dataset.queries[i].groundtruth[protocol][1] for i in kept]
        protocols[protocol] = evaluation.mean_average_precision(rankings, positives, junk, kappas)
    return {
        "protocols": protocols,
        "rankings": rankings,
        "query_index": kept,
        "skipped_database": skipped_database,
        "skipped_queries": skipped_queries,
    }


def _embed_database(embedder, dataset, embeddings_dir, batch_size: int, progress: bool):
    """``(descriptors, dataset rows of the descriptors, skipped)`` of the database images,
    through a descriptor folder (`remap_tf.serving.embeddings`; ids are the image paths)."""
    paths = [str(p) for p in dataset.database]
    with tempfile.TemporaryDirectory(prefix="remap-eval-") as scratch:
        folder = embeddings_dir or scratch
        embedded = embed_collection(
            embedder, paths, paths, folder, batch_size=batch_size, progress=progress
        )
        if not embedded["count"]:
            raise InvalidInputError(
                f"none of the {len(dataset.database)} database images could be embedded"
            )
        ids, descriptors, _ = embeddings.load_embeddings(folder, [embedded["manifest"]])
    position = {p: i for i, p in enumerate(paths)}
    rows = np.array([position[i] for i in ids], dtype=np.int64)
    return descriptors, rows, embedded["dead"]


def _embed_queries(embedder, dataset, batch_size: int):
    """``(descriptors, dataset indices of the embedded queries, skipped)``; queries are
    cropped to their box where the dataset has one."""
    inputs, index, skipped = [], [], []
    for i, query in enumerate(dataset.queries):
        try:
            inputs.append(query_image(query))
            index.append(i)
        except (OSError, ValueError) as error:
            skipped.append({"query": query.path, "reason": str(error)})
    kept, rows = [], []
    for start in range(0, len(inputs), batch_size):
        part_kept, part_rows, part_skipped = embed_skipping(
            embedder, inputs[start : start + batch_size]
        )
        kept.extend(index[start + i] for i in part_kept)
        rows.append(part_rows)
        skipped.extend(
            {"query": dataset.queries[index[start + i]].path, "reason": reason}
            for i, reason in part_skipped
        )
    if not kept:
        raise InvalidInputError(
            f"none of the {len(dataset.queries)} query images could be embedded"
        )
    return np.concatenate(rows), kept, skipped


def metrics_json(protocols: dict) -> dict:
    """The JSON figures: ``{"mAP", "mP@k"..., "num_queries"}``, nested per protocol if several."""

    def clean(result):
        out = {}
        for key, value in result.items():
            if key == "ap":
                continue
            out[key] = None if isinstance(value, float) and math.isnan(value) else value
        return out

    if list(protocols) == ["default"]:
        return clean(protocols["default"])
    return {name: clean(result) for name, result in protocols.items()}


def metrics_table(protocols: dict, kappas=DEFAULT_KAPPAS) -> str:
    """A plain-text table of mAP and mP@k (in %) per protocol."""
    head = ["protocol", "mAP"] + [f"mP@{k}" for k in kappas] + ["queries"]
    lines = ["  ".join(f"{h:>9}" for h in head)]
    for name, result in protocols.items():
        cells = [name, result["mAP"]] + [result[f"mP@{k}"] for k in kappas]
        text = [f"{name:>9}"] + [
            f"{'n/a':>9}" if math.isnan(v) else f"{100 * v:>9.2f}" for v in cells[1:]
        ]
        text.append(f"{result['num_queries']:>9}")
        lines.append("  ".join(text))
    return "\n".join(lines) + "\n(mAP and mP@k in %)"


def write_evaluation_report(path, dataset, result, k: int = 10) -> Path:
    """Top-k of each evaluated query, framed by the first 'medium'/'default' ground truth.

    Results are captioned with their paths relative to the dataset's image folder.
    """
    protocol = "medium" if "medium" in dataset.protocols else dataset.protocols[0]
    names = _short_names(dataset.database)
    queries, results, result_names, relevance, boxes = [], [], [], [], []
    for row, qi in enumerate(result["query_index"]):
        query = dataset.queries[qi]
        positives, junk = (set(v) for v in query.groundtruth[protocol])
        top = [int(i) for i in result["rankings"][row][:k]]
        queries.append(query.path)
        boxes.append(query.box)
        results.append([dataset.database[i] for i in top])
        result_names.append([names[i] for i in top])
        relevance.append([True if i in positives else (None if i in junk else False) for i in top])
    return write_report(
        path,
        queries=queries,
        results=results,
        result_names=result_names,
        relevance=relevance,
        ap=list(result["protocols"][protocol]["ap"]),
        query_boxes=boxes,
        query_names=[dataset.queries[qi].name for qi in result["query_index"]],
        title=f"remap evaluate: {dataset.name} ({protocol})",
    )


def _short_names(paths) -> list[str]:
    """Paths relative to their common folder (``.../jpg/a.jpg`` -> ``a.jpg``)."""
    paths = [str(p) for p in paths]
    if len(paths) < 2:
        return [os.path.basename(p) for p in paths]
    root = os.path.commonpath([os.path.abspath(p) for p in paths])
    return [os.path.relpath(os.path.abspath(p), root) for p in paths]
