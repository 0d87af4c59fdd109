"""What the demo writes: the mAP table, figures, ``report.html`` (+ PNG) and ``results.json``.

The query grid itself is `remap_tf.serving.report.write_report`; this module adds the demo's
sections above it (the table, the training curves, the region weights) and its figures
(`remap_cli.demo.figures`).
"""

from __future__ import annotations

import dataclasses
import html
import os
import shutil
from pathlib import Path

import numpy as np

from remap_cli.demo.config import GRID_SHAPE, LEVELS, DemoConfig, config_json
from remap_cli.demo.figures import region_weights_svg, training_curve_svg, write_svg
from remap_tf.io import atomic_write_json
from remap_tf.regions import rmac_regions
from remap_tf.serving.report import write_report
from remap_tf.specs import get_spec


@dataclasses.dataclass
class RemapOutcome:
    """What the report shows of the fine-tuned REMAP, beyond its table row.

    Attributes:
        row: its table row (see `table_row`).
        initial_weights, learned_weights: region weights ``(layers, regions)`` after the KL
            initialisation and after fine-tuning.
        version_dir: the exported SavedModel version.
        embedded_through: where the test descriptors were computed.
        export_difference: largest |exported - Keras| database descriptor difference.
        index: the ScaNN index of the database descriptors.
        rankings: ``(num_queries, num_database)`` database rows, best first.
        queries: ``(num_queries, dim)`` query descriptors.
        descriptors: ``(num_database, dim)`` database descriptors.
    """

    row: dict
    initial_weights: np.ndarray
    learned_weights: np.ndarray
    version_dir: Path
    embedded_through: str
    export_difference: float
    index: object
    rankings: np.ndarray
    queries: np.ndarray
    descriptors: np.ndarray


def table_row(model, scores: dict) -> dict:
    """A row of the mAP table for a `remap_cli.demo.config.DemoModel` and its scores
    (`remap_tf.evaluation.mean_average_precision` with kappas 1 and 5)."""
    return {
        "key": model.key,
        "model": model.label,
        "pooling": model.pooling,
        "trained": False,
        "mAP": scores["mAP"],
        "mP@1": scores["mP@1"],
        "mP@5": scores["mP@5"],
        "ap": scores["ap"],
        "steps": 0,
        "train_seconds": 0.0,
        "stopped_by_time_limit": False,
    }


def format_table(rows) -> str:
    """The mAP table as aligned text."""
    header = f"{'model':<44} {'test mAP':>8} {'mP@1':>6} {'mP@5':>6} {'steps':>6} {'train s':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        note = " (time limit)" if row["stopped_by_time_limit"] else ""
        lines.append(
            f"{row['model']:<44} {row['mAP']:>8.3f} {row['mP@1']:>6.3f} {row['mP@5']:>6.3f} "
            f"{row['steps']:>6d} {row['train_seconds']:>8.0f}{note}"
        )
    return "\n".join(lines)


def write_outputs(config: DemoConfig, out: Path, data, remap: RemapOutcome, rows, curves):
    """Figures, results.json, then report.html (+ report_files/); returns their paths by name.

    The page, which points at the figures, comes last. If any of them cannot be written (a
    full disk), those this call created are removed, so a run leaves its whole report or none.
    """
    candidates = [out / "figures", out / "results.json"]
    fresh = [path for path in candidates if not path.exists()]
    try:
        paths = _write_figures(config, out / "figures", remap, curves)
        results = {
            "config": config_json(config),
            "table": [{k: v for k, v in row.items() if k != "ap"} for row in rows],
            "saved_model": str(remap.version_dir),
            "embedded_through": remap.embedded_through,
            "max_export_difference": remap.export_difference,
            "train_photos": list(data.views.train_photos),
            "test_photos": list(data.views.test_photos),
        }
        paths["results"] = atomic_write_json(out / "results.json", results)
        paths["report"] = _write_query_report(config, out, data, remap, rows)  # cleans itself
    except BaseException:
        for path in fresh:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
    paths["report_png"] = out / "report_files" / "report.png"
    return paths


def _write_figures(config: DemoConfig, figures: Path, remap: RemapOutcome, curves) -> dict:
    mining = config.mining.replace("_", "-")
    paths = {}
    if curves:
        paths["training_curve"] = write_svg(
            figures / "training_curve.svg",
            training_curve_svg(curves, title=f"Fine-tuning loss ({mining} triplet, per epoch)"),
        )
    taps = get_spec(config.backbone).taps
    region_rows = []
    for layer in range(remap.learned_weights.shape[0]):
        tap = taps[layer] if layer < len(taps) else str(layer)
        region_rows.append((f"layer {layer + 1}: {tap}\nKL init", remap.initial_weights[layer]))
        region_rows.append((f"layer {layer + 1}: {tap}\nfine-tuned", remap.learned_weights[layer]))
    paths["region_weights"] = write_svg(
        figures / "region_weights.svg",
        region_weights_svg(
            region_rows,
            rmac_regions(*GRID_SHAPE, LEVELS),
            grid_shape=GRID_SHAPE,
            title="REMAP region weights: KL-divergence initialisation and after fine-tuning",
        ),
    )
    return paths


