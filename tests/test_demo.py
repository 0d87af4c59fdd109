"""Tests of `remap demo` (remap_cli/demo) and its figures (remap_cli/demo/figures.py)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from remap_cli import main as cli
from remap_cli.demo.config import DemoConfig
from remap_cli.demo.figures import region_layout, region_weights_svg, training_curve_svg
from remap_cli.demo.pipeline import run_demo
from tests import browser

TINY_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins"]
# HTML elements that never have a closing tag.
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class _Checker(HTMLParser):
    """Collects <img src> and checks that every non-void element is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.errors: list[str] = []
        self.doctype = False

    def handle_decl(self, decl):
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def check_html(path: Path) -> list[str]:
    """Parses ``path``; asserts well-formed nesting; returns the <img> sources."""
    checker = _Checker()
    checker.feed(path.read_text(encoding="utf-8"))
    checker.close()
    assert checker.doctype, "no <!DOCTYPE html>"
    assert not checker.errors, checker.errors[:3]
    assert not checker.stack, f"unclosed elements: {checker.stack}"
    return checker.images


def tiny_config(out: Path, models) -> DemoConfig:
    """The demo at a small size: random-init MobileNet 0.25, 6 photos, 2 steps per model."""
    return DemoConfig(
        out_dir=str(out),
        steps=2,
        minutes=3.0,
        backbone="mobilenet",
        alpha=0.25,
        weights=None,
        image_size=96,
        views_per_photo=3,
        distractors_per_photo=1,
        images_per_class=2,
        classes_per_batch=2,
        photos=TINY_PHOTOS,
        models=models,
        queries_per_photo=2,
        top_k=4,
    )


def test_demo_end_to_end_at_tiny_size_and_again_over_its_leftovers(chromium, tmp_path, monkeypatch):
    """A few images, 2 training steps per model, the smallest MobileNet: every file and the
    table are checked, the report is opened in Chromium (every image loads, the page fits its
    width), then a second run into the same folder must succeed and refresh them. The output
    folder is given relative to the working directory, as a user types it."""
    monkeypatch.chdir(tmp_path)
    out = Path("demo")
    lines: list[str] = []
    result = run_demo(tiny_config(out, ("spoc", "remap_kl_lw", "gem_ft", "remap_ft")), lines.append)

    text = "\n".join(lines)
    assert "test mAP" in text
    assert [row["model"] for row in result.table] == [
        "SPoC",
        "REMAP, KL + learned whitening",
        "GeM, fine-tuned",
        "REMAP, KL + learned whitening, fine-tuned",
    ]
    for row in result.table:
        assert 0.0 <= row["mAP"] <= 1.0
        assert row["model"] in text and f"{row['mAP']:.3f}" in text
    assert [row["steps"] for row in result.table] == [0, 0, 2, 2]
    # The exported graph decodes JPEGs with TensorFlow, the Keras reference with Pillow.
    assert result.max_export_difference < 0.1

    for name in ("train.csv", "test_groups.json", "photoset.json"):
        assert (out / "data" / name).is_file()
    version = out / "models" / "remap" / "1"
    assert (version / "saved_model.pb").is_file()
    assert (version / "assets.extra" / "tf_serving_warmup_requests").is_file()
    for path in result.paths.values():
        assert Path(path).exists(), path
        assert Path(path).resolve().is_relative_to(out.resolve())

    results = json.loads((out / "results.json").read_text())
    assert [r["mAP"] for r in results["table"]] == [r["mAP"] for r in result.table]

    from remap_tf.serving.index import load_index

    index = load_index(out / "index")
    groups = json.loads((out / "data" / "test_groups.json").read_text())
    queries = [p for g in groups["groups"] for p in g["images"][: g["queries"]]]  # crops
    expected = sum(len(g["images"]) - g["queries"] for g in groups["groups"])
    expected += len(groups["distractors"])
    assert len(index) == expected and not set(queries) & set(index.ids)
    assert all((out / "data" / image_id).is_file() for image_id in index.ids)

    report = out / "report.html"
    images = check_html(report)
    assert {"figures/training_curve.svg", "figures/region_weights.svg"} <= set(images)
    assert len(images) == 2 + len(queries) * 5  # figures + each query and its top 4
    for src in images:
        assert (report.parent / src).is_file(), src
    for svg in (out / "figures").glob("*.svg"):
        ET.parse(svg)  # well-formed XML
    page = report.read_text()
    assert "GeM, fine-tuned" in page and "SPoC" in page
    assert f"with\n{len(groups['distractors'])} distractor views" in page
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["report.html", "results.json"]
    with browser.page() as tab:
        seen = browser.load_file(tab, tmp_path / "demo" / "report.html")
    assert seen["images"] == len(images) and seen["broken"] == [], seen
    assert seen["overflow"] <= 0, seen

    lines.clear()
    again = run_demo(tiny_config(out, ("spoc", "remap_ft")), log=lines.append)
    assert again.paths["saved_model"] == out / "models" / "remap" / "2"
    # Same seed and data, op determinism on: the same figures, to the last digit.
    assert again.table[0]["mAP"] == result.table[0]["mAP"]
    assert again.table[1]["mAP"] == result.table[3]["mAP"]
    assert "GeM, fine-tuned" not in report.read_text()
    check_html(report)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backbone", "resnet5"], "backbone must be one of"),
        (["--weights", "missing.weights.h5"], "--weights 'missing.weights.h5'"),
        (["--minutes", "0"], "argument --minutes: must be a number > 0"),
        (["--steps", "0"], "argument --steps: must be an integer >= 1"),
        (["--serving", "localhost"], "--serving must be host:port"),
    ],
)
def test_cli_rejects_bad_flags_in_one_line(tmp_path, capsys, flags, message):
    status = cli.main(["demo", "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("remap demo: error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing written before the flags are checked


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("minutes", 0, "--minutes must be a number > 0, got 0."),
        ("steps", 0, "--steps must be an integer >= 1, got 0."),
        ("views_per_photo", 2.5, "--views-per-photo must be an integer >= 3, got 2.5."),
        ("classes_per_batch", True, "--classes-per-batch must be an integer >= 2, got True."),
        ("alpha", -0.5, "--alpha must be a number > 0, got -0.5."),
    ],
)
def test_run_demo_rejects_a_bad_config_before_writing_anything(tmp_path, field, value, message):
    """A library caller skips the CLI's flag parsing: `DemoConfig.validate` (run first by
    `run_demo`) names the field as its flag, in `remap_tf.checks`' words."""
    config = tiny_config(tmp_path / "out", ("spoc", "remap_ft"))
    setattr(config, field, value)
    with pytest.raises(ValueError) as info:
        run_demo(config, log=lambda line: None)
    assert str(info.value) == message
    assert not (tmp_path / "out").exists()


