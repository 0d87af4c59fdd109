"""Issue 18's options of the training config and of `remap train`, all off by default.

The default stays the paper's region max pooling; `--region-pooling gem` (or
``model.region_pooling: gem``) builds `RegionGeMPooling` layers. `--select-whitening` (or
``init.whitening_select``) chooses the whitening by held-out mAP."""

from __future__ import annotations

import argparse

import pytest
from PIL import Image

from remap_cli.commands.train import add_parser, resolve_config
from remap_tf.training.config import load_config


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "images"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(folder / name / f"{i}.png")
    return folder


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def test_region_pooling_flag_default_and_bad_value(data_dir):
    assert resolve_config(_parse(["--data", str(data_dir)])).model.region_pooling == "max"
    config = resolve_config(_parse(["--data", str(data_dir), "--region-pooling", "gem"]))
    assert config.model.region_pooling == "gem"
    with pytest.raises(ValueError, match=r"model\.region_pooling.*'mean'"):
        load_config(overrides={"data.train": str(data_dir), "model.region_pooling": "mean"})


def test_build_model_follows_the_config(data_dir):
    import remap_tf
    from remap_tf.training.fit import build_model

    overrides = {
        "data.train": str(data_dir),
        "model.backbone": "mobilenet",
        "model.backbone_kwargs": {"alpha": 0.25},
        "model.region_pooling": "gem",
    }
    model = build_model(load_config(overrides=overrides))
    assert isinstance(model.get_layer("regions_0"), remap_tf.RegionGeMPooling)
    model = build_model(load_config(overrides={**overrides, "model.region_pooling": "max"}))
    assert not isinstance(model.get_layer("regions_0"), remap_tf.RegionGeMPooling)


def test_select_whitening_flag_and_holdout_check(data_dir):
    """`--select-whitening` turns on init.whitening_select (off by default)."""
    assert resolve_config(_parse(["--data", str(data_dir)])).init.whitening_select is False
    config = resolve_config(_parse(["--data", str(data_dir), "--select-whitening"]))
    assert config.init.whitening_select is True and config.init.whitening_holdout == 0.3
    with pytest.raises(ValueError, match=r"init\.whitening_holdout"):
        load_config(overrides={"data.train": str(data_dir), "init.whitening_holdout": 1.0})