def _write_query_report(config: DemoConfig, out: Path, data, remap: RemapOutcome, rows):
    """report.html: every query crop with its top results from the fine-tuned REMAP.

    Images are read from their files; captions are their ids (paths relative to the photo
    set, "test/coffee/coffee_003.jpg"), as the index and the terminal show them.
    """
    results, names, relevance, scores = [], [], [], []
    for q, positives in enumerate(data.positives):
        top = [int(i) for i in remap.rankings[q][: config.top_k]]
        results.append([data.database[i] for i in top])
        names.append([data.ids[i] for i in top])
        relevance.append([i in set(positives) for i in top])
        scores.append([float(remap.queries[q] @ remap.descriptors[i]) for i in top])
    captions = [
        f"{photo}: {Path(os.path.relpath(path, data.views.root)).as_posix()}"
        for photo, path in zip(data.owners, data.queries, strict=True)
    ]
    return write_report(
        out / "report.html",
        queries=data.queries,
        results=results,
        result_names=names,
        relevance=relevance,
        ap=[float(a) for a in remap.row["ap"]],
        scores=scores,
        query_names=captions,
        title="remap demo: REMAP on the photos inside scikit-image",
        extra_sections_html=_sections_html(config, data, remap, rows),
        thumb_size=128,
    )


_STYLE = """<style>
table.metrics { border-collapse: collapse; margin: 0.5em 0 1em 0; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 4px 10px; font-size: 14px;
  text-align: right; max-width: none; word-break: normal; }
table.metrics th { background: #f2f2f2; }
.figure img { max-width: 100%; max-height: none; border: none; }
p.note { color: #444; max-width: 60em; }
</style>"""


def _metrics_table_html(rows) -> str:
    table = [
        "<table class=metrics><tr><th>model</th><th>test mAP</th><th>mP@1</th>"
        "<th>mP@5</th><th>fine-tuning steps</th><th>fine-tuning time</th></tr>"
    ]
    best = max(row["mAP"] for row in rows)
    for row in rows:
        strong = " style='font-weight:bold'" if row["mAP"] == best else ""
        note = " (time limit)" if row["stopped_by_time_limit"] else ""
        time_cell = f"{row['train_seconds']:.0f} s{note}" if row["trained"] else "&mdash;"
        table.append(
            f"<tr{strong}><td style='text-align:left'>{html.escape(row['model'])}</td>"
            f"<td>{row['mAP']:.3f}</td><td>{row['mP@1']:.3f}</td><td>{row['mP@5']:.3f}</td>"
            f"<td>{row['steps'] or '&mdash;'}</td><td>{time_cell}</td></tr>"
        )
    table.append("</table>")
    return "".join(table)


def _verdict(rows) -> str:
    by = {row["key"]: row for row in rows}
    best = max(rows, key=lambda row: row["mAP"])
    verdict = f"Best row: {best['model']} ({best['mAP']:.3f})."
    off, tuned = by.get("remap_kl_lw"), by.get("remap_ft")
    if off is not None and tuned is not None:
        change = "raised" if tuned["mAP"] > off["mAP"] else "did not raise"
        verdict += (
            f" Fine-tuning {change} REMAP's test mAP ({off['mAP']:.3f} off the shelf, "
            f"{tuned['mAP']:.3f} fine-tuned)."
        )
    return verdict


def _sections_html(config: DemoConfig, data, remap: RemapOutcome, rows) -> str:
    """The report's sections above the query grid: mAP table, figures, what was run."""
    views = data.views
    alpha = config.backbone_kwargs().get("alpha")
    backbone = config.backbone + (f" (alpha {alpha})" if alpha else "")
    weights = {None: "random initialisation", "imagenet": "ImageNet weights"}.get(
        config.weights, str(config.weights)
    )
    low, high = config.query_scale
    curves = (
        "<h2>Fine-tuning curves</h2>"
        '<div class=figure><img src="figures/training_curve.svg" alt="training loss"></div>'
        if any(row["trained"] for row in rows)
        else ""
    )
    return f"""
{_STYLE}
<h2>Test mAP</h2>
<p class=note>{len(views.test_photos)} test photos never seen in training
({html.escape(", ".join(views.test_photos))}): each has {config.queries_per_photo} queries,
crops of {low * low:.0%}-{high * high:.0%} of its area, against its
{config.views_per_photo - 1} other views in a database of {len(data.database)} images (with
{len(data.database) - len(set().union(*data.positives))} distractor views of the
{len(views.train_photos)} training photos). Backbone {html.escape(backbone)},
{html.escape(weights)}, images at {config.image_size} px long side. KL weights and learned
whitening come from the training views; fine-tuned models trained {config.steps} steps of
{config.classes_per_batch}&times;{config.images_per_class} images.</p>
{_metrics_table_html(rows)}
<p class=note>{html.escape(_verdict(rows))}</p>
{curves}
<h2>Region weights</h2>
<p class=note>REMAP's weight for each of the 40 R-MAC regions in each tapped layer, after the
KL-divergence initialisation and after fine-tuning. Each panel is one scale; a tile stands for
one region at its place in the image (regions of a scale overlap by about 40%).</p>
<div class=figure><img src="figures/region_weights.svg" alt="region weight heatmaps"></div>
<h2>Queries and their top {config.top_k} results (fine-tuned REMAP, ScaNN)</h2>
<p class=note>Every query crop, embedded through {html.escape(remap.embedded_through)} and
searched in the ScaNN index; under each result, its rank, its cosine similarity to the query
and its id. Green: a view of the query's photo; red: another photo.</p>
"""
