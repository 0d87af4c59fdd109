"""What the demo writes: the mAP table, figures, ``report.html`` (+ PNG) and ``results.json``.

The query grid itself is `remap_tf.serving.report.write_report`; this module adds the demo's
sections above it (the table, the training curves, the region weights) and its figures
(`remap_cli.demo.figures`).
"""

from __future__ import annotations

import dataclasses
import html
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
    """Everything the demo learnt about REMAP, for the table and the report.

    Attributes:
        untrained, trained: table rows (see `table_row`) before and after training.
        initial_weights, learned_weights: region weights ``(layers, regions)`` after the KL
            initialisation and after training.
        similarity_before, similarity_after: mean cosine similarity of two database images.
        version_dir: the exported SavedModel version.
        embedded_through: where the database descriptors were computed.
        export_difference: largest |exported - Keras| descriptor difference.
        index: the ScaNN index of the trained descriptors.
        rankings: ``(num_queries, num_database)`` database rows, best first.
        descriptors: ``(num_database, dim)`` trained descriptors.
    """

    untrained: dict
    trained: dict
    initial_weights: np.ndarray
    learned_weights: np.ndarray
    similarity_before: float
    similarity_after: float
    version_dir: Path
    embedded_through: str
    export_difference: float
    index: object
    rankings: np.ndarray
    descriptors: np.ndarray

    @property
    def scores_uninformative(self) -> bool:
        """True when the trained descriptors are so alike that similarities print as 1.000."""
        return self.similarity_after > 0.995