def test_cli_rejects_an_out_path_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "report.txt"
    target.write_text("mine")
    assert cli.main(["demo", "--out", str(target)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_region_layout_of_the_40_region_grid():
    from remap_tf.regions import rmac_regions

    layout = region_layout(rmac_regions(24, 32, 4))
    assert [len(scale["indices"]) for scale in layout] == [2, 6, 12, 20]
    assert [(scale["rows"], scale["cols"]) for scale in layout] == [(1, 2), (2, 3), (3, 4), (4, 5)]
    assert [scale["side"] for scale in layout] == [(24, 24), (16, 16), (12, 12), (9, 9)]
    # Positions are row-major, matching rmac_regions' order (scale, then top, then left).
    assert layout[1]["positions"] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_region_weights_svg_prints_every_weight_and_checks_counts():
    from remap_tf.regions import rmac_regions

    regions = rmac_regions(24, 32, 4)
    weights = np.linspace(0.0, 3.9, 40)
    svg = region_weights_svg([("layer 1\nlearned", weights)], regions)
    root = ET.fromstring(svg)
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert len(titles) == 40 and titles[39] == "region 39: weight 3.900"
    assert "layer 1" in svg and "learned" in svg
    with pytest.raises(ValueError, match="39 weights for 40 regions"):
        region_weights_svg([("short", weights[:39])], regions)


def test_training_curve_svg_draws_one_line_per_run():
    svg = training_curve_svg({"REMAP": ([10, 20], [0.1, 0.05]), "GeM": ([10], [0.1])})
    root = ET.fromstring(svg)
    lines = list(root.iter("{http://www.w3.org/2000/svg}polyline"))
    assert len(lines) == 2
    assert "REMAP" in svg and "GeM" in svg
    # The legend right of the plot is wide enough for a long name (it was cut off).
    long_name = "REMAP, KL + learned whitening, fine-tuned"
    wide = ET.fromstring(training_curve_svg({long_name: ([1, 2], [0.2, 0.1])}))
    texts = [t for t in wide.iter("{http://www.w3.org/2000/svg}text") if t.text == long_name]
    assert float(wide.get("width")) >= float(texts[0].get("x")) + 7 * len(long_name)
    with pytest.raises(ValueError, match="2 steps but 1 values"):
        training_curve_svg({"bad": ([1, 2], [0.1])})
    with pytest.raises(ValueError, match="empty"):
        training_curve_svg({})


@pytest.mark.slow
def test_default_demo_runs_every_row_and_fine_tuning_improves_remap(tmp_path):
    """`make demo`'s defaults: every row of the table, in order; fine-tuning raises REMAP
    over its own initialisation (KL + learned whitening: 0.801 -> 0.827 measured, seed 0).
    Whether fine-tuned REMAP is the
    best row is a measurement, reported in the README, not asserted: it is not (GeM
    off-the-shelf scores 0.853 on this small set)."""
    from remap_cli.demo.config import MODEL_KEYS

    result = run_demo(DemoConfig(out_dir=str(tmp_path / "demo_out")), log=lambda line: None)
    rows = {row["key"]: row for row in result.table}
    assert list(rows) == list(MODEL_KEYS)
    assert all(0.0 < row["mAP"] <= 1.0 for row in rows.values())
    assert rows["remap_ft"]["steps"] > 0 and rows["remap_ft"]["trained"]
    assert rows["remap_ft"]["mAP"] > rows["remap_kl_lw"]["mAP"]