def table_row(label: str, pooling: str, scores: dict) -> dict:
    """A row of the mAP table from `remap_tf.datasets.RetrievalDataset.evaluate` scores."""
    return {
        "model": label,
        "pooling": pooling,
        "trained": True,
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
    header = f"{'model':<40} {'test mAP':>8} {'mP@1':>6} {'mP@5':>6} {'steps':>6} {'train s':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        note = " (time limit)" if row["stopped_by_time_limit"] else ""
        lines.append(
            f"{row['model']:<40} {row['mAP']:>8.3f} {row['mP@1']:>6.3f} {row['mP@5']:>6.3f} "
            f"{row['steps']:>6d} {row['train_seconds']:>8.0f}{note}"
        )
    return "\n".join(lines)


def write_outputs(config: DemoConfig, out: Path, data, remap: RemapOutcome, baselines, curves):
    """Figures, report.html (+ report_files/) and results.json; returns their paths by name."""
    paths = _write_figures(config, out / "figures", remap, curves)
    paths["report"] = _write_query_report(config, out, data, remap, baselines)
    paths["report_png"] = out / "report_files" / "report.png"
    results = {
        "config": config_json(config),
        "table": [
            {k: v for k, v in row.items() if k != "ap"}
            for row in (remap.untrained, remap.trained, *baselines)
        ],
        "saved_model": str(remap.version_dir),
        "embedded_through": remap.embedded_through,
        "max_export_difference": remap.export_difference,
        "train_photos": list(data.views.train_photos),
        "test_photos": list(data.views.test_photos),
    }
    paths["results"] = atomic_write_json(out / "results.json", results)
    return paths


def _write_figures(config: DemoConfig, figures: Path, remap: RemapOutcome, curves) -> dict:
    mining = config.mining.replace("_", "-")
    paths = {
        "training_curve": write_svg(
            figures / "training_curve.svg",
            training_curve_svg(curves, title=f"Training loss ({mining} triplet, mean per epoch)"),
        )
    }
    taps = get_spec(config.backbone).taps
    region_rows = []
    for layer in range(remap.initial_weights.shape[0]):
        tap = taps[layer] if layer < len(taps) else str(layer)
        region_rows.append((f"layer {layer + 1}: {tap}\nKL init", remap.initial_weights[layer]))
        region_rows.append((f"layer {layer + 1}: {tap}\nlearned", remap.learned_weights[layer]))
    paths["region_weights"] = write_svg(
        figures / "region_weights.svg",
        region_weights_svg(
            region_rows,
            rmac_regions(*GRID_SHAPE, LEVELS),
            grid_shape=GRID_SHAPE,
            title="REMAP region weights: KL-divergence initialisation and after training",
        ),
    )
    return paths


def _write_query_report(config: DemoConfig, out: Path, data, remap: RemapOutcome, baselines):
    """report.html: one query per test photo (its first view) with its top results.

    Images are read from their files; captions are their ids (paths relative to the photo
    set, "test/coffee/coffee_001.jpg"), as the index and the terminal show them.
    """
    test, ids = data.test, data.ids
    first: dict[str, int] = {}
    for q, query in enumerate(test.queries):
        first.setdefault(query.name.split(":", 1)[0], q)
    queries, results, names, relevance, aps, scores, captions = [], [], [], [], [], [], []
    for photo, q in first.items():
        query = test.queries[q]
        row = test.database.index(query.path)
        positives = set(query.groundtruth["default"][0])
        top = [int(i) for i in remap.rankings[q] if int(i) != row][: config.top_k]
        queries.append(test.database[row])
        results.append([test.database[i] for i in top])
        names.append([ids[i] for i in top])
        relevance.append([i in positives for i in top])
        aps.append(float(remap.trained["ap"][q]))
        scores.append([float(remap.descriptors[row] @ remap.descriptors[i]) for i in top])
        captions.append(f"{photo}: {ids[row]}")
    return write_report(
        out / "report.html",
        queries=queries,
        results=results,
        result_names=names,
        relevance=relevance,
        ap=aps,
        scores=None if remap.scores_uninformative else scores,
        query_names=captions,
        title="remap demo: REMAP on the photos inside scikit-image",
        extra_sections_html=_sections_html(config, data, remap, baselines),
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
        "<th>mP@5</th><th>training steps</th><th>training time</th></tr>"
    ]
    for row in rows:
        strong = " style='font-weight:bold'" if row["pooling"] == "remap" and row["trained"] else ""
        note = " (time limit)" if row["stopped_by_time_limit"] else ""
        table.append(
            f"<tr{strong}><td style='text-align:left'>{html.escape(row['model'])}</td>"
            f"<td>{row['mAP']:.3f}</td><td>{row['mP@1']:.3f}</td><td>{row['mP@5']:.3f}</td>"
            f"<td>{row['steps']}</td><td>{row['train_seconds']:.0f} s{note}</td></tr>"
        )
    table.append("</table>")
    return "".join(table)


def _verdict(remap: RemapOutcome, baselines) -> str:
    before, after = remap.untrained["mAP"], remap.trained["mAP"]
    if after > before:
        verdict = f"Training raised REMAP's test mAP from {before:.3f} to {after:.3f}"
    else:
        verdict = (
            f"Training did not raise REMAP's test mAP ({before:.3f} before, {after:.3f} after)"
        )
    best = max(baselines, key=lambda r: r["mAP"], default=None)
    if best is not None:
        verdict += f"; the best baseline, {best['model']}, reached {best['mAP']:.3f}."
    return verdict


def _sections_html(config: DemoConfig, data, remap: RemapOutcome, baselines) -> str:
    """The report's sections above the query grid: mAP table, figures, what was run."""
    views, test = data.views, data.test
    collapse_note = ""
    score_note = "its rank, its cosine similarity to the query and its id"
    if remap.scores_uninformative:
        collapse_note = (
            " A random backbone maps every image to almost the same descriptor, so distances "
            f"are tiny next to the triplet margin ({config.margin:g}) and the loss can stay near "
            "the margin while the rankings, and the mAP, already improve."
        )
        score_note = (
            "its rank and id (not its similarity to the query: they would all print as 1.000)"
        )
    alpha = config.backbone_kwargs().get("alpha")
    backbone = config.backbone + (f" (alpha {alpha})" if alpha else "")
    weights = config.weights or "random initialisation"
    table = _metrics_table_html([remap.untrained, remap.trained, *baselines])
    return f"""
{_STYLE}
<h2>Test mAP</h2>
<p class=note>{len(views.test_photos)} test photos never seen in training
({html.escape(", ".join(views.test_photos))}), {config.views_per_photo} views each, plus
{test.info["distractors"]} distractor views of the training photos: {len(test.database)} database
images. Every test view is a query against all the other images (INRIA Holidays-style mAP).
Backbone {html.escape(backbone)}, {html.escape(weights)},
{config.image_size}&times;{config.image_size} px; each model trained with the same budget
({config.steps} steps of
{config.classes_per_batch}&times;{config.images_per_class} images, at most {config.minutes:g}
min) from the same initial weights.</p>
{table}
<p class=note>{html.escape(_verdict(remap, baselines))}</p>
<h2>Training curves</h2>
<div class=figure><img src="figures/training_curve.svg" alt="training loss per step"></div>
<p class=note>Mean cosine similarity between two database images: {remap.similarity_before:.4f}
before training, {remap.similarity_after:.4f} after it (REMAP).{collapse_note}</p>
<h2>Region weights</h2>
<p class=note>REMAP's weight for each of the 40 R-MAC regions in each tapped layer, before
(KL-divergence initialisation) and after training. Each panel is one scale; a tile stands for
one region at its place in the image (regions of a scale overlap by about 40%).</p>
<div class=figure><img src="figures/region_weights.svg" alt="region weight heatmaps"></div>
<h2>Queries and their top {config.top_k} results (trained REMAP, ScaNN)</h2>
<p class=note>The first view of each test photo, embedded through
{html.escape(remap.embedded_through)} and searched in the ScaNN index; under each result,
{score_note}. The AP under a query is that query's over the
whole database; the mAP in the line at the top of the page averages only the
{len(views.test_photos)} queries shown here, while the table above averages every test view
as a query.</p>
"""
